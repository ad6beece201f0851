"""End to end on a tiny random Llama and real built-in corpora: train, route, evaluate, save, load."""

import json

import pytest
import torch
from support.tiny import TINY_DOMAINS

from temporal_lora.bundle import MANIFEST
from temporal_lora.evaluate import evaluate_bundle, held_out_chunks
from temporal_lora.model import TemporalLoRA


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    return TemporalLoRA.from_pretrained(tiny_bundle)


def test_bundle_layout_and_manifest(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    assert manifest["format_version"] == 1
    assert manifest["domains"] == TINY_DOMAINS
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
    assert manifest["router"]["features"] == "embeddings"
    assert manifest["router"]["temperature"] > 0
    for d in TINY_DOMAINS:
        folder = tiny_bundle / "adapters" / d
        # standard PEFT adapter folders, loadable by PEFT itself
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        assert manifest["adapters"][d]["training"]["steps"] == 4
        assert f"adapters/{d}/adapter_model.safetensors" in manifest["files"]
    assert "router/router.safetensors" in manifest["files"]
    splits = json.loads((tiny_bundle / "data" / "splits.json").read_text())
    assert set(splits) == set(TINY_DOMAINS)
    assert not list(tiny_bundle.rglob("*.bin")) and not list(tiny_bundle.rglob("*.pt"))


def test_adapter_folder_loads_with_plain_peft(tiny_bundle, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, tiny_bundle / "adapters" / "code")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_router_picks_the_right_domain_on_test_documents(loaded):
    sets = held_out_chunks(loaded, 10, block_size=64, seed=3)
    texts, truth = [], []
    for d, chunks in sets.items():
        texts += [loaded.tokenizer.decode(c) for c in chunks]
        truth += [d] * len(chunks)
    routes = loaded.route(texts)
    accuracy = sum(r.domain == t for r, t in zip(routes, truth, strict=True)) / len(truth)
    assert accuracy >= 0.85, accuracy
    for r in routes:
        assert abs(sum(r.probs.values()) - 1) < 1e-4
        assert r.confidence == max(r.probs.values())


def test_round_trip_gives_identical_routes_and_generations(loaded, tiny_bundle, tmp_path):
    prompts = ["import os\nimport sys\n\ndef main(argv):", "KING HENRY. Once more unto the breach,"]
    first = loaded.generate(prompts, mode="soft", max_new_tokens=6)
    copy = loaded.save_pretrained(tmp_path / "copy")
    again = TemporalLoRA.from_pretrained(copy)
    second = again.generate(prompts, mode="soft", max_new_tokens=6)
    assert [g.to_dict() for g in first] == [g.to_dict() for g in second]
    a = json.loads((tiny_bundle / MANIFEST).read_text())
    b = json.loads((copy / MANIFEST).read_text())
    assert a["files"] == b["files"]  # byte-identical adapters and router after a round trip


def test_modes_give_the_documented_weights(loaded):
    prompts = ["def f(x):\n    return x * 2\n", "Enter ROMEO and JULIET"]
    for mode in ("hard", "soft", "topk"):
        for g in loaded.generate(prompts, mode=mode, top_k=2, max_new_tokens=2):
            w = torch.tensor(list(g.weights.values()))
            assert abs(float(w.sum()) - 1) < 1e-4
            nonzero = int((w > 0).sum())
            assert nonzero == {"hard": 1, "topk": 2, "soft": nonzero}[mode]
            if mode == "hard":
                assert g.weights[g.route.domain] == 1.0


def test_abstain_threshold_falls_back_to_base(loaded):
    loaded.router_config.abstain_threshold = 1.01  # nothing is that confident
    try:
        route = loaded.route(["some text"])[0]
        assert route.abstained and route.domain is None
        g = loaded.generate(["some text"], max_new_tokens=3)[0]
        assert all(v == 0 for v in g.weights.values())
        base = loaded.generate(["some text"], domain="base", max_new_tokens=3)[0]
        assert g.text == base.text
    finally:
        loaded.router_config.abstain_threshold = 0.0


def test_evaluation_report(loaded, tmp_path):
    report = evaluate_bundle(loaded, tmp_path, ppl_chunks=3, router_chunks=6, progress=False)
    assert report["domains"] == TINY_DOMAINS
    for key in ("8", "16", "32", "64"):
        assert 0 <= report["router"]["accuracy_by_length"][key] <= 1
    assert len(report["router"]["confusion"]) == 3
    for strategy in ("base", "oracle", "routed", "soft"):
        assert set(report["perplexity"][strategy]) == set(TINY_DOMAINS)
    # routed equals oracle wherever the router is right; it can never beat the oracle by much
    for d in TINY_DOMAINS:
        if report["router"]["confusion"][TINY_DOMAINS.index(d)][TINY_DOMAINS.index(d)] == 6:
            assert report["perplexity"]["routed"][d] == pytest.approx(report["perplexity"]["oracle"][d], rel=1e-3)
    for name in ("report.json", "report.md", "confusion.png", "perplexity.png", "accuracy_by_length.png"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "report.json").read_text())["timing"]


