"""Out-of-scope requests: the abstain threshold chosen on validation data (routing/abstain.py),
out-of-scope route examples (`tlora examples add --domain none`), the CLI's flags, and the
server's answer when the router abstains."""

import json
import shutil
from types import SimpleNamespace

import httpx
import pytest
import torch
from support.serving import load_served, pick_domain_texts, running

from temporal_lora.cli import main
from temporal_lora.errors import InputError
from temporal_lora.routing.abstain import choose_threshold, in_scope_and_oos
from temporal_lora.routing.lexical import hash_texts, no_surer_than


def rows(confidences: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class probabilities with the given top confidence; the label is the top class where
    `correct`, else the other one. Dyadic values, so float32 holds them exactly."""
    probs = torch.tensor([[c, 1 - c] for c in confidences])
    labels = torch.tensor([0 if ok else 1 for ok in correct])
    return probs, labels


def oos_rows(confidences: list[float]) -> torch.Tensor:
    return torch.tensor([[1 - c, c] for c in confidences]).reshape(-1, 2)


# ------------------------------------------------------------------------------------------ the rules
def test_threshold_with_out_of_scope_rows_maximises_accuracy_plus_recall():
    probs, labels = rows([0.875, 0.75, 0.625, 0.5625], [True, True, True, False])
    # Score = accuracy + recall over the candidates 0, .5, .53125, .5625, .625, .6875, .75, .875:
    # at .75 two in-scope rows are kept right (2/4) and every out-of-scope row abstains (3/3): 1.5,
    # better than .5625/.625 (3/4 + 2/3) and .875 (1/4 + 3/3).
    t, report = choose_threshold(probs, labels, oos_rows([0.5, 0.53125, 0.6875]))
    assert t == 0.75
    assert report["rule"] == "in-scope + out-of-scope" and report["threshold"] == 0.75
    assert report["in_scope_accuracy"] == 0.75 and report["in_scope_accuracy_at_threshold"] == 0.5
    assert report["oos_recall"] == 1.0 and report["in_scope_abstained"] == 0.5
    assert (report["in_scope"], report["out_of_scope"], report["in_scope_correct"]) == (4, 3, 3)


def test_ties_go_to_the_smallest_threshold():
    probs, labels = rows([0.875, 0.75, 0.625, 0.5625], [True, True, True, False])
    # .5625 and .625 both score 3/4 + 2/2 (abstaining on the misrouted row costs nothing): the
    # smaller one abstains less.
    t, report = choose_threshold(probs, labels, oos_rows([0.5, 0.53125]))
    assert t == 0.5625 and report["oos_recall"] == 1.0 and report["in_scope_abstained"] == 0.0
    # Out-of-scope rows more confident than every in-scope row: abstaining gains nothing, t = 0.
    t, report = choose_threshold(probs, labels, oos_rows([0.9375]))
    assert t == 0.0 and report["oos_recall"] == 0.0


def test_threshold_without_out_of_scope_rows_keeps_a_share_of_the_correct_rows():
    # Correct rows at .875, .75, .625, .5; a misrouted row at .9375 plays no part.
    probs, labels = rows([0.9375, 0.875, 0.75, 0.625, 0.5], [False, True, True, True, True])
    t, report = choose_threshold(probs, labels)  # keep 95% of 4: all 4
    assert t == 0.5
    assert report["rule"] == "keep 95% of correct in-scope" and report["keep"] == 0.95
    assert report["oos_recall"] is None and report["out_of_scope"] == 0
    assert choose_threshold(probs, labels, keep=0.75)[0] == 0.625  # 3 of 4
    assert choose_threshold(probs, labels, keep=0.5)[0] == 0.75  # 2 of 4
    t, report = choose_threshold(probs, labels, oos_rows([]), keep=0.5)  # no rows = none given
    assert t == 0.75 and report["rule"] == "keep 50% of correct in-scope"
    # Nothing routed right: nothing to keep, no abstention.
    assert choose_threshold(*rows([0.75, 0.625], [False, False]))[0] == 0.0


def test_in_scope_accuracy_and_out_of_scope_recall():
    probs, labels = rows([0.875, 0.75, 0.625, 0.5625], [True, True, True, False])
    got = in_scope_and_oos(probs, labels, oos_rows([0.5, 0.6875, 0.9375]), threshold=0.7)
    assert got == {"threshold": 0.7, "in_scope_accuracy": 0.75, "in_scope_accuracy_at_threshold": 0.5,
                   "in_scope_abstained": 0.5, "oos_recall": pytest.approx(2 / 3), "in_scope": 4, "out_of_scope": 3}
    at = in_scope_and_oos(probs, labels, oos_rows([0.5, 0.6875, 0.9375]), threshold=0.6875)
    assert at["oos_recall"] == pytest.approx(1 / 3)  # a row at the threshold is kept: not abstained
    got = in_scope_and_oos(probs, labels, None, threshold=0.0)
    assert got["in_scope_accuracy_at_threshold"] == 0.75 and got["oos_recall"] is None


def test_bad_shapes_are_input_errors():
    probs, labels = rows([0.75, 0.625], [True, True])
    for args, message in (((probs, labels[:1]), "labels"), ((probs, torch.tensor([0, 2])), "class indices"),
                          ((probs, labels, torch.ones(2, 3) / 3), "out-of-scope"),
                          ((torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), "in-scope")):
        with pytest.raises(InputError, match=message):
            choose_threshold(*args)
    with pytest.raises(InputError, match="keep"):
        choose_threshold(probs, labels, keep=0.0)


# ------------------------------------------------------------------------------------------ no "none" domain
def test_none_is_no_router_class_and_no_domain_name(capsys, tmp_path):
    from temporal_lora.config import RouterConfig
    from temporal_lora.routing.gating import fit_router
    from temporal_lora.train import validate_domains

    torch.manual_seed(0)
    feats = {d: {"train": torch.randn(1, 20, 4) + k * 3, "calib": torch.randn(1, 5, 4) + k * 3}
             for k, d in enumerate(("a", "b"))}
    cfg = RouterConfig(epochs=30)
    none = torch.randn(3, 4)
    torch.manual_seed(1)  # the network's initial weights come from the global generator
    plain, _ = fit_router(feats, cfg)
    torch.manual_seed(1)
    with_none, summary = fit_router(feats, cfg, examples={"none": none}, example_weight=50.0)
    assert "user_examples" not in summary and summary["examples"] == 40
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), with_none.state_dict().values(),
                                                   strict=True))
    with pytest.raises(InputError, match="reserved"):
        validate_domains(["code", "none"])
    assert main(["train", "--domains", "code,none", "--out", str(tmp_path / "b")]) == 2
    assert "'none' is reserved" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ tlora train's flags
@pytest.fixture
def train_calls(monkeypatch):
    import temporal_lora.train as train_mod

    calls = []

    def fake(domains, out, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(domains=domains, feature_spec="embeddings")

    monkeypatch.setattr(train_mod, "train_bundle", fake)
    return calls


def test_train_abstain_flags(train_calls, tmp_path, capsys):
    base = ["train", "--domains", "code,legal", "--out", str(tmp_path / "b")]
    (tmp_path / "oos.txt").write_text("What's the weather?\n\n  Book a table for two  \n")
    (tmp_path / "oos.jsonl").write_text(json.dumps({"text": "Tell me a joke"}) + "\n")
    for extra, threshold, oos in (([], None, None), (["--abstain", "auto"], "auto", None),
                                  (["--abstain", "0.4"], 0.4, None), (["--abstain-threshold", "0.3"], 0.3, None),
                                  (["--out-of-scope", str(tmp_path / "oos.txt")], "auto",
                                   ["What's the weather?", "Book a table for two"]),
                                  (["--abstain", "auto", "--out-of-scope", str(tmp_path / "oos.jsonl")], "auto",
                                   ["Tell me a joke"])):
        assert main([*base, *extra]) == 0, extra
        call = train_calls.pop()
        assert call["abstain_threshold"] == threshold and call.get("out_of_scope") == oos, extra
    capsys.readouterr()
    for extra, message in ((["--abstain", "0.5", "--out-of-scope", str(tmp_path / "oos.txt")], "--abstain auto"),
                           (["--out-of-scope", str(tmp_path)], ".txt file"),
                           (["--out-of-scope", str(tmp_path / "missing.txt")], "does not exist")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("tlora: error:") == 1, extra
    with pytest.raises(SystemExit):
        main([*base, "--abstain", "sometimes"])
    assert "expected 'auto' or a number" in capsys.readouterr().err
    assert train_calls == []


# ------------------------------------------------------------------------------------------ out-of-scope examples
def _recomputed_threshold(bundle) -> tuple[float, dict]:
    """The threshold recomputed outside routing/abstain.py's replay helpers: the loaded router on its
    replay memory's validation rows (longest prefix + short texts) and on the 'none' examples."""
    import scipy.sparse as sp

    from temporal_lora.bundle import read_manifest
    from temporal_lora.evolve.examples import list_examples
    from temporal_lora.model import TemporalLoRA
    from temporal_lora.storage import read_examples

    tl = TemporalLoRA.from_pretrained(bundle)
    x, y, counts = [], [], []
    for label, d in enumerate(tl.domains):
        f, m = tl.replay[d], tl.replay[d]["calib"].shape[1]
        x += [f["calib"][-1].float(), f["short_calib"].float()]
        y.append(torch.full((m + len(f["short_calib"]),), label))
        counts += [tl.lexical_replay[d]["calib"][-m:], tl.lexical_replay[d]["short_calib"]]
    with torch.no_grad():
        x = torch.cat(x)
        lp_in = torch.log_softmax(tl.router.logits(x).double() / tl.router.temperature, -1)
        z = lp_in + tl.lexical.weight * tl.lexical.scores(sp.vstack(counts).tocsr()).double()
        probs = no_surer_than(torch.softmax(z / tl.lexical.temperature, -1), lp_in.exp())
        items, feats = read_examples(bundle, read_manifest(bundle))
        oos = [i for i in items if i["domain"] == "none"]
        assert [i["text"] for i in oos] == [i["text"] for i in list_examples(bundle) if i["domain"] == "none"]
        oos_probs = None
        if oos:
            of = torch.stack([feats[i["id"]].float() for i in oos])
            lp = torch.log_softmax(tl.router.logits(of).double() / tl.router.temperature, -1)
            oos_probs = tl.lexical.combine(lp, hash_texts([i["text"] for i in oos], tl.lexical.settings))
    return choose_threshold(probs, torch.cat(y), oos_probs)


def test_out_of_scope_examples_choose_the_threshold(tmp_path, capsys, tiny_bundle):
    from temporal_lora.bundle import read_manifest

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    assert read_manifest(bundle)["router"].get("lexical")  # the recomputation below joins both heads
    texts = ["What's the weather tomorrow in Lisbon?", "Book me a table for two at eight"]
    # Without --abstain auto the examples are stored, and the report says when they count.
    assert main(["examples", "add", "--bundle", str(bundle), "--domain", "none", *texts]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["changed"] and "--abstain auto" in report["note"] and "abstain" not in report
    manifest = read_manifest(bundle)
    assert manifest["router"]["config"]["abstain_threshold"] == 0.0
    assert not manifest["router"]["config"].get("abstain_auto")
    assert "user_examples" not in manifest["router"]["training"]  # never training rows

    # Switching it on: the threshold is chosen with the in-scope validation rows and the examples.
    assert main(["examples", "add", "--bundle", str(bundle), "--domain", "none", "--abstain", "auto",
                 "Tell me a joke about penguins"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = read_manifest(bundle)
    cfg, chosen = manifest["router"]["config"], manifest["router"]["training"]["abstain"]
    assert cfg["abstain_auto"] is True and cfg["abstain_threshold"] == chosen["threshold"] == report["abstain"]["threshold"]
    assert chosen["rule"] == "in-scope + out-of-scope" and chosen["out_of_scope"] == 3
    assert chosen["probabilities"] == "hidden-state + lexical heads"
    assert manifest["history"][-1]["abstain"] == "auto"
    expected, again = _recomputed_threshold(bundle)
    assert cfg["abstain_threshold"] == pytest.approx(expected, abs=1e-6)
    assert chosen["oos_recall"] == pytest.approx(again["oos_recall"])
    assert chosen["in_scope_accuracy_at_threshold"] == pytest.approx(again["in_scope_accuracy_at_threshold"])
    assert main(["examples", "list", "--bundle", str(bundle)]) == 0
    assert sorted(json.loads(line)["domain"] for line in capsys.readouterr().out.splitlines()) == ["none"] * 3

    # Removing them: the next refit falls back to the in-scope rule.
    assert main(["examples", "remove", "--bundle", str(bundle), "--domain", "none"]) == 0
    capsys.readouterr()
    manifest = read_manifest(bundle)
    assert manifest["router"]["training"]["abstain"]["rule"] == "keep 95% of correct in-scope"
    assert manifest["router"]["config"]["abstain_threshold"] == pytest.approx(_recomputed_threshold(bundle)[0],
                                                                              abs=1e-6)
    assert manifest["router"]["lexical"]["replay"]  # the lexical head survived the refits


# ------------------------------------------------------------------------------------------ the server
def test_server_says_the_base_model_answered_an_abstained_request(tiny_bundle):
    from temporal_lora.server import create_app

    tl = load_served(tiny_bundle)
    text = pick_domain_texts(tl)["legal"]
    with running(create_app(tl)) as url:
        body = {"prompt": text, "max_tokens": 6, "temperature": 0}
        routed = httpx.post(url + "/v1/completions", json={"model": "auto", **body}, timeout=60).json()["routing"]
        assert routed["answered_by"] == "legal" and not routed["abstained"] and "note" not in routed
        soft = httpx.post(url + "/v1/completions", json={"model": "auto", "routing_mode": "soft", **body},
                          timeout=60).json()["routing"]
        mix = sorted((w, d) for d, w in soft["weights"].items() if w > 0)[::-1]
        assert len(mix) > 1 and soft["answered_by"] == "+".join(d for _, d in mix)  # a mix answered
        base = httpx.post(url + "/v1/completions", json={"model": "base", **body}, timeout=60).json()
        assert base["routing"]["answered_by"] == "base" and "note" not in base["routing"]
        tl.router_config.abstain_threshold = 1.01  # nothing is that confident
        answer = httpx.post(url + "/v1/completions", json={"model": "auto", **body}, timeout=60)
        routing = answer.json()["routing"]
        assert answer.headers["x-route"] == "base"
        assert routing["abstained"] and routing["domain"] == "base" and routing["answered_by"] == "base"
        assert set(routing["weights"].values()) == {0.0}
        assert routing["note"] == (f"no domain matched: router confidence {routing['confidence']:.3f} is below the "
                                   "abstain threshold 1.010; the base model answered")
        assert answer.json()["choices"][0]["text"] == base["choices"][0]["text"]
