"""`tlora bench crossover`: at what training budget per domain do routed per-domain adapters beat
one multitask adapter trained with the same total compute?

A cell is (steps per domain, init, N, training seed). Routed Temporal LoRA: one adapter per domain
for each of the first N domains of SCALING_DOMAINS (hard routing by the router refit on the N
domains' stored features, as in `bench scaling`); multitask: one LoRA of the same rank on the union
of the same N domains' training windows for N x steps steps. Both sides see the same windows and
the same training seed. The ratio routed / multitask is the geometric-mean test perplexity over the
N domains (paired chunks).

Inits (evolve/warm_start.py, train.py): the domains are added in SCALING_DOMAINS order.
- base: every adapter starts from a fresh LoRA;
- nearest / blend: domain i starts from the adapters of domains 0..i-1 of the same cell recipe
  (the nearest one, or their blend in delta space), weighted by the router fit on those i domains'
  stored features (`router_affinity` of domain i's router features); domain 0 starts fresh (it is
  the base-init adapter). These adapters do not depend on N: the N=16 chain extends the N=8 one;
- shared: Branch-Train-Merge's seed phase *inside* the same compute: every domain gives
  k = max(1, steps // 8) of its steps to one seed adapter trained N x k steps on the round-robin
  union of the N domains' windows; each domain's branch then trains steps - k steps from it.
  Routed compute is N x k + N x (steps - k) = N x steps, multitask's.

Everything is cached under the work folder at once (atomic writes): each adapter (PEFT folder with
its training.json, written last), the per-chunk test NLL of each adapter, router features and fits,
and each finished cell (cells/<key>.json). The results (crossover.json, crossover_detail.json,
crossover.md, crossover.png) are rewritten after every cell, so an interrupted run loses at most the
cell in progress, and a rerun with the same work folder resumes.

Cells run in the order that tells most first (`plan`): N=min at the smallest budget for every init,
hard vs top-2/soft routing at N=max on the base adapters, the extra seeds (noise), the middle
budgets, the largest budget for base and the best init so far, the remaining inits, then N=max.
Cells at N=max also measure top-2 and soft routing (per-request routing as for hard routing).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.baselines import finish_training, is_trained, train_multitask
from benchmarks.common import (
    Phases,
    ScalingBudget,
    check_recipe,
    hardware,
    pyplot,
    write_results,
)
from benchmarks.flags import flag
from benchmarks.scaling_measure import load_router, measure_routing
from benchmarks.scaling_train import (
    chain_affinity,
    domain_router_features,
    prepare_domains,
    scaling_corpora,
)
from temporal_lora.adapters import train_adapter
from temporal_lora.backbone import decoder_layers, load_backbone
from temporal_lora.cache import atomic_write_text
from temporal_lora.config import TrainConfig, budget_config
from temporal_lora.corpora import Document
from temporal_lora.errors import InputError
from temporal_lora.evolve.warm_start import warm_start
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.decisions import mix_weights
from temporal_lora.routing.features import resolve_feature_spec
from temporal_lora.scoring import adapter_nll, perplexity, routed_nll
from temporal_lora.train import round_robin

INITS = ("base", "nearest", "blend", "shared")
PARTS = ("adapters", "multitask")  # the two sides of a cell that `--part` trains in separate processes
SHARED_SHARE = 8  # each domain gives steps // 8 (at least 1) of its steps to the shared seed phase
_NLL = "test_nll.json"


@dataclass
class CrossoverBudget:
    """The grid (steps per domain x inits x N) and the data sizes (as `bench scaling` quick)."""

    name: str = "quick"
    steps: tuple[int, ...] = (8, 32, 128)
    ns: tuple[int, ...] = (8, 16)
    inits: tuple[str, ...] = INITS
    seeds: tuple[int, ...] = (0, 1)  # seeds after the first: only at the smallest budget and N (the noise)
    modes: bool = True  # top-2 / soft vs hard routing at N = max(ns)
    ppl_chunks: int = 12
    router_chunks: int = 64
    calib_chunks: int = 16
    router_test_chunks: int = 48

    def check(self) -> None:
        if not self.steps or list(self.steps) != sorted(set(self.steps)) or min(self.steps) < 1:
            raise InputError(f"steps per domain must be increasing and at least 1, got {self.steps}")
        if not self.ns or list(self.ns) != sorted(set(self.ns)) or min(self.ns) < 2:
            raise InputError(f"domain counts must be increasing and at least 2, got {self.ns}")
        bad = [i for i in self.inits if i not in INITS]
        if bad or not self.inits:
            raise InputError(f"unknown init(s) {bad}; choose from {', '.join(INITS)}")
        if "shared" in self.inits and min(self.steps) < 2:
            raise InputError("the shared init needs at least 2 steps per domain (seed phase + branch)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"seeds must be distinct, got {self.seeds}")

    def scaling(self, ns: tuple[int, ...]) -> ScalingBudget:
        """The `bench scaling` budget that its data and routing helpers read."""
        return ScalingBudget(name=self.name, steps=min(self.steps), ns=ns, rank_scaled_ns=(), ppl_chunks=self.ppl_chunks,
                             router_chunks=self.router_chunks, calib_chunks=self.calib_chunks,
                             router_test_chunks=self.router_test_chunks, isolation_n=ns[0], add_domain_demo=False)


def crossover_budget(name: str) -> CrossoverBudget:
    if name == "quick":
        return CrossoverBudget()
    raise InputError(f"bench crossover has one grid, 'quick' (8/32/128 steps per domain), not {name!r}")


@dataclass(frozen=True)
class Cell:
    steps: int
    init: str
    n: int
    seed: int
    multitask: bool = True  # False: the routing-modes phase (adapters only)

    @property
    def key(self) -> str:
        return f"{'' if self.multitask else 'modes-'}s{self.steps}-{self.init}-N{self.n}-seed{self.seed}"


def shared_steps(steps: int) -> int:
    """Steps each domain gives to the shared seed phase."""
    return max(1, steps // SHARED_SHARE)


def best_init(b: CrossoverBudget, done: dict[str, dict], steps: int, n: int) -> str | None:
    """The non-base init with the lowest ratio at (steps, N, first seed) among finished cells."""
    found = {i: done[k]["ratio"] for i in b.inits if i != "base"
             and (k := Cell(steps, i, n, b.seeds[0]).key) in done}
    return min(found, key=found.get) if found else None


def plan(b: CrossoverBudget, done: dict[str, dict]) -> list[Cell]:
    """Every cell of the grid, most informative first (see the module docstring)."""
    s0, n0, seed0, big = b.steps[0], b.ns[0], b.seeds[0], b.ns[-1]
    cells = [Cell(s0, i, n0, seed0) for i in b.inits]
    if b.modes:
        cells.append(Cell(s0, "base" if "base" in b.inits else b.inits[0], big, seed0, multitask=False))
    cells += [Cell(s0, i, n0, seed) for seed in b.seeds[1:] for i in b.inits]
    cells += [Cell(s, i, n0, seed0) for s in b.steps[1:-1] for i in b.inits]
    if len(b.steps) > 1:  # the largest budget: base and the best init so far first
        best = best_init(b, done, b.steps[-2], n0)
        first = [i for i in ("base", best) if i in b.inits]
        cells += [Cell(b.steps[-1], i, n0, seed0) for i in first + [i for i in b.inits if i not in first]]
    best = best_init(b, done, b.steps[-1], n0) or (best_init(b, done, b.steps[-2], n0) if len(b.steps) > 1 else None)
    order = ([best] if best else []) + [i for i in b.inits if i != best]
    cells += [Cell(s, i, n, seed0) for n in b.ns[1:] for s in b.steps for i in order]
    out, seen = [], set()
    for c in cells:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


# ---------------------------------------------------------------- the run


@dataclass
class _Run:
    """What every cell of one run shares (internal: keeps the signatures short)."""

    work: Path
    b: CrossoverBudget
    cfg: TrainConfig
    domains: list[str]
    data: dict
    model: object
    spec: str
    base: str | None
    base_id: str
    phases: Phases
    progress: bool
    log: object

    # -------------------------------------------------------- router features, fits, affinities
    def features(self, n: int) -> dict:
        return domain_router_features(self.model, self.spec, self.data, self.domains[:n], self.work, self.cfg,
                                      lambda *a: None)

    def routing(self, n: int) -> dict:
        feats = self.features(n)
        return self.phases.run(f"router-N{n}", lambda: measure_routing(
            feats, self.data, self.domains, self.b.scaling((n,)), self.cfg, self.work))[str(n)]

    def affinity_of(self, i: int) -> dict[str, float]:
        """Router affinity of domain i's text to domains 0..i-1 (the router fit on those i)."""
        return chain_affinity(self.features(i + 1), self.domains, i, self.cfg, self.work / "affinity.json")

    # -------------------------------------------------------- training (each adapter cached)
    def root(self, steps: int, seed: int) -> Path:
        return self.work / f"seed{seed}" / f"s{steps}"

    def windows(self, d: str, steps: int) -> list[list[int]]:
        return self.data[d].train[: steps * self.cfg.batch_size]

    def adapter(self, steps: int, init: str, n: int, seed: int, i: int) -> Path:
        """Domain i's adapter of a cell recipe, trained (and its warm-start sources) if not cached."""
        d = self.domains[i]
        root = self.root(steps, seed)
        if init in ("nearest", "blend") and i == 0:
            init = "base"  # nothing to start from: the first domain's adapter is the base-init one
        folder = root / (f"shared-N{n}" if init == "shared" else init) / d
        if is_trained(folder):
            return folder
        cfg = replace(self.cfg, steps=steps, seed=seed)
        init_from, info = None, {"init": init}
        if init == "shared":
            init_from = self.shared_seed(steps, n, seed)
            k = shared_steps(steps)
            cfg = replace(cfg, steps=steps - k)
            info |= {"shared_steps_per_domain": k, "shared_seed_steps": n * k}
        elif init in ("nearest", "blend"):
            earlier = {self.domains[j]: self.adapter(steps, init, n, seed, j) for j in range(i)}
            init_from, info = warm_start(init, self.affinity_of(i), earlier, folder.parent / f".{d}-init")
        self.log(f"[crossover] adapter '{d}' ({init} init, {cfg.steps} steps, seed {seed})")
        finish_training(folder, train_adapter(self.model, self.windows(d, steps), folder, cfg, desc=d,
                                              progress=self.progress, init_from=init_from) | info)
        return folder

    def shared_seed(self, steps: int, n: int, seed: int) -> Path:
        folder = self.root(steps, seed) / f"shared-N{n}" / ".seed"  # '.' starts no domain name
        if not is_trained(folder):
            k = shared_steps(steps)
            union = round_robin([self.windows(d, steps) for d in self.domains[:n]], n * k * self.cfg.batch_size)
            self.log(f"[crossover] shared seed phase: {n} x {k} steps on the union of {n} domains (seed {seed})")
            cfg = replace(self.cfg, steps=n * k, seed=seed)
            finish_training(folder, train_adapter(self.model, union, folder, cfg, desc="shared seed",
                                                  progress=self.progress) | {"domains": self.domains[:n]})
        return folder

    def multitask(self, steps: int, n: int, seed: int) -> Path:
        cfg = replace(self.cfg, steps=steps, seed=seed)
        return train_multitask(self.model, {d: self.windows(d, steps) for d in self.domains[:n]},
                               self.root(steps, seed) / f"multitask-N{n}", cfg, progress=self.progress, log=self.log)

    def train_part(self, c: Cell | None, part: str) -> dict:
        """Train one side of cell `c` into the cache: {"cell": key, "trained": [folders]}."""
        if c is None:
            self.log("[crossover] every cell of the grid is finished: nothing to train")
            return {"cell": None, "trained": []}
        self.log(f"[crossover] training the {part} of cell {c.key}")
        if part == "adapters":
            folders = [self.adapter(c.steps, c.init, c.n, c.seed, i) for i in range(c.n)]
        else:
            folders = [self.multitask(c.steps, c.n, c.seed)] if c.multitask else []
        return {"cell": c.key, "trained": [str(f) for f in folders]}

    # -------------------------------------------------------- evaluation
    def cell(self, c: Cell) -> dict:
        t0 = time.perf_counter()
        names = self.domains[: c.n]
        dirs = {d: self.adapter(c.steps, c.init, c.n, c.seed, i) for i, d in enumerate(names)}
        mt = self.multitask(c.steps, c.n, c.seed) if c.multitask else None
        routing = self.routing(c.n)
        feats = self.features(c.n)
        train_seconds = time.perf_counter() - t0
        model, tok, _ = load_backbone(self.base)
        tl = TemporalLoRA.assemble(model, tok, base_id=self.base_id, adapter_dirs=dirs,
                                   router=load_router(self.work, c.n, feats[names[0]]["train"].shape[-1], self.cfg),
                                   router_config=self.cfg.router, feature_spec=self.spec)
        if mt is not None:
            tl.peft_model.load_adapter(str(mt), adapter_name="multitask")
        ppl: dict[str, dict[str, float]] = {"oracle": {}, "routed": {}}
        if mt is not None:
            ppl["multitask"] = {}
        modes = self.b.modes and c.n == self.b.ns[-1]
        if modes:
            ppl["top2"], ppl["soft"] = {}, {}
        with torch.no_grad():
            for label, d in enumerate(names):
                chunks = self.data[d].test[: self.b.ppl_chunks]
                oracle = _cached_nll(tl, d, dirs[d], d, chunks)
                ppl["oracle"][d] = perplexity(oracle, chunks)
                ppl["routed"][d] = perplexity(routed_nll(tl, chunks, label, oracle, routing["picks"][d]), chunks)
                if mt is not None:
                    ppl["multitask"][d] = perplexity(_cached_nll(tl, "multitask", mt, d, chunks), chunks)
                if modes:
                    for name, v in self.mode_ppl(tl, c, d, chunks, feats[d]["test"][-1, : self.b.ppl_chunks]).items():
                        ppl[name][d] = v
        del tl, model
        g = {k: _gmean(list(v.values())) for k, v in ppl.items()}
        trained = {d: json.loads((f / "training.json").read_text()) for d, f in dirs.items()}
        routed_steps = sum(t["steps"] for t in trained.values())
        record = {"steps": c.steps, "init": c.init, "n": c.n, "seed": c.seed, "domains": names,
                  **{f"ppl_{k}": v for k, v in g.items()},
                  "routed_vs_oracle": round(g["routed"] / g["oracle"], 4),
                  "router_accuracy": routing["accuracy"], "ppl": ppl,
                  "adapter_inits": {d: {k: v for k, v in t.items() if k in ("init", "init_from", "affinity")}
                                    for d, t in trained.items()},
                  "adapter_seconds": round(sum(t["seconds"] for t in trained.values()), 1)}
        if c.init == "shared":
            seed = json.loads((self.shared_seed(c.steps, c.n, c.seed) / "training.json").read_text())
            routed_steps += seed["steps"]
            record["shared_seed_steps"] = seed["steps"]
            record["adapter_seconds"] = round(record["adapter_seconds"] + seed["seconds"], 1)
        record["compute_steps"] = {"routed": routed_steps}
        if mt is not None:
            mtt = json.loads((mt / "training.json").read_text())
            record["compute_steps"]["multitask"] = mtt["steps"]
            record["multitask_seconds"] = mtt["seconds"]
            record["ratio"] = round(g["routed"] / g["multitask"], 4)
            record["domains_where_routed_better"] = [d for d in names if ppl["routed"][d] < ppl["multitask"][d]]
        if modes:
            record["ratio_top2_vs_hard"] = round(g["top2"] / g["routed"], 4)
            record["ratio_soft_vs_hard"] = round(g["soft"] / g["routed"], 4)
        record["hardware"] = hardware()  # the cells of one grid may come from several machines (seconds differ)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        record["seconds_training_this_run"] = round(train_seconds, 1)
        return record

    def mode_ppl(self, tl, c: Cell, d: str, chunks: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
        """Top-2 and soft routing perplexity of domain d's chunks (cached: the modes phase and the
        full cell of the same adapters share it)."""
        path = self.work / "modes" / f"s{c.steps}-{c.init}-N{c.n}-seed{c.seed}.json"
        cache = json.loads(path.read_text()) if path.is_file() else {}
        if d not in cache:
            probs = tl.router(features.float())
            cache[d] = {name: perplexity(tl.token_nll(chunks, mix_weights(probs, mode, 2, 0.0)), chunks)
                        for mode, name in (("topk", "top2"), ("soft", "soft"))}  # no abstention, as hard
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cache, indent=1))
        return cache[d]


