"""`tlora bench` (benchmark "all"): Temporal LoRA against base, oracle, sequential/multitask LoRA,
merged adapters, PEFT Arrow and a MiniLM router — quality, forgetting, routing, abstention,
confusable domains, speed and memory — on one base model, the same corpora, document splits and
per-adapter training budget.

Every phase in turn, each result stored under `<out>/work/` as soon as it finishes (an interrupted
run resumes there), then the report: bench.json, bench.md and PNG plots in --out.

    OMP_NUM_THREADS=1 python -m benchmarks all --out runs/bench --bundle runs/demo/bundle
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.baselines import (
    arrow_model,
    merge_adapters,
    train_multitask,
    train_sequential,
)
from benchmarks.common import BenchBudget, Phases, bench_budget
from benchmarks.flags import flag
from benchmarks.quality import measure_forgetting, measure_quality
from benchmarks.report import assemble_report, write_bench
from benchmarks.routing import (
    calibration_and_abstention,
    measure_confusable,
    measure_minilm,
)
from benchmarks.speed import measure_lora_layers, measure_memory, measure_speed, prompts
from temporal_lora.backbone import load_backbone
from temporal_lora.bundle import read_manifest
from temporal_lora.config import TrainConfig
from temporal_lora.corpora import source_paths
from temporal_lora.evaluate import held_out_chunks, router_metrics
from temporal_lora.model import TemporalLoRA
from temporal_lora.scoring import perplexity, plain_nll
from temporal_lora.train import chunks_tensor, load_domain_data, train_bundle


@dataclass
class CompareSettings:
    """The flags of `tlora bench` / `python -m benchmarks all`."""

    out: Path = flag(Path("runs/bench"), "bench.json, bench.md, plots (and work/, the resume point)")
    bundle: Path | None = flag(None, "bundle to measure (default: train one into OUT/work/bundle)")
    budget: str = flag("quick", "how much is measured", choices=("quick", "full"))
    base: str | None = flag(None, "base model: HF id, local dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    # `tlora bench` has always taken one set of flags for every benchmark; these belong to others.
    work: Path | None = flag(None, "not used here (the cache is OUT/work)")
    steps: int | None = flag(None, "not used here (the baselines train with the bundle's steps)")
    init: str | None = flag(None, "not used here (see the scaling benchmark)", choices=("base", "nearest", "blend"))


def run(settings: CompareSettings) -> dict:
    """Run every measurement (see run_bench), print bench.md; returns what bench.json holds."""
    report = run_bench(settings.out, bundle=settings.bundle, base=settings.base, budget=settings.budget)
    print((settings.out / "bench.md").read_text(encoding="utf-8"))
    print(f"written to {settings.out}/bench.json, bench.md and PNG plots")
    return report


def run_bench(out: str | Path, *, bundle: str | Path | None = None, base: str | None = None,
              budget: str | BenchBudget = "quick", progress: bool = True, log=print) -> dict:
    """Run every measurement and write bench.json, bench.md and plots to `out`.

    Without `bundle`, trains one (quick budget, the five built-in domains) into `<out>/work/bundle`.
    """
    b = bench_budget(budget) if isinstance(budget, str) else budget
    out = Path(out)
    work = out / "work"  # created by the first thing written there: a bad bundle leaves nothing behind
    if bundle is not None:
        read_manifest(Path(bundle))
    phases = Phases(work, log)
    t_start = time.perf_counter()

    if bundle is None:
        bundle = work / "bundle"
        if not (bundle / "manifest.json").is_file():
            log("[bench] training the Temporal LoRA bundle (quick budget, built-in domains)")
            train_bundle(["medical", "legal", "technical", "code", "literature"], bundle, base=base,
                         budget="quick", progress=progress, log=log)
    bundle = Path(bundle)

    def load():
        return TemporalLoRA.from_pretrained(bundle, base=base)

    tl = load()
    domains = tl.domains
    # The bundle's own training budget, so baselines get exactly the same per-adapter budget.
    cfg = TrainConfig.from_dict(tl.info["train_config"])
    if b.baseline_steps:
        cfg = replace(cfg, steps=b.baseline_steps)
    test_sets = held_out_chunks(tl, max(b.router_chunks, b.ppl_chunks), block_size=cfg.block_size, seed=cfg.seed)
    ppl_sets = {d: c[: b.ppl_chunks] for d, c in test_sets.items()}
    memory = phases.run("memory", lambda: measure_memory(tl, bundle))

    # The same training chunks the bundle's adapters were trained on (deterministic splits).
    def paths_of(d):
        return source_paths(d, tl.info["data"][d]["source"])

    # Loaded only when a phase that needs them runs (a resumed run may need none).
    @functools.cache
    def data():
        return {d: load_domain_data(d, paths_of(d), cfg.seed) for d in domains}

    @functools.cache
    def train_chunks():
        n_train = cfg.steps * cfg.batch_size
        return {d: chunks_tensor(dd.splits.train, tl.tokenizer, cfg, n_train, cfg.seed, d).tolist()
                for d, dd in data().items()}

    @functools.cache
    def router_data():
        return {d: (chunks_tensor(dd.splits.train, tl.tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, d),
                    chunks_tensor(dd.splits.val, tl.tokenizer, cfg, cfg.calib_chunks, cfg.seed, d))
                for d, dd in data().items()}

    # Baseline adapters: trained on a clean base (a second copy; the bundle's model has LoRA layers).
    seq_dirs = {d: work / "sequential" / f"step{i}-{d}" for i, d in enumerate(domains)}
    mt_dir = work / "multitask"
    if not all((p / "training.json").is_file() for p in [*seq_dirs.values(), mt_dir]):
        clean, _, _ = load_backbone(base or tl.base_id)
        seq_dirs = train_sequential(clean, train_chunks(), work / "sequential", cfg, progress=progress, log=log)
        train_multitask(clean, train_chunks(), mt_dir, cfg, progress=progress, log=log)
        del clean
    training = {
        "sequential": [json.loads((p / "training.json").read_text()) for p in seq_dirs.values()],
        "multitask": json.loads((mt_dir / "training.json").read_text()),
    }

    # Everything else is scored through the same model: the baseline adapters are loaded next to
    # the domain adapters, and the mixer is pointed at them while they are scored.
    for i, d in enumerate(domains):
        tl.peft_model.load_adapter(str(seq_dirs[d]), adapter_name=f"seq{i}")
    tl.peft_model.load_adapter(str(mt_dir), adapter_name="multitask")
    for method in b.merge_methods:
        merge_adapters(tl.peft_model, domains, method, f"merged_{method}")

    quality = phases.run("quality", lambda: measure_quality(tl, ppl_sets, b))
    forgetting = phases.run("forgetting", lambda: measure_forgetting(tl, ppl_sets, router_data(), cfg, quality))
    routing = phases.run("router", lambda: {
        "metrics": router_metrics(tl, test_sets),
        **calibration_and_abstention(tl, test_sets, b, cfg),
    })
    if b.minilm:
        phases.run("minilm", lambda: measure_minilm(tl, test_sets, ppl_sets, router_data(), cfg, quality))
    if b.arrow:
        def arrow():
            clean, _, _ = load_backbone(base or tl.base_id)
            model = arrow_model(clean, [bundle / "adapters" / d for d in domains], seed=cfg.seed)
            t0 = time.perf_counter()
            ppl = {d: perplexity(plain_nll(model, c), c) for d, c in ppl_sets.items()}
            return {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}

        phases.run("arrow", arrow)
    confusable = phases.run("confusable", lambda: measure_confusable(tl, cfg, b, log))
    # Speed last, on a freshly loaded bundle (nothing else loaded into the model).
    fresh = load()
    speed = phases.run("speed", lambda: measure_speed(fresh, test_sets, b, log))
    speed = {**speed, "lora_layers_per_decode_step": phases.run(
        "lora_layers", lambda: measure_lora_layers(fresh, prompts(fresh, test_sets, b)[1], repeats=10 * b.repeats))}

    report = assemble_report(phases.data, domains, b, training, speed, memory, quality, forgetting,
                             routing, confusable, bundle)
    report["seconds_total_this_run"] = round(time.perf_counter() - t_start, 1)
    write_bench(report, out)
    return report
