"""`tlora bench scaling` on a tiny random Llama: report schema, isolation bit for bit, add-domain
without the old corpora, resume from the cached adapters."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from support.tiny import tiny_config

from benchmarks.scaling import ScalingBudget, run_scaling
from temporal_lora.corpora import Document

# Four small "domains" of standard-library files (always on disk; one file = one document).
_AREAS = {
    "text": ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "difflib.py", "csv.py", "gettext.py"],
    "net": ["ftplib.py", "smtplib.py", "poplib.py", "imaplib.py", "socketserver.py", "mimetypes.py", "ipaddress.py"],
    "conc": ["threading.py", "queue.py", "sched.py", "subprocess.py", "selectors.py", "_threading_local.py",
             "socket.py"],
    "numbers": ["fractions.py", "statistics.py", "random.py", "calendar.py", "_pydecimal.py", "numbers.py",
                "colorsys.py"],
}


def _corpora() -> dict[str, list[Document]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for name, files in _AREAS.items():
        docs = [Document(id=f, text=(root / f).read_text(encoding="utf-8"), group=f) for f in files if (root / f).is_file()]
        assert len(docs) >= 4, name
        out[name] = docs
    return out


def _budget() -> ScalingBudget:
    return ScalingBudget(name="test", steps=4, ns=(2, 4), rank_scaled_ns=(2,), ppl_chunks=4, router_chunks=24,
                         calib_chunks=8, router_test_chunks=8, isolation_n=2, isolation_chunks=3)


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("scaling") / "bench"
    report = run_scaling(out, base=str(tiny_llama), budget=_budget(), corpora=_corpora(), config=tiny_config(),
                         progress=False, log=lambda *a: None)
    return out, report


def test_report_schema(scaling_run):
    out, report = scaling_run
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["n_domains"] == [2, 4]
    for key in ("ppl_ratio_routed_vs_multitask", "add_cost_ratio_multitask_vs_temporal", "router_accuracy"):
        assert len(saved[key]) == 2 and all(isinstance(x, float) for x in saved[key]), key
    assert all(0.0 <= a <= 1.0 for a in saved["router_accuracy"])
    assert all(x > 0 for x in saved["ppl_ratio_routed_vs_multitask"] + saved["add_cost_ratio_multitask_vs_temporal"])
    iso = saved["isolation_max_ppl_change_other_domains"]
    assert set(iso) >= {"temporal", "multitask"} and all(isinstance(v, float) for v in iso.values())
    # Multitask at N trained N x the steps of one domain's adapter, on the same per-domain chunks.
    for row in saved["rows"]:
        assert row["add_steps"] == {"temporal": 4, "multitask": 4 * row["n"]}
        assert row["old_data_needed_bytes"]["multitask_raw_text"] > 0
    assert saved["training"]["multitask"]["multitask-rank-2"]["steps"] == 8
    assert set(saved["ppl"]) >= {"base", "oracle", "routed-2", "routed-4", "multitask-2", "multitask-4",
                                 "multitask-rank-2"}
    assert len(saved["ppl"]["routed-4"]) == 4 and len(saved["ppl"]["routed-2"]) == 2
    assert "| N |" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").stat().st_size > 0 and (out / "isolation.png").stat().st_size > 0


def test_isolation_other_domains_bit_identical(scaling_run):
    _, report = scaling_run
    iso = report["isolation"]
    hard = iso["temporal"]["hard"]
    assert hard["chunks"] == 3 * 3  # three other domains, three chunks each
    # Only chunks routed to the retrained adapter may change; every other one is bit-identical.
    assert hard["bit_identical_chunks"] == hard["chunks"] - hard["routed_to_updated_domain"]
    if hard["routed_to_updated_domain"] == 0:
        assert hard["max_abs_ppl_change"] == 0.0
    # The retrained adapter itself did change (the comparison is not vacuous), and multitask moved.
    assert iso["temporal_updated_domain_ppl_after"] != iso["temporal_updated_domain_ppl_before"]
    assert iso["multitask"]["multitask-retrain"]["max_abs_ppl_change"] > 0


def test_isolation_unit(tmp_path, tiny_llama):
    """Retraining one adapter leaves another adapter's logits bit-identical."""
    from temporal_lora.adapters import train_adapter
    from temporal_lora.backbone import load_backbone

    cfg = tiny_config()
    model, tok, _ = load_backbone(str(tiny_llama))
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(2, 500, (8, 64), generator=g).tolist() for _ in range(3)]
    for name, chunks in (("a", data[0]), ("b", data[1]), ("b2", data[2])):
        train_adapter(model, chunks, tmp_path / name, cfg, progress=False)
    from peft import PeftModel

    x = torch.tensor(data[0][:2])
    logits = {}
    for pair in (("a", "b"), ("a", "b2")):
        m, _, _ = load_backbone(str(tiny_llama))
        pm = PeftModel.from_pretrained(m, str(tmp_path / pair[0]), adapter_name="a")
        pm.load_adapter(str(tmp_path / pair[1]), adapter_name="b")
        with torch.no_grad():
            pm.set_adapter("a")
            la = pm(input_ids=x).logits
            pm.set_adapter("b")
            lb = pm(input_ids=x).logits
        logits[pair[1]] = (la, lb)
    assert torch.equal(logits["b"][0], logits["b2"][0])
    assert not torch.equal(logits["b"][1], logits["b2"][1])


