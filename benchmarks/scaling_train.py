"""What the scaling benchmark prepares before it measures: each domain's chunks, the per-domain
adapters, the multitask runs, the isolation retrains and the router features. Every result is
stored under the work folder at once and reused by a rerun."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from benchmarks.baselines import finish_training, is_trained, train_multitask
from benchmarks.common import ScalingBudget
from temporal_lora.adapters import train_adapter
from temporal_lora.cache import atomic_write_text
from temporal_lora.config import EVAL_LENGTHS, TrainConfig, router_prefix_lengths
from temporal_lora.corpora import Document
from temporal_lora.corpora.subdomains import SCALING_DOMAINS, load_subdomains
from temporal_lora.data import dedupe, split_documents
from temporal_lora.errors import InputError
from temporal_lora.evolve.warm_start import router_affinity, warm_start
from temporal_lora.routing.features import prefix_features
from temporal_lora.routing.gating import fit_router
from temporal_lora.routing.replay import domain_features
from temporal_lora.train import DomainData, chunks_tensor


@dataclass
class ScalingDomain:
    name: str
    dd: DomainData
    train: list[list[int]]  # what the domain's adapter (and multitask) trains on
    update: list[list[int]]  # new text of the domain, never seen by the first adapter
    router: torch.Tensor
    calib: torch.Tensor
    test: torch.Tensor  # test-document chunks: the first ppl_chunks score perplexity


def prepare_domains(corpora, domains, tokenizer, cfg: TrainConfig, b: ScalingBudget,
                    train_windows: int | None = None) -> dict[str, ScalingDomain]:
    """Each domain's chunks. By default n = steps x batch training windows and n more (the update);
    with `train_windows` (the crossover bench) that many training windows and no update."""
    n = cfg.steps * cfg.batch_size
    want = 2 * n if train_windows is None else train_windows
    out = {}
    for name in domains:
        docs = corpora[name]
        unique = dedupe(docs)
        dd = DomainData(name, f"subdomain:{name}", split_documents(unique, seed=cfg.seed), len(docs) - len(unique))
        # chunk_documents visits documents in the same seeded order whatever the count, so the
        # first n of 2n windows are exactly the adapter's training windows and the rest are new
        # (and the first k windows of any budget are the same: training sets of budgets are nested).
        both = chunks_tensor(dd.splits.train, tokenizer, cfg, want, cfg.seed, f"{name} train split").tolist()
        if len(both) < want:
            raise InputError(f"{name}: {len(both)} training windows, {want} needed"
                             + (" (training + update)" if train_windows is None else ""))
        train, update = (both[:n], both[n:]) if train_windows is None else (both, [])
        out[name] = ScalingDomain(
            name, dd, train, update,
            chunks_tensor(dd.splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, name),
            chunks_tensor(dd.splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{name} val split"),
            chunks_tensor(dd.splits.test, tokenizer, cfg, max(b.router_test_chunks, b.ppl_chunks), cfg.seed,
                          f"{name} test split"),
        )
    return out


# ---------------------------------------------------------------- training (each result cached)


def train_domain_adapters(model, data, work: Path, cfg, progress, log, *, init: str = "base",
                          features=None) -> dict[str, Path]:
    """One adapter per domain, in the order the domains are added. With init nearest/blend, domain
    i starts from the adapters of domains 0..i-1 (`chain_affinity` over `features`, a callable
    n -> router features of the first n domains); the first domain starts fresh."""
    dirs = {}
    names = list(data)
    for i, name in enumerate(names):
        folder = work / "adapters" / name
        if not is_trained(folder):
            init_from, info = None, {"init": "base"}
            if init != "base" and i > 0:
                affinity = chain_affinity(features(i + 1), names, i, cfg, work / "affinity.json")
                init_from, info = warm_start(init, affinity, dict(dirs), work / "adapters" / f".{name}-init")
            log(f"[scaling] adapter {i + 1}/{len(data)}: '{name}' ({cfg.steps} steps, {info['init']} init)")
            finish_training(folder, train_adapter(model, data[name].train, folder, cfg, desc=name,
                                                  progress=progress, init_from=init_from) | info)
        dirs[name] = folder
    return dirs


def chain_affinity(features: dict[str, dict], domains: list[str], i: int, cfg: TrainConfig,
                   path: Path) -> dict[str, float]:
    """Router affinity of domain i's training text to domains 0..i-1: the probabilities of a router
    fit on those i domains' stored features, as `add_domain` reads them from a bundle's router.
    Cached in `path` (one JSON for every domain of a chain)."""
    cache = json.loads(path.read_text()) if path.is_file() else {}
    d, old = domains[i], domains[:i]
    if d not in cache:
        if i == 1:
            cache[d] = {old[0]: 1.0}
        else:
            net, _ = fit_router({o: {"train": features[o]["train"], "calib": features[o]["calib"]} for o in old},
                                cfg.router, seed=cfg.seed)
            cache[d] = router_affinity(net, features[d]["train"], old)
        atomic_write_text(path, json.dumps(cache, indent=1))
    return cache[d]


def rank_scaled(cfg: TrainConfig, n: int) -> TrainConfig:
    """The multitask recipe with rank (and alpha, so alpha/r stays) multiplied by N."""
    return replace(cfg, adapter=replace(cfg.adapter, r=cfg.adapter.r * n, alpha=cfg.adapter.alpha * n))


def train_multitask_runs(model, data, domains, work: Path, cfg, b: ScalingBudget, progress, log) -> dict[str, Path]:
    dirs = {}
    for n in b.ns:
        chunks = {d: data[d].train for d in domains[:n]}
        dirs[f"multitask-{n}"] = train_multitask(model, chunks, work / f"multitask-{n}", cfg,
                                                 progress=progress, log=log)
        if n in b.rank_scaled_ns:
            dirs[f"multitask-rank-{n}"] = train_multitask(model, chunks, work / f"multitask-rank-{n}",
                                                          rank_scaled(cfg, n), progress=progress, log=log)
    return dirs


def train_isolation(model, data, domains, k: str, work: Path, cfg, b: ScalingBudget, multitask,
                    progress, log) -> dict[str, Path]:
    """Domain k gets new text. Temporal LoRA retrains only k's adapter on it; multitask either
    retrains on the union with k's data replaced (same recipe, N x steps) or fine-tunes the
    existing multitask adapter on k's new text (steps, no old data needed, but it drifts)."""
    n = b.isolation_n
    root = work / "isolation"
    dirs = {"temporal-update": root / f"temporal-{k}"}
    if not is_trained(dirs["temporal-update"]):
        log(f"[scaling] isolation: retraining '{k}' on new text of the domain")
        finish_training(dirs["temporal-update"], train_adapter(model, data[k].update, dirs["temporal-update"], cfg,
                                                               desc=f"{k} (update)", progress=progress))
    chunks = {d: (data[d].update if d == k else data[d].train) for d in domains[:n]}
    dirs["multitask-retrain"] = train_multitask(model, chunks, root / f"multitask-{n}-retrain", cfg,
                                                progress=progress, log=log)
    dirs["multitask-finetune"] = root / f"multitask-{n}-finetune"
    if not is_trained(dirs["multitask-finetune"]):
        log(f"[scaling] isolation: fine-tuning multitask-{n} on new text of '{k}'")
        finish_training(dirs["multitask-finetune"], train_adapter(
            model, data[k].update, dirs["multitask-finetune"], cfg, desc="multitask (update)",
            progress=progress, init_from=multitask[f"multitask-{n}"]))
    return dirs


