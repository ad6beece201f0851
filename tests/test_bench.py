"""`tlora bench` end to end on a tiny random model with a tiny budget: the report is well formed.
Timings are never asserted (benchmarks measure, tests check)."""

import json
from dataclasses import replace

from support.tiny import TINY_DOMAINS

from benchmarks.common import BenchBudget
from benchmarks.compare import run_bench
from benchmarks.quality import backward_transfer
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
    # the sequential baseline's last step agrees with the quality table
    f = saved["forgetting"]
    assert f["sequential"][-1] == [saved["ppl"]["sequential"][d] for d in f["order"]]
    # Temporal LoRA's adapters are frozen: with one domain there is nothing to route (its own adapter,
    # exactly the oracle); a later step differs from the oracle only where the router refreshed at
    # that step sends chunks elsewhere; only domains already seen are scored
    oracle = [saved["ppl"]["oracle"][d] for d in f["order"]]
    assert f["temporal"][0][0] == oracle[0]
    for t, (seq_row, row) in enumerate(zip(f["sequential"], f["temporal"], strict=True)):
        assert seq_row[t + 1:] == row[t + 1:] == [None] * (len(oracle) - t - 1)
        if f["temporal_router_accuracy"][t] == 1.0:
            assert row[: t + 1] == oracle[: t + 1]
    assert set(saved["bwt"]) == {"sequential", "temporal"}
    for key in ("accuracy", "macro_f1", "ece", "accuracy_by_length"):
        assert key in saved["router"]
    assert saved["confusable"]["domains"] == ["early", "modern"]
    assert 0 <= saved["confusable"]["accuracy"] <= 1
    for key in ("routing_overhead_ratio", "mixed_batch_speedup_vs_peft", "mixed_batch_speedup_vs_groups",
                "soft_vs_hard_ratio"):
        assert saved["speed"][key] > 0
    # what adding a domain costs besides its adapter: the refresh over all domains (the last step's)
    by_step = saved["speed"]["router_refresh_seconds_by_step"]
    assert len(by_step) == len(f["order"]) and min(by_step) >= 0
    assert saved["speed"]["router_refresh_seconds"] == by_step[-1]
    assert saved["memory"]["all_adapters_vs_base_ratio"] > 1
    curve = saved["abstention"]["curve"]
    assert curve[0]["threshold"] == 0 and curve[0]["in_domain_coverage"] == 1.0 and curve[0]["ood_to_base"] == 0.0
    for name in ("bench.md", "forgetting.png", "perplexity.png", "accuracy_by_length.png", "calibration.png"):
        assert (out / name).stat().st_size > 0
    assert "| Temporal LoRA, hard |" in (out / "bench.md").read_text()
    # a rerun resumes: every phase and every baseline adapter is reused, the report is identical
    again = run_bench(out, bundle=tiny_bundle, base=str(tiny_llama), budget=budget, progress=False, log=lambda *a: None)
    assert again["ppl"] == report["ppl"] and again["speed"] == report["speed"]
