"""The training recipe: corpora -> document splits -> one adapter per domain -> router -> bundle."""

from __future__ import annotations

import random
import re
import shutil
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from temporal_lora.adapters import RESERVED_NAMES, distributed_state, train_adapter
from temporal_lora.backbone import decoder_layers, fingerprint, load_backbone
from temporal_lora.bundle import MANIFEST
from temporal_lora.config import TrainConfig, budget_config, router_prefix_lengths
from temporal_lora.corpora import BUILTIN_DOMAINS, Document, load_domain, source_of
from temporal_lora.corpora.sources import PRIMARY, load_source, sources_of
from temporal_lora.corpora.views import questions_in, short_views
from temporal_lora.data import Splits, chunk_documents, dedupe, split_documents
from temporal_lora.errors import CorpusError, FetchError, InputError
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.features import resolve_feature_spec
from temporal_lora.routing.gating import GatingNetwork, fit_router
from temporal_lora.routing.replay import domain_features
from temporal_lora.text import tokenize

TRAIN_INITS = ("base", "shared")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass
class DomainData:
    name: str
    source: str
    splits: Splits
    dropped_duplicates: int

    def split_summary(self) -> dict:
        """What the bundle records about this domain's data (data/splits.json): which documents are held out."""
        s = self.splits
        return {"source": self.source, "documents": len(s.train) + len(s.val) + len(s.test),
                "dropped_duplicates": self.dropped_duplicates, "train_documents": len(s.train),
                "val_ids": [d.id for d in s.val], "test_ids": [d.id for d in s.test]}


def validate_domains(domains: list[str]) -> list[str]:
    """Check names before any expensive work starts."""
    if not domains:
        raise InputError("no domains given")
    seen = set()
    for name in domains:
        if not _NAME.match(name):
            raise InputError(f"invalid domain name {name!r}: use lowercase letters, digits, '-' and '_'")
        if name in RESERVED_NAMES:
            raise InputError(f"domain name {name!r} is reserved; choose another")
        if name in seen:
            raise InputError(f"domain {name!r} is listed twice")
        seen.add(name)
    return list(domains)