def _gmean(xs: list[float]) -> float:
    return round(math.exp(sum(math.log(x) for x in xs) / len(xs)), 4)


def _cached_nll(tl, name: str, folder: Path, domain: str, chunks: torch.Tensor) -> torch.Tensor:
    """Summed NLL per test chunk of `domain` under one adapter, kept in the adapter's folder."""
    path = folder / _NLL
    cache = json.loads(path.read_text()) if path.is_file() else {}
    got = cache.get(domain)
    if got is None or len(got) != len(chunks):
        got = adapter_nll(tl, name, chunks).tolist()
        cache[domain] = got
        atomic_write_text(path, json.dumps(cache))
    return torch.tensor(got, dtype=torch.float32)


def load_cells(work: Path, out: Path | None = None, recipe: dict | None = None) -> dict[str, dict]:
    """The finished cells: those recorded in `out`'s crossover_detail.json (the committed results,
    which outlive a lost work folder or a move to another machine) when they were measured with
    `recipe` (`crossover_recipe`: training config, data sizes, domains, base model), then those in
    `work/cells`, which win."""
    done: dict[str, dict] = {}
    detail = out / "crossover_detail.json" if out is not None else None
    if recipe is not None and detail is not None and detail.is_file():
        old = json.loads(detail.read_text())
        if old.get("recipe") == recipe:
            done |= old.get("cells", {})
    folder = work / "cells"
    if folder.is_dir():
        done |= {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    return done


def crossover_recipe(cfg: TrainConfig, b: CrossoverBudget, domains: list[str], base: str | None) -> dict:
    """What the cached adapters, features and finished cells depend on (as JSON reads it back). The
    grid (steps, inits, N, seeds) may change between runs: cells are keyed by it."""
    return json.loads(json.dumps({
        "train_config": {k: v for k, v in cfg.to_dict().items() if k not in ("steps", "seed")},
        "data": {k: v for k, v in asdict(b).items() if k.endswith("chunks")}, "domains": domains, "base": base}))


def grid_config(b: CrossoverBudget) -> TrainConfig:
    """The training recipe of every cell: the quick budget with the grid's data sizes."""
    cfg = replace(budget_config("quick"), router_chunks=b.router_chunks, calib_chunks=b.calib_chunks)
    # One router layer for the whole grid, whose cells are measured over several sessions: the one
    # its first cells used (the default before it became layers 8+12), so they stay comparable.
    return replace(cfg, router=replace(cfg.router, features="hidden:-1"))


def report_crossover(out: str | Path, work: str | Path, budget: CrossoverBudget | None = None) -> dict:
    """Rewrite the results of `budget`'s grid (default: the whole quick grid) from the finished cells
    in `work`, running nothing (e.g. after runs of partial grids)."""
    b = budget or CrossoverBudget()
    work, out = Path(work), Path(out)
    # The recipe the work folder was run with; without one, the committed results' own.
    recipe = None
    if (work / "recipe.json").is_file():
        recipe = json.loads((work / "recipe.json").read_text())
    elif (out / "crossover_detail.json").is_file():
        recipe = json.loads((out / "crossover_detail.json").read_text()).get("recipe")
    return write_crossover(load_cells(work, out, recipe), b, grid_config(b), out, recipe)


def run_crossover(out: str | Path, *, work: str | Path | None = None, base: str | None = None,
                  budget: str | CrossoverBudget = "quick", corpora: dict[str, list[Document]] | None = None,
                  config: TrainConfig | None = None, max_cells: int | None = None, part: str | None = None,
                  progress: bool = True, log=print) -> dict:
    """Run (or resume) every cell of the grid; results into `out` after each cell.

    `work` (default `<out>/crossover-work`) holds the cache. `corpora` ({domain: documents}, in the
    order domains are added) and `config` replace the 16 subdomains and the quick recipe (tests);
    `max_cells` stops after that many new cells (the rest is left for a rerun). `part`
    ("adapters" or "multitask") only trains that side of the next unfinished cell into the cache
    and measures nothing: two processes, one per side, share a cell's training on two cores, and a
    third run (no `part`) then measures it from the cache. Returns the report, or with `part`
    {"cell": the cell's key (None: the grid is finished), "trained": its folders of that side}.
    """
    if part not in (None, *PARTS):
        raise InputError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    b = crossover_budget(budget) if isinstance(budget, str) else budget
    b.check()
    cfg = config or grid_config(b)
    corpora, domains = scaling_corpora(corpora, max(b.ns))
    out = Path(out)
    work = Path(work) if work is not None else out / "crossover-work"
    recipe = crossover_recipe(cfg, b, domains, base)
    check_recipe(work, recipe)
    log(f"[crossover] cache in {work}; results into {out}")
    model, tokenizer, base_id = load_backbone(base)
    spec = resolve_feature_spec(cfg.router.features, len(decoder_layers(model)))
    data = prepare_domains(corpora, domains, tokenizer, cfg, b.scaling(b.ns),
                           train_windows=max(b.steps) * cfg.batch_size)
    run = _Run(work, b, cfg, domains, data, model, spec, base, base_id, Phases(work, log), progress, log)
    done = load_cells(work, out, recipe)
    if part is not None:
        return run.train_part(next((c for c in plan(b, done) if c.key not in done), None), part)
    new = 0
    report = write_crossover(done, b, cfg, out, recipe)
    while max_cells is None or new < max_cells:
        todo = [c for c in plan(b, done) if c.key not in done]
        if not todo:
            break
        c = todo[0]
        log(f"[crossover] cell {c.key} ({len(todo)} left in the grid)")
        done[c.key] = run.cell(c)
        atomic_write_text(work / "cells" / f"{c.key}.json", json.dumps(done[c.key], indent=1))
        new += 1
        report = write_crossover(done, b, cfg, out, recipe)
        if "ratio" in done[c.key]:
            log(f"[crossover] {c.key}: routed / multitask = {done[c.key]['ratio']:.4f}")
    return report


# ---------------------------------------------------------------- report


def summarize(done: dict[str, dict], b: CrossoverBudget, cfg: TrainConfig) -> tuple[dict, dict]:
    """(crossover.json: {steps: {init: {N: ratio}}} for the first seed, the detail report)."""
    seed0 = b.seeds[0]
    main: dict[str, dict[str, dict[str, float]]] = {}
    for c in plan(b, done):
        r = done.get(c.key)
        if r is not None and c.multitask and c.seed == seed0:
            main.setdefault(str(c.steps), {}).setdefault(c.init, {})[str(c.n)] = r["ratio"]
    main = {s: main[s] for s in sorted(main, key=int)}
    noise = {}
    for c in plan(b, done):
        if c.seed != seed0 and c.key in done and Cell(c.steps, c.init, c.n, seed0).key in done:
            a, z = done[Cell(c.steps, c.init, c.n, seed0).key]["ratio"], done[c.key]["ratio"]
            noise[f"s{c.steps}-{c.init}-N{c.n}"] = {f"seed{seed0}": a, f"seed{c.seed}": z, "diff": round(z - a, 4)}
    wins = {}
    for n in b.ns:
        for init in b.inits:
            ratios = [(int(s), v[init][str(n)]) for s, v in main.items() if str(n) in v.get(init, {})]
            if ratios:
                first = next((s for s, r in ratios if r < 1.0), None)
                wins[f"{init}-N{n}"] = {"measured_steps": [s for s, _ in ratios], "first_steps_where_routed_wins": first}
    modes = {k: {"steps": r["steps"], "init": r["init"], "n": r["n"], "seed": r["seed"], "ppl_hard": r["ppl_routed"],
                 "ppl_top2": r["ppl_top2"], "ppl_soft": r["ppl_soft"], "top2_vs_hard": r["ratio_top2_vs_hard"],
                 "soft_vs_hard": r["ratio_soft_vs_hard"], "ppl_oracle": r["ppl_oracle"]}
             for k, r in done.items() if "ratio_soft_vs_hard" in r}
    remaining = [c.key for c in plan(b, done) if c.key not in done]
    detail = {"crossover": main, "first_budget_where_routed_wins": wins, "seed_noise": noise,
              "soft_vs_hard": modes, "cells": done, "remaining_cells_in_order": remaining,
              "budget": asdict(b), "train_config": cfg.to_dict(), "shared_share": SHARED_SHARE,
              "hardware": hardware(),
              "notes": [
                  "ratio: routed (hard routing, router refit on the N domains) / multitask geometric-mean test "
                  f"perplexity over the first N domains ({b.ppl_chunks} chunks of {cfg.block_size} tokens each, "
                  "paired); below 1: the per-domain adapters win",
                  "equal compute: multitask trains N x steps steps (batch "
                  f"{cfg.batch_size}) on the union, rank r={cfg.adapter.r} as each domain adapter; routed trains N "
                  "adapters x steps; with the shared init each domain gives max(1, steps // "
                  f"{SHARED_SHARE}) steps to the seed phase (N x that many steps on the union), its branch trains the "
                  "rest: N x steps in all",
                  "nearest / blend: domain i starts from domains 0..i-1's adapters (same steps and seed), weighted by "
                  "the router fit on those i domains (SCALING_DOMAINS order); domain 0 starts fresh",
                  "the same training seed on both sides; the data split, router and test chunks are fixed (seed "
                  f"{cfg.seed}); extra seeds at the smallest budget show the noise",
                  "top-2 / soft: the same per-request router decision as hard routing (one router pass per request), "
                  "mixing the 2 most probable adapters (renormalised) or all N by probability",
              ]}
    return main, detail


def markdown(main: dict, detail: dict, b: CrossoverBudget) -> str:
    seed0 = b.seeds[0]
    cells = detail["cells"]
    lines = ["# Crossover: routed per-domain adapters vs one multitask LoRA at equal compute", "",
             "Routed / multitask geometric-mean test perplexity (below 1.000: Temporal LoRA wins), "
             f"training seed {seed0}; multitask trains N x steps on the union of the N domains.", ""]
    header = "| steps per domain | init | " + " | ".join(f"N={n}" for n in b.ns) + " |"
    lines += [header, "|---|---|" + "---|" * len(b.ns)]
    for s in b.steps:
        for init in b.inits:
            vals = []
            for n in b.ns:
                r = cells.get(Cell(s, init, n, seed0).key)
                vals.append("" if r is None else f"{r['ratio']:.4f} ({r['ppl_routed']:.2f} / {r['ppl_multitask']:.2f})")
            if any(vals):
                lines.append(f"| {s} | {init} | " + " | ".join(vals) + " |")
    lines += ["", "(each entry: ratio (routed ppl / multitask ppl)).", "", "## Where per-domain adapters start to win", ""]
    lines += _statements(main, detail, b)
    if detail["seed_noise"]:
        lines += ["", "## Noise (same cell, another training seed)", "", "| cell | " + " | ".join(
            next(iter(detail["seed_noise"].values())).keys()) + " |",
            "|---|" + "---|" * len(next(iter(detail["seed_noise"].values())))]
        for k, v in detail["seed_noise"].items():
            lines.append(f"| {k} | " + " | ".join(f"{x:.4f}" for x in v.values()) + " |")
    if detail["soft_vs_hard"]:
        lines += ["", "## Soft vs hard routing (same router decision per request)", "",
                  "| cell | oracle | hard | top-2 | soft (all N) | top-2 / hard | soft / hard |",
                  "|---|---|---|---|---|---|---|"]
        for k, m in detail["soft_vs_hard"].items():
            lines.append(f"| {k} | {m['ppl_oracle']:.2f} | {m['ppl_hard']:.2f} | {m['ppl_top2']:.2f} | "
                         f"{m['ppl_soft']:.2f} | {m['top2_vs_hard']:.4f} | {m['soft_vs_hard']:.4f} |")
        lines += ["", "Per-request cost: one router pass per request in every mode; hard runs one adapter, top-2 two, "
                  f"soft all N (rank-{detail['train_config']['adapter']['r']} LoRA paths on the same base forward)."]
    lines += ["", "## Cells", "", "| cell | routed | multitask | oracle | router acc. | compute steps routed / multitask "
              "| seconds (adapters / multitask) |", "|---|---|---|---|---|---|---|"]
    for k, r in cells.items():
        if "ratio" in r:
            cs = r["compute_steps"]
            lines.append(f"| {k} | {r['ppl_routed']:.2f} | {r['ppl_multitask']:.2f} | {r['ppl_oracle']:.2f} | "
                         f"{r['router_accuracy']:.3f} | {cs['routed']} / {cs['multitask']} | "
                         f"{r['adapter_seconds']:.0f} / {r['multitask_seconds']:.0f} |")
    if detail["remaining_cells_in_order"]:
        lines += ["", f"Not measured yet ({len(detail['remaining_cells_in_order'])} cells, next first): "
                  + ", ".join(detail["remaining_cells_in_order"]) + "."]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in detail["notes"]]
    machines = sorted({r["hardware"] for r in cells.values() if "hardware" in r})
    lines += ["", "This report was written on: " + detail["hardware"]]
    if machines:
        older = any("hardware" not in r for r in cells.values())
        lines += ["Cells were measured on: " + "; ".join(machines) + (" (older cells did not record theirs)."
                                                                       if older else ".")]
    return "\n".join(lines) + "\n"


