"""`tlora bench` end to end on a tiny random model with a tiny budget: the report is well formed.
Timings are never asserted (benchmarks measure, tests check)."""

import json
from dataclasses import replace

from support.tiny import TINY_DOMAINS

from temporal_lora.bench import run_bench
from temporal_lora.bench.common import BenchBudget
from temporal_lora.bench.quality import backward_transfer
from temporal_lora.corpora.sotu import sotu_documents

TINY = BenchBudget(name="test", ppl_chunks=3, router_chunks=6, ood_chunks=4, repeats=1, new_tokens=3,
                   prompt_tokens=12, minilm=False, arrow=True, baseline_steps=1)


def _eras(folder):
    """Two small close corpora: State of the Union speeches before 1830 and after 1990."""
    docs = sotu_documents()
    eras = {"early": [d for d in docs if d.id < "1830"][:12], "modern": [d for d in docs if d.id > "1990"][:12]}
    paths = {}
    for name, chosen in eras.items():
        path = folder / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"id": d.id, "text": d.text[:6000]}) for d in chosen))
        paths[name] = str(path)
    return paths


def test_backward_transfer_sign():
    # ppl on domain 0 rises from 10 to 15 after learning domain 1: forgetting, negative BWT
    assert backward_transfer([[10.0, None], [15.0, 8.0]]) == -0.5
    assert backward_transfer([[10.0, None], [10.0, 8.0]]) == 0.0


def test_bench_report_schema(tiny_bundle, tiny_llama, tmp_path):
    out = tmp_path / "bench"
    budget = replace(TINY, confusable=_eras(tmp_path))
    report = run_bench(out, bundle=tiny_bundle, base=str(tiny_llama), budget=budget, progress=False, log=lambda *a: None)
    saved = json.loads((out / "bench.json").read_text())
    assert saved["budget"] == "test" and saved["hardware"]
    strategies = {"base", "oracle", "hard", "soft", "top2", "sequential", "multitask", "merged_linear",
                  "merged_cat", "merged_ties", "arrow"}
    assert strategies <= set(saved["ppl"])
    for s in strategies:
        assert set(saved["ppl"][s]) == set(TINY_DOMAINS)
        assert all(v > 1 for v in saved["ppl"][s].values())
        assert set(saved["ppl_ratio_to_oracle"][s]) == set(TINY_DOMAINS)
    assert all(v == 1.0 for v in saved["ppl_ratio_to_oracle"]["oracle"].values())
    # hard routing where the router is right is exactly the oracle; the sequential baseline's last
    # step and the temporal forgetting matrix's last row agree with the quality table
    f = saved["forgetting"]
    assert f["sequential"][-1] == [saved["ppl"]["sequential"][d] for d in f["order"]]
    assert f["temporal"][-1] == [saved["ppl"]["hard"][d] for d in f["order"]] or saved["router"]["accuracy"] < 1
    assert f["sequential"][0][1] is None  # only domains already seen are scored
    assert set(saved["bwt"]) == {"sequential", "temporal"}
    for key in ("accuracy", "macro_f1", "ece", "accuracy_by_length"):
        assert key in saved["router"]
    assert saved["confusable"]["domains"] == ["early", "modern"]
    assert 0 <= saved["confusable"]["accuracy"] <= 1
    for key in ("routing_overhead_ratio", "mixed_batch_speedup_vs_peft", "soft_vs_hard_ratio", "router_refresh_seconds"):
        assert saved["speed"][key] > 0 or key == "router_refresh_seconds"
    assert saved["memory"]["all_adapters_vs_base_ratio"] > 1
    curve = saved["abstention"]["curve"]
    assert curve[0]["threshold"] == 0 and curve[0]["in_domain_coverage"] == 1.0 and curve[0]["ood_to_base"] == 0.0
    for name in ("bench.md", "forgetting.png", "perplexity.png", "accuracy_by_length.png", "calibration.png"):
        assert (out / name).stat().st_size > 0
    assert "| Temporal LoRA, hard |" in (out / "bench.md").read_text()
    # a rerun resumes: every phase and every baseline adapter is reused, the report is identical
    again = run_bench(out, bundle=tiny_bundle, base=str(tiny_llama), budget=budget, progress=False, log=lambda *a: None)
    assert again["ppl"] == report["ppl"] and again["speed"] == report["speed"]