def domain_router_features(model, spec, data, domains, work: Path, cfg, log) -> dict[str, dict]:
    """Router features of every domain (train/calib at the router's training prefix lengths: the
    replay memory) and of its test chunks (at the evaluation lengths), computed once on the
    frozen base and stored with the seconds they took."""
    train_lengths = router_prefix_lengths(cfg.router, cfg.block_size)
    test_lengths = [n for n in EVAL_LENGTHS if n <= cfg.block_size]
    out = {}
    for name in domains:
        path = work / "features" / f"{name}.safetensors"
        if not path.is_file():
            log(f"[scaling] router features of '{name}'")
            t0 = time.perf_counter()
            f = domain_features(model, spec, data[name].router, data[name].calib, train_lengths)
            seconds = time.perf_counter() - t0
            test = prefix_features(model, spec, data[name].test, test_lengths)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            save_file({"train": f["train"].contiguous(), "calib": f["calib"].contiguous(), "test": test.contiguous()},
                      str(tmp), metadata={"seconds": f"{seconds:.3f}"})
            tmp.replace(path)
        with safe_open(str(path), framework="pt") as fh:
            seconds = float(fh.metadata()["seconds"])
        t = load_file(str(path))
        out[name] = {"train": t["train"], "calib": t["calib"], "test": t["test"], "seconds": seconds}
    return out


def scaling_corpora(corpora: dict[str, list[Document]] | None, n: int) -> tuple[dict, list[str]]:
    """The first `n` domains: the given corpora (tests) or the 16 real subdomains, with their names."""
    if corpora is None:
        corpora = load_subdomains(SCALING_DOMAINS[:n])
    domains = list(corpora)[:n]
    if len(domains) < n:
        raise InputError(f"{n} domains needed, {len(domains)} given")
    return corpora, domains