def test_add_domain_with_old_corpora_deleted(scaling_run):
    _, report = scaling_run
    demo = report["add_domain_without_old_data"]
    assert demo["old_corpora_present"] == []
    assert demo["replay_rebuilt"] is False  # the router was refit from stored features, not old text
    assert demo["domains"] == ["text", "net", "conc"] and demo["version"] == 2
    assert demo["old_domains_unchanged"] is True


def test_resume_reuses_everything(scaling_run, tiny_llama, monkeypatch):
    out, report = scaling_run

    def no_training(*a, **k):
        raise AssertionError("a finished adapter was trained again")

    monkeypatch.setattr("temporal_lora.adapters.train_adapter", no_training)
    monkeypatch.setattr("benchmarks.baselines.train_adapter", no_training)
    monkeypatch.setattr("benchmarks.scaling_train.train_adapter", no_training)
    again = run_scaling(out, base=str(tiny_llama), budget=_budget(), corpora=_corpora(), config=tiny_config(),
                        progress=False, log=lambda *a: None)
    for key in ("ppl", "ppl_ratio_routed_vs_multitask", "router_accuracy", "isolation"):
        assert again[key] == report[key], key


def test_resume_refuses_another_recipe(scaling_run, tiny_llama):
    from temporal_lora.errors import InputError

    out, _ = scaling_run
    other = _budget()
    other.steps = 5
    with pytest.raises(InputError, match="another budget"):
        run_scaling(out, base=str(tiny_llama), budget=other, corpora=_corpora(), config=tiny_config(),
                    progress=False, log=lambda *a: None)


def test_cli_bench_scaling_refuses_a_bundle(capsys, tmp_path):
    from temporal_lora.cli import main

    assert main(["bench", "scaling", "--out", str(tmp_path / "b"), "--bundle", str(tmp_path)]) == 2
    assert "--bundle is not used" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_warm_started_chain(tmp_path, tiny_llama):
    """init=nearest: the first domain's adapter starts fresh, each later one from the adapter of an
    earlier domain (the one the router fit on the earlier domains ranks first), as recorded."""
    from dataclasses import replace

    b = replace(_budget(), ns=(3,), rank_scaled_ns=(), isolation_n=3, add_domain_demo=False, init="nearest")
    corpora = dict(list(_corpora().items())[:3])
    report = run_scaling(tmp_path / "bench", base=str(tiny_llama), budget=b, corpora=corpora, config=tiny_config(),
                         progress=False, log=lambda *a: None)
    names = list(corpora)
    train = {d: json.loads((tmp_path / "bench/scaling-work/adapters" / d / "training.json").read_text()) for d in names}
    assert train[names[0]]["init"] == "base" and "init_from" not in train[names[0]]
    assert train[names[1]]["init"] == "nearest" and train[names[1]]["init_from"] == names[0]
    aff = train[names[2]]["affinity"]
    assert set(aff) == set(names[:2]) and train[names[2]]["init_from"] == max(aff, key=aff.get)
    assert report["budget"]["init"] == "nearest" and any("adapter init: nearest" in n for n in report["notes"])