def check_output_dir(out: Path) -> None:
    """Refuse early (before training) to overwrite a directory that is not a bundle."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise InputError(f"output {out} exists and is not a bundle; choose an empty or new directory")


def load_domain_data(name: str, data_paths: dict[str, Path], seed: int) -> DomainData:
    docs = load_domain(name, data_paths)
    unique = dedupe(docs)
    splits = split_documents(unique, seed=seed)
    source = source_of(name, data_paths.get(name))
    return DomainData(name, source, splits, len(docs) - len(unique))


def chunks_tensor(docs: list[Document], tokenizer, cfg: TrainConfig, n: int, seed: int, what: str) -> torch.Tensor:
    chunks = chunk_documents(docs, tokenizer, block_size=cfg.block_size, max_chunks=n, seed=seed)
    if not chunks:
        raise CorpusError(f"{what}: no document is at least {cfg.block_size} tokens long")
    return torch.tensor(chunks, dtype=torch.long)


@dataclass
class RouterText:
    """What the router reads of one domain: windows (training / calibration) and short texts."""

    train: torch.Tensor
    calib: torch.Tensor
    short: list[list[int]]
    short_calib: list[list[int]]
    sources: dict  # {source: {"documents", "train_documents", "val_ids", "test_ids"}} (built-in extras)


def router_text(dd: DomainData, tokenizer, cfg: TrainConfig, builtin: bool, log=print) -> RouterText:
    """The router's training text of one domain: windows of the training documents (as before), plus,
    for a built-in domain, windows of its other training sources (corpora/sources.py: half as many
    again, shared among them), plus short views and the documents' own questions (`short_texts`)."""
    train = chunks_tensor(dd.splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, dd.name)
    calib = chunks_tensor(dd.splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{dd.name} val split")
    splits = {"primary": dd.splits}
    sources: dict = {}
    extras = [s for s in sources_of(dd.name) if s.name != PRIMARY.get(dd.name)] \
        if builtin and cfg.router.extra_sources and dd.name in BUILTIN_DOMAINS else []
    more_train, more_calib = [train], [calib]
    for src in extras:
        try:
            docs = dedupe(load_source(src.name))
            sp = split_documents(docs, seed=cfg.seed)
        except (CorpusError, FetchError) as exc:  # e.g. no apt-get here: the router trains without it
            log(f"router source {src.name!r} of {dd.name!r} skipped: {exc}")
            sources[src.name] = {"skipped": str(exc)}
            continue
        n, m = max(1, cfg.router_chunks // (2 * len(extras))), max(1, cfg.calib_chunks // (2 * len(extras)))
        for docs_, k, seed, out in ((sp.train, n, cfg.seed + 1, more_train),
                                    (sp.val, m, cfg.seed, more_calib)):
            chunks = chunk_documents(docs_, tokenizer, block_size=cfg.block_size, max_chunks=k, seed=seed)
            if chunks:
                out.append(torch.tensor(chunks, dtype=torch.long))
        splits[src.name] = sp
        sources[src.name] = {"documents": len(docs), "train_documents": len(sp.train),
                             "val_ids": [d.id for d in sp.val], "test_ids": [d.id for d in sp.test]}
    short = _short_texts(tokenizer, [s.train for s in splits.values()], cfg.router.short_texts, cfg)
    short_calib = _short_texts(tokenizer, [s.val for s in splits.values()], cfg.router.short_texts // 5, cfg)
    return RouterText(torch.cat(more_train), torch.cat(more_calib), short, short_calib, sources)


def _short_texts(tokenizer, doc_lists: list[list[Document]], limit: int, cfg: TrainConfig) -> list[list[int]]:
    """Up to `limit` short texts (token ids, at most the router's max_tokens), taken in turn from
    each source's documents: short views, and about one in four the documents' own questions."""
    if limit <= 0:
        return []
    rng = random.Random(cfg.seed)
    pools = []
    for docs in doc_lists:
        docs = list(docs)
        rng.shuffle(docs)
        views, questions = [], []
        for doc in docs[:400]:  # bounded: PubMed has ~25k training abstracts
            views += short_views(doc.text, limit=3, seed=cfg.seed)
            questions += questions_in(doc.text)[:2]
        rng.shuffle(views)
        rng.shuffle(questions)
        pools.append(questions[: max(1, limit // (4 * len(doc_lists)))] + views)
    out: list[list[int]] = []
    seen: set[str] = set()
    while len(out) < limit and any(pools):
        for pool in pools:
            if pool and len(out) < limit:
                text = pool.pop(0)
                ids = tokenize(tokenizer, text, "router text")[: cfg.router.max_tokens]
                if ids and text not in seen:
                    seen.add(text)
                    out.append(ids)
    return out


def train_router(tl_model, tokenizer, spec: str, domain_chunks: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 cfg: TrainConfig, replay: dict | None = None,
                 short: dict[str, tuple[list, list]] | None = None) -> tuple[GatingNetwork, dict]:
    """Train the gating network on prefixes of training chunks; calibrate on validation chunks.

    With `replay` (a dict), each domain's features are also put there: the bundle keeps them so
    that adding or removing a domain later refits the router without the old domains' raw text.
    """
    lengths = router_prefix_lengths(cfg.router, cfg.block_size)
    short = short or {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    features = {name: domain_features(tl_model, spec, train_chunks, calib_chunks, lengths,
                                      *short.get(name, (None, None)), pad_id=pad)
                for name, (train_chunks, calib_chunks) in domain_chunks.items()}
    net, summary = fit_router(features, cfg.router, seed=cfg.seed)
    if replay is not None:
        replay.update(features)
    return net, {"examples": summary["examples"], "calibration_examples": summary["calibration_examples"],
                 "prefix_lengths": lengths, **summary}


def train_bundle(
    domains: list[str],
    out: str | Path,
    *,
    base: str | None = None,
    data: dict[str, Path] | None = None,
    budget: str = "quick",
    seed: int = 0,
    router_features: str | None = None,
    abstain_threshold: float | None = None,
    config: TrainConfig | None = None,
    init: str = "base",
    progress: bool = True,
    log=print,
) -> TemporalLoRA:
    """Train one adapter per domain on the frozen base, then the router; save the bundle to `out`.

    `init="shared"` first trains one adapter for `steps` steps on the union of the domains' training
    chunks (Branch-Train-Merge's seed phase) and starts every domain's adapter from it; `"base"`
    starts each from a fresh LoRA. The manifest records each adapter's init.
    """
    if init not in TRAIN_INITS:
        raise InputError(f"unknown init {init!r}; choose from {', '.join(TRAIN_INITS)}")
    out = Path(out)
    data = {k: Path(v) for k, v in (data or {}).items()}
    domains = validate_domains(list(domains))
    for name in data:
        if name not in domains:
            raise InputError(f"--data names domain {name!r} which is not in --domains")
    check_output_dir(out)
    cfg = config or budget_config(budget, seed)
    overrides = {k: v for k, v in (("features", router_features), ("abstain_threshold", abstain_threshold))
                 if v is not None and v != ""}
    if overrides:  # a copy: the caller's config stays as it was
        cfg = replace(cfg, router=replace(cfg.router, **overrides))
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    datasets = {name: load_domain_data(name, data, cfg.seed) for name in domains}  # fail fast on bad corpora
    timing["load_corpora"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, tokenizer, base_id = load_backbone(base)
    base_fp = fingerprint(model)
    spec = resolve_feature_spec(cfg.router.features, len(decoder_layers(model)))
    timing["load_base_model"] = time.perf_counter() - t0

    training, splits_info, router_data, router_short = {}, {}, {}, {}
    # Adapters are staged next to the output; under `accelerate launch` every process must see the
    # same folder (the main process writes each adapter, all of them load it), so the name is fixed.
    state = distributed_state()
    work = out.parent / f".{out.name}.adapters-work"
    if state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    state.wait_for_everyone()
    try:
        train_chunks = {}
        for name, dd in datasets.items():
            t0 = time.perf_counter()
            n_train = cfg.steps * cfg.batch_size
            train_chunks[name] = chunks_tensor(dd.splits.train, tokenizer, cfg, n_train, cfg.seed,
                                               f"{name} train split")
            rt = router_text(dd, tokenizer, cfg, builtin=name not in data, log=log)
            router_data[name] = (rt.train, rt.calib)
            router_short[name] = (rt.short, rt.short_calib)
            splits_info[name] = dd.split_summary() | ({"router_sources": rt.sources} if rt.sources else {})
            timing[f"chunk_{name}"] = time.perf_counter() - t0
        seed_dir, seed_info = None, {"init": "base"}
        if init == "shared":
            # Round-robin over the domains, so every step of the seed phase sees all of them.
            union = [row for rows in zip(*(c.tolist() for c in train_chunks.values()), strict=False)
                     for row in rows][: cfg.steps * cfg.batch_size]
            log(f"shared seed phase: one adapter on the union of {len(domains)} domains ({cfg.steps} steps)")
            t0 = time.perf_counter()
            seed_dir = work / ".shared-seed"  # '.' starts no domain name
            train_adapter(model, union, seed_dir, cfg, desc="shared", progress=progress)
            timing["adapter_shared_seed"] = time.perf_counter() - t0
            seed_info = {"init": "shared", "shared_steps": cfg.steps}
        for i, (name, dd) in enumerate(datasets.items()):
            log(f"[{i + 1}/{len(datasets)}] training adapter '{name}' on {len(train_chunks[name])} chunks "
                f"of {cfg.block_size} tokens ({cfg.steps} steps)")
            t0 = time.perf_counter()
            summary = train_adapter(model, train_chunks[name].tolist(), work / name, cfg, desc=name,
                                    progress=progress, init_from=seed_dir)
            timing[f"adapter_{name}"] = time.perf_counter() - t0
            training[name] = summary | {"source": dd.source, "seed": cfg.seed} | seed_info
        if fingerprint(model) != base_fp:  # adapters must never touch the base
            raise RuntimeError("base model weights changed during adapter training")

        log(f"training router on '{spec}' features")
        t0 = time.perf_counter()
        replay: dict = {}
        router, router_summary = train_router(model, tokenizer, spec, router_data, cfg, replay=replay,
                                              short=router_short)
        timing["router"] = time.perf_counter() - t0

        info = {"training": training, "router_training": router_summary, "data": splits_info,
                "train_config": cfg.to_dict(), "timing": {k: round(v, 2) for k, v in timing.items()},
                "history": [{"version": 1, "time": datetime.now(UTC).isoformat(timespec="seconds"),
                             "change": "train", "domains": list(domains)}]}
        tl = TemporalLoRA.assemble(model, tokenizer, base_id=base_id, adapter_dirs={d: work / d for d in domains},
                                   router=router, router_config=cfg.router, feature_spec=spec, info=info,
                                   base_fingerprint=base_fp)
        tl.replay = replay
        t0 = time.perf_counter()
        # Under `accelerate launch` every process gets here with identical weights; one writes
        # (the others wait for it at the barrier below before returning).
        if state.is_main_process:
            tl.save_pretrained(out)
        tl.info["timing"]["save_bundle"] = round(time.perf_counter() - t0, 2)
    finally:
        state.wait_for_everyone()
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
    return tl
