"""What every measurement of the bench shares: its budgets, the phase cache (the resume point),
the machine description and the timing helpers."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from temporal_lora.cache import atomic_write_text
from temporal_lora.errors import InputError

THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
GOALS = {"routing_overhead_ratio": 1.03, "mixed_batch_speedup_vs_peft": 1.3, "confusable_accuracy": 0.95}


@dataclass
class BenchBudget:
    """How much of everything the bench measures. Training budgets come from the bundle."""

    name: str = "quick"
    ppl_chunks: int = 24  # test chunks per domain for perplexity (paired across strategies)
    router_chunks: int = 100  # test chunks per domain for routing metrics
    ood_chunks: int = 100  # out-of-domain chunks for abstention
    repeats: int = 3  # timing repeats (medians reported)
    new_tokens: int = 64
    prompt_tokens: int = 32
    confusable: str | list[str] | dict[str, str] = "pubmed-types"  # or built-in names, or {name: corpus path}
    confusable_docs: int = 1500  # per confusable domain, at most
    minilm: bool = True
    arrow: bool = True
    merge_methods: tuple[str, ...] = ("linear", "cat", "ties")
    baseline_steps: int | None = None  # per-domain steps of the baselines; None = the bundle's (tests only)


def bench_budget(name: str) -> BenchBudget:
    if name == "quick":
        return BenchBudget()
    if name == "full":
        return BenchBudget(name="full", ppl_chunks=100, router_chunks=200, ood_chunks=200, repeats=11,
                           confusable_docs=4000)
    raise InputError(f"unknown bench budget {name!r}; choose quick or full")


@dataclass
class ScalingBudget:
    """How much the scaling benchmark trains and measures (per domain unless said otherwise)."""

    name: str = "quick"
    # 8 steps x 4 x 128 tokens per domain: the whole quick run trains 57 x that (16 adapters,
    # multitask at N=2..16 = 30 x, rank-scaled multitask at N=4, isolation retrains, the
    # add-domain run), about 230k tokens, which fits an hour of a 2-core CPU shared with other
    # jobs. The core's quick budget is 40 steps: these adapters are lighter.
    steps: int = 8
    ns: tuple[int, ...] = (2, 4, 8, 16)
    rank_scaled_ns: tuple[int, ...] = (4,)  # each costs N x steps; N=16 would double the run
    ppl_chunks: int = 12  # test chunks of 128 tokens per domain (paired across strategies)
    router_chunks: int = 64  # router training chunks per domain
    calib_chunks: int = 16
    router_test_chunks: int = 48
    isolation_n: int = 4  # multitask retrained on this many domains for the isolation figure
    isolation_chunks: int = 6  # test chunks per other domain checked bit for bit (all 15 others)
    add_domain_demo: bool = True  # a real add_domain on a bundle whose old corpora are deleted
    # Where each domain's adapter starts (evolve/warm_start.py): base, or nearest/blend from the
    # adapters of the domains added before it, weighted by the router fit on those domains.
    init: str = "base"


def scaling_budget(name: str) -> ScalingBudget:
    if name == "quick":
        return ScalingBudget()
    if name == "full":
        return ScalingBudget(name="full", steps=40, rank_scaled_ns=(2, 4, 8, 16), ppl_chunks=32,
                             router_chunks=150, calib_chunks=30, router_test_chunks=100, isolation_n=8)
    raise InputError(f"unknown scaling budget {name!r}; choose quick or full")


class Phases:
    """Results of finished phases, persisted after each one (the resume point)."""

    def __init__(self, work: Path, log):
        self.path = work / "phases.json"
        self.log = log
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        if name in self.data:
            self.log(f"[bench] {name}: reusing the result of an earlier run")
            return self.data[name]
        self.log(f"[bench] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.put(name, result, seconds=round(time.perf_counter() - t0, 1))
        return result

    def put(self, name: str, result: dict, seconds: float | None = None) -> None:
        """Store (or replace) a phase's result at once."""
        self.data[name] = result
        if seconds is not None:
            self.data.setdefault("_seconds", {})[name] = seconds
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def check_recipe(work: Path, recipe: dict) -> None:
    """Cached adapters are only reused by a run with the same recipe (steps, ranks, domains...):
    the first run writes `work/recipe.json`, later ones must match it."""
    path = work / "recipe.json"
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as read back
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != recipe:
            # Name what differs: e.g. a smaller largest N gives a shorter domain list than the cache's.
            differ = sorted(k for k in stored.keys() | recipe.keys() if stored.get(k) != recipe.get(k))
            raise InputError(f"{work} holds a run with another budget, config or domain list "
                             f"(differs in: {', '.join(differ)}); use the same settings, "
                             "choose another output folder or delete it")
    else:
        atomic_write_text(path, json.dumps(recipe, indent=1))


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {gpu}, float32")


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, log=None) -> dict[str, float]:
    """Median seconds of each function, run round-robin (after one warm-up each) so that load
    from other processes on the machine hits every variant alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            times[k].append(seconds(fn))
        if log:
            log(f"[bench]   repeat {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return {k: statistics.median(v) for k, v in times.items()}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: plots are optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_results(out: Path, stem: str, report: dict, markdown: str) -> None:
    """`<stem>.json` and `<stem>.md` under `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2))
    atomic_write_text(out / f"{stem}.md", markdown)