@pytest.mark.slow
def test_gpt2_architecture_end_to_end(tiny_gpt2, tmp_path):
    """The original method's base architecture: Conv1D layers need fan_in_fan_out=True."""
    from support.tiny import tiny_config

    from temporal_lora.train import train_bundle

    tl = train_bundle(["code", "literature"], tmp_path / "b", base=str(tiny_gpt2), config=tiny_config(),
                      progress=False, log=lambda *a: None)
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert manifest["base_model"]["model_type"] == "gpt2"
    assert manifest["adapters"]["code"]["config"]["fan_in_fan_out"] is True
    prompts = ["import os\n\ndef main():", "Enter FALSTAFF"]
    first = tl.generate(prompts, mode="soft", max_new_tokens=4)
    again = TemporalLoRA.from_pretrained(tmp_path / "b").generate(prompts, mode="soft", max_new_tokens=4)
    assert [g.to_dict() for g in first] == [g.to_dict() for g in again]


@pytest.mark.slow
def test_two_process_training_through_accelerate(tiny_llama, tmp_path):
    """Adapter training goes through accelerate: two CPU processes (gloo) train one bundle."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
           "-m", "temporal_lora.cli", "train", "--domains", "code,literature", "--base", str(tiny_llama),
           "--out", str(tmp_path / "b")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    for d in ("code", "literature"):
        training = manifest["adapters"][d]["training"]
        assert training["processes"] == 2
        assert training["tokens_seen"] == 2 * training["steps"] * training["batch_size"] * training["block_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the shared staging folder is gone
    TemporalLoRA.from_pretrained(tmp_path / "b").route(["import os"])


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    """`tlora demo` with the quick budget, on a tiny random model instead of SmolLM2."""
    from temporal_lora.demo import run_demo

    report = run_demo(tmp_path / "demo", domains=["code", "literature"], base=str(tiny_llama))
    out = capsys.readouterr().out
    assert "router accuracy by prompt length" in out and "wall time" in out
    report_dir = tmp_path / "demo" / "report"
    on_disk = json.loads((report_dir / "report.json").read_text())
    assert on_disk["demo_timing"]["total"] == report["demo_timing"]["total"]
    assert {"train", "evaluate", "samples", "answers"} <= set(on_disk["demo_timing"])
    # the FAQ's answers are judged (no 'technical' domain here: every question without a domain)
    answers = json.loads((tmp_path / "demo" / "answers" / "answers.json").read_text())
    assert answers["summary"]["overall"]["questions"] == on_disk["answers"]["summary"]["questions"] > 40
    assert answers["summary"]["overall"]["arms"]["routed"]["token_f1"] is not None
    samples = json.loads((report_dir / "samples.json").read_text())
    assert [s["true_domain"] for s in samples] == ["code", "literature"]
    assert all(s["route"]["domain"] in ("code", "literature") for s in samples)
    assert (tmp_path / "demo" / "bundle" / MANIFEST).is_file()