def _statements(main: dict, detail: dict, b: CrossoverBudget) -> list[str]:
    noise = max((abs(v["diff"]) for v in detail["seed_noise"].values()), default=None)
    out = [] if noise is None else [f"Seed noise (largest ratio change with another training seed): {noise:.4f}."]
    for n in b.ns:
        measured = [(int(s), init, v[init][str(n)]) for s, v in main.items() for init in v if str(n) in v[init]]
        if not measured:
            continue
        wins = sorted((s, r, init) for s, init, r in measured if r < 1.0)
        best = min(measured, key=lambda t: t[2])
        budgets = sorted({s for s, _, _ in measured})
        if wins:
            s, r, init = wins[0]
            within = noise is not None and 1.0 - r <= noise
            out.append(f"- N={n}: per-domain adapters start to win at **{s} steps per domain** ({init} init: "
                       f"ratio {r:.4f}{', within the seed noise' if within else ''}); best measured: {best[1]} "
                       f"init at {best[0]} steps, {best[2]:.4f}.")
        else:
            out.append(f"- N={n}: multitask wins at every budget measured ({', '.join(map(str, budgets))} steps per "
                       f"domain); closest: {best[1]} init at {best[0]} steps, ratio {best[2]:.4f}.")
        for init in b.inits:
            row = [(s, r) for s, i, r in sorted(measured) if i == init]
            if len(row) > 1:
                out.append(f"  - {init}: " + " -> ".join(f"{r:.4f} ({s} steps)" for s, r in row))
    return out or ["- no cell finished yet."]


