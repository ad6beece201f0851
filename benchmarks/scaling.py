"""`tlora bench scaling`: where one adapter per domain wins over one multitask adapter, and where not.

On N = 2, 4, 8, 16 real domains (corpora/subdomains.py) with the same per-domain token budget:

- quality: test perplexity of routed Temporal LoRA (hard routing, router refit on the first N
  domains) vs one multitask LoRA on the union of the N domains (N x the per-domain steps, same
  rank), a multitask LoRA with rank scaled by N, and the oracle (each domain's own adapter);
- the cost of adding the N-th domain: Temporal LoRA trains one adapter and refits the router on
  stored features; multitask retrains on all N domains. Both are measured wall times of runs
  made here (the multitask run for N *is* the retraining that adding the N-th domain needs);
- the data that adding a domain needs, and a real `add_domain` on a bundle whose old corpora
  were deleted;
- isolation: one domain's adapter retrained on new text of that domain; the other domains'
  outputs under the Temporal LoRA model are compared bit for bit, and multitask's perplexity
  change on the other domains is measured after retraining it with that domain's new data;
- router accuracy (and confusion) as N grows.

The 16 per-domain adapters serve every N: with the base init they are independent; with a warm
start (`ScalingBudget.init`: nearest or blend, evolve/warm_start.py) domain i starts from the
adapters of the domains added before it, as `add-domain --init` does. Each trained adapter, feature
set and finished phase is stored under `<out>/scaling-work/` at once; an interrupted run resumes there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common import Phases, ScalingBudget, check_recipe, hardware, scaling_budget
from benchmarks.flags import flag
from benchmarks.scaling_measure import (
    add_domain_without_old_data,
    load_router,
    measure_isolation,
    measure_quality,
    measure_routing,
)
from benchmarks.scaling_report import assemble_report, write_scaling
from benchmarks.scaling_train import (
    domain_router_features,
    prepare_domains,
    scaling_corpora,
    train_domain_adapters,
    train_isolation,
    train_multitask_runs,
)
from temporal_lora.backbone import decoder_layers, load_backbone
from temporal_lora.config import TrainConfig, budget_config
from temporal_lora.corpora import Document
from temporal_lora.errors import InputError
from temporal_lora.evolve.warm_start import check_init
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.features import resolve_feature_spec

__all__ = ["ScalingBudget", "ScalingSettings", "run", "run_scaling", "scaling_budget"]


@dataclass
class ScalingSettings:
    """The flags of `tlora bench scaling` / `python -m benchmarks scaling`."""

    out: Path = flag(Path("runs/bench"), "scaling.json, scaling.md, plots (and scaling-work/, the resume point)")
    budget: str = flag("quick", "how much is trained and measured", choices=("quick", "full"))
    steps: int | None = flag(None, "training steps per domain (default: the budget's; the core quick recipe is 40)")
    init: str | None = flag(None, "where each domain's adapter starts (default: the budget's, base)",
                            choices=("base", "nearest", "blend"))
    base: str | None = flag(None, "base model: HF id, local dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    bundle: Path | None = flag(None, "not used: scaling trains its own adapters (refused when given)")
    work: Path | None = flag(None, "not used here (the cache is OUT/scaling-work)")


def run(settings: ScalingSettings) -> dict:
    """Run every scaling measurement (see run_scaling), print scaling.md; returns what scaling.json holds."""
    if settings.bundle is not None:
        raise InputError("bench scaling trains its own adapters; --bundle is not used")
    budget = scaling_budget(settings.budget)
    budget = replace(budget, steps=settings.steps or budget.steps, init=settings.init or budget.init)
    report = run_scaling(settings.out, base=settings.base, budget=budget)
    print((settings.out / "scaling.md").read_text(encoding="utf-8"))
    print(f"written to {settings.out}/scaling.json, scaling.md and PNG plots")
    return report


def run_scaling(out: str | Path, *, base: str | None = None, budget: str | ScalingBudget = "quick",
                corpora: dict[str, list[Document]] | None = None, config: TrainConfig | None = None,
                progress: bool = True, log=print) -> dict:
    """Run every scaling measurement; write scaling.json, scaling.md and plots to `out`.

    `corpora` ({domain: documents}, in the order domains are added) replaces the 16 built-in
    subdomains; `config` replaces the quick training recipe (tests use both with a tiny model).
    """
    b = scaling_budget(budget) if isinstance(budget, str) else budget
    if any(n < 2 for n in b.ns) or list(b.ns) != sorted(set(b.ns)):
        raise InputError(f"domain counts must be increasing and at least 2, got {b.ns}")
    if b.isolation_n not in b.ns or any(n not in b.ns for n in b.rank_scaled_ns):
        raise InputError("isolation_n and rank_scaled_ns must be among the domain counts")
    check_init(b.init)
    cfg = config or replace(budget_config("quick"), steps=b.steps, router_chunks=b.router_chunks,
                            calib_chunks=b.calib_chunks)
    corpora, domains = scaling_corpora(corpora, max(b.ns))
    out = Path(out)
    work = out / "scaling-work"  # not bench's work/: both can live in one --out
    check_recipe(work, {"budget": asdict(b), "train_config": cfg.to_dict(), "domains": domains, "base": base})
    phases = Phases(work, log)
    t_start = time.perf_counter()

    model, tokenizer, base_id = load_backbone(base)
    spec = resolve_feature_spec(cfg.router.features, len(decoder_layers(model)))
    data = prepare_domains(corpora, domains, tokenizer, cfg, b)

    adapters = train_domain_adapters(
        model, data, work, cfg, progress, log, init=b.init,
        features=lambda n, m=model: domain_router_features(m, spec, data, domains[:n], work, cfg, log))
    multitask = train_multitask_runs(model, data, domains, work, cfg, b, progress, log)
    iso_domain = domains[0]
    isolation_dirs = train_isolation(model, data, domains, iso_domain, work, cfg, b, multitask, progress, log)
    features = domain_router_features(model, spec, data, domains, work, cfg, log)
    routing = phases.run("router", lambda: measure_routing(features, data, domains, b, cfg, work))
    del model
    feature_dim = features[domains[0]]["train"].shape[-1]

    def tl_for(adapter_dirs: dict[str, Path]):
        m, tok, _ = load_backbone(base)
        return TemporalLoRA.assemble(m, tok, base_id=base_id, adapter_dirs=adapter_dirs,
                                     router=load_router(work, max(b.ns), feature_dim, cfg), router_config=cfg.router,
                                     feature_spec=spec)

    tl = None

    def main_tl():
        nonlocal tl
        if tl is None:
            tl = tl_for(adapters)
            for name, folder in {**multitask, **isolation_dirs}.items():
                tl.peft_model.load_adapter(str(folder), adapter_name=name)
        return tl

    quality = phases.run("quality", lambda: measure_quality(main_tl(), data, domains, b, routing, multitask))
    isolation = phases.run("isolation", lambda: measure_isolation(
        main_tl(), tl_for({**adapters, iso_domain: isolation_dirs["temporal-update"]}), data, domains,
        iso_domain, b, quality))
    demo = None
    if b.add_domain_demo:
        demo = phases.run("add_domain_demo", lambda: add_domain_without_old_data(
            corpora, domains[:3], adapters, features, work, cfg, spec, base, progress, log))

    report = assemble_report(domains, corpora, data, b, cfg, adapters, multitask, isolation_dirs, features,
                             routing, quality, isolation, demo, work)
    report["hardware"] = hardware()
    report["phase_seconds"] = phases.data.get("_seconds", {})
    report["seconds_total_this_run"] = round(time.perf_counter() - t_start, 1)
    write_scaling(report, out)
    return report