def write_crossover(done: dict[str, dict], b: CrossoverBudget, cfg: TrainConfig, out: Path,
                    recipe: dict | None) -> dict:
    """crossover.json (the {steps: {init: {N: ratio}}} table), crossover_detail.json (with `recipe`,
    which a later run compares before counting its cells as done), crossover.md, .png."""
    main, detail = summarize(done, b, cfg)
    detail["recipe"] = recipe
    write_results(out, "crossover_detail", detail, markdown(main, detail, b))
    (out / "crossover_detail.md").replace(out / "crossover.md")
    atomic_write_text(out / "crossover.json", json.dumps(main, indent=2))
    plot_crossover(main, b, out)
    return detail


def plot_crossover(main: dict, b: CrossoverBudget, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {n: s for n, s in zip(b.ns, ("-", "--", ":", "-."), strict=False)}
    colors = {init: f"C{i}" for i, init in enumerate(INITS)}
    for n in b.ns:
        for init in b.inits:
            pts = [(int(s), v[init][str(n)]) for s, v in main.items() if str(n) in v.get(init, {})]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ls=styles.get(n, "-"), color=colors[init],
                        label=f"{init}, N={n}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(b.steps), [str(s) for s in b.steps])
    ax.set_xlabel("training steps per domain (multitask: N x that, on the union)")
    ax.set_ylabel("routed / multitask perplexity")
    ax.set_title("Crossover: below 1, per-domain adapters win")
    ax.grid(alpha=0.3)
    if ax.lines[1:]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "crossover.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- settings (the command line)


@dataclass
class CrossoverSettings:
    """The flags of `tlora bench crossover` / `python -m benchmarks crossover`. The grid flags
    (--steps, --ns, --inits, --seeds) default to the quick grid's."""

    out: Path = flag(Path("runs/bench"), "crossover.json, crossover_detail.json, crossover.md, crossover.png "
                     "(the committed ones: benchmarks/results/scaling)")
    work: Path | None = flag(None, "the cache (default OUT/crossover-work; resumable)")
    budget: str = flag("quick", "the grid: there is one, quick (full is refused)", choices=("quick", "full"))
    base: str | None = flag(None, "base model: HF id, local dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    steps: tuple[int, ...] | None = flag(None, "training steps per domain of the grid (default: 8 32 128)")
    ns: tuple[int, ...] | None = flag(None, "domain counts of the grid (default: 8 16)")
    inits: tuple[str, ...] | None = flag(None, "inits of the grid (default: all four)", choices=INITS, aliases=("--init",))
    seeds: tuple[int, ...] | None = flag(None, "training seeds (default: 0 1)")
    max_cells: int | None = flag(None, "stop after this many new cells")
    part: str | None = flag(None, "only train this side of the next unfinished cell into --work (run the other side "
                            "in a second process on another core, then rerun without --part to measure the cell)",
                            choices=PARTS)
    report_only: bool = flag(False, "only rewrite the results of the grid from the finished cells in --work")
    bundle: Path | None = flag(None, "not used: crossover trains its own adapters (refused when given)")


def run(settings: CrossoverSettings) -> dict:
    """Run (or resume) the grid, or only its report (`report_only`), print crossover.md; returns
    what crossover_detail.json holds (with `part`: run_crossover's {"cell", "trained"})."""
    s = settings
    if s.bundle is not None:
        raise InputError("bench crossover trains its own adapters; --bundle is not used")
    b = crossover_budget(s.budget)
    grid = {"steps": s.steps or b.steps, "ns": s.ns or b.ns, "inits": s.inits or b.inits, "seeds": s.seeds or b.seeds}
    if any(grid[k] != getattr(b, k) for k in grid):
        b = replace(b, name="custom", **grid)
    work = s.work if s.work is not None else s.out / "crossover-work"
    if s.report_only:
        result = report_crossover(s.out, work, b)
    else:
        result = run_crossover(s.out, work=work, base=s.base, budget=b, max_cells=s.max_cells, part=s.part)
        if s.part is not None:
            print(json.dumps(result, indent=1))
            return result
    print((s.out / "crossover.md").read_text(encoding="utf-8"))
    print(f"written to {s.out}/crossover.json, crossover_detail.json, crossover.md and crossover.png")
    return result
