"""Add a subdomain under a domain: one child adapter plus a refit of the parent's sub-router.

The child's adapter starts by default from the parent's adapter (it specialises it), the
parent's sub-router is refit on its replay memory plus the new child, and a new bundle version
is written in which every other file is byte-identical (routing/hierarchy.py routes to it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from temporal_lora.bundle import safe_path
from temporal_lora.config import RunContext, TrainConfig, router_prefix_lengths
from temporal_lora.conversations import load_user_texts, split_conversations
from temporal_lora.corpora import source_of
from temporal_lora.corpora.subdomains import load_builtin_subdomain
from temporal_lora.data import Splits, split_like_parent
from temporal_lora.errors import InputError
from temporal_lora.evolve.common import Addition, check_kept, place_adapter
from temporal_lora.routing.gating import fit_router
from temporal_lora.routing.hierarchy import DEFAULT_FALLBACK, SubRouter, route_name
from temporal_lora.routing.replay import replay_accuracy
from temporal_lora.storage import (
    read_hierarchy,
    read_splits,
    subadapter_folder,
    subrouter_folder,
    write_subrouter,
)
from temporal_lora.text import pad_id
from temporal_lora.train import DomainData, router_features, router_text, validate_domains
from temporal_lora.versions import commit, copy_files

INITS = ("parent", "base")


def add_subdomain(bundle: str | Path, parent: str, name: str, *, data: str | Path | None = None,
                  corpus: str | None = None, budget: str | None = None, seed: int | None = None,
                  config: TrainConfig | None = None, init: str = "parent", fallback_threshold: float | None = None,
                  base: str | None = None, run: RunContext | None = None, progress: bool | None = None,
                  log: Callable[[str], object] | None = None) -> dict:
    """Train an adapter for `parent/name`, refit the parent's sub-router, save a new bundle version.

    `init="parent"` starts the child's LoRA from the parent's adapter (it specialises it);
    `init="base"` trains it from scratch like a domain adapter. Every existing file of the bundle
    except the parent's sub-router is carried over byte for byte.

    Settings: `config`, or preset `budget` with `seed` (default: the bundle's own); a budget or seed
    that disagrees with a given config is an InputError (config.settings_for). `run` says how to
    report (progress bars, log lines); `progress`/`log`, if given, override its fields.
    """
    run = RunContext.of(run, progress=progress, log=log)
    if init not in INITS:
        raise InputError(f"init must be 'parent' or 'base', got {init!r}")
    add = Addition(bundle, budget=budget, seed=seed, config=config, keep_adapter_shape=init == "parent")
    bundle, manifest, cfg = add.bundle, add.manifest, add.cfg
    if parent not in manifest["domains"]:
        raise InputError(f"bundle {bundle} has no domain {parent!r}; it has {', '.join(manifest['domains'])}")
    validate_domains([name])
    if fallback_threshold is not None and not 0 <= fallback_threshold <= 1:
        raise InputError(f"fallback threshold must be in [0, 1], got {fallback_threshold}")
    if (data is None) == (corpus is None):
        raise InputError("give exactly one of --data or --corpus")
    if corpus is not None and corpus != name:
        raise InputError(f"--corpus {corpus!r} must equal the subdomain name (built-in subdomains are named)")
    old = read_hierarchy(bundle, manifest)
    sub = old.subs.get(parent)
    children = list(sub.children) if sub else []
    label = route_name(parent, name)
    if name in children:
        raise InputError(f"{label!r} is already in bundle {bundle}")
    threshold = fallback_threshold if fallback_threshold is not None else (
        sub.fallback_threshold if sub else DEFAULT_FALLBACK)

    with add.timed("load_corpus"):
        convs = []
        if data is not None:
            (docs, convs), source = load_user_texts(data), source_of(name, data)
        else:
            docs, source = load_builtin_subdomain(parent, name), f"builtin:{label}"
        splits, aligned = split_like_parent(docs, read_splits(bundle, manifest.get("data")).get(parent), cfg.seed) \
            if docs or not convs else (Splits([], [], []), False)
        dd = DomainData(label, source, splits, 0, split_conversations(convs, cfg.seed) if convs else None)
    add.load_model(base)
    lengths = old.lengths.get(parent) or manifest["router"].get("training", {}).get("prefix_lengths") or \
        router_prefix_lengths(add.router_cfg, cfg.block_size)
    train_chunks, train_convs = add.rows(dd, label)
    # The sub-router reads windows of the documents, their short views and own questions (the shapes
    # short user inputs take) and user turns; no other sources. Short texts only when every earlier
    # child has them too (older bundles' children do not): a sub-router that saw short texts of one
    # child alone would send every short input there.
    old_replay = old.replay.get(parent, {})
    short = cfg.router.short_texts if all("short" in old_replay[c] for c in children) else 0
    with add.timed("chunk"):
        rt = router_text(dd, add.tokenizer, replace(cfg, router=replace(cfg.router, extra_sources=False,
                                                                        short_texts=short)), builtin=False)

    # Trained in the system temp dir (as add-domain does), so a killed run leaves nothing beside the bundle.
    work = Path(tempfile.mkdtemp(prefix=f"tlora-sub-{parent}-{name}-"))
    try:
        init_from = safe_path(bundle, manifest["adapters"][parent]["path"]) if init == "parent" else None
        run.log(f"training adapter '{label}' on {len(train_chunks)} chunks of {cfg.block_size} tokens "
                f"({cfg.steps} steps, from the {'parent adapter' if init_from else 'base model'})")
        summary = add.train(train_chunks, work / name, label, run=run, init_from=init_from,
                            conversations=train_convs)

        with add.timed("router"):
            replay = dict(old_replay)
            pad = pad_id(add.tokenizer)
            replay[name] = router_features(add.model, add.spec, rt, lengths, pad, min_rows=cfg.router_chunks,
                                           with_short=short > 0)
            children = [*children, name]
            router, router_summary = None, {}
            if len(children) >= 2:
                router, router_summary = fit_router({c: replay[c] for c in children}, add.router_cfg, seed=cfg.seed)
                router_summary["calibration_accuracy_by_child"] = replay_accuracy(
                    router, {c: replay[c] for c in children}, {c: i for i, c in enumerate(children)})
            else:
                run.log(f"'{parent}' has one subdomain: its texts keep the parent adapter until a second one is added")

        sub_splits = dict(old.splits.get(parent, {}))
        sub_splits[name] = {"source": source, "aligned_with_parent": aligned,
                            "documents": len(splits.train) + len(splits.val) + len(splits.test),
                            "train_documents": len(splits.train), "val_ids": [d.id for d in splits.val],
                            "test_ids": [d.id for d in splits.test],
                            **({"conversations": dd.conversations.summary()} if dd.conversations else {})}
        new_sub = SubRouter(parent, children, router, threshold)
        training = summary | {"source": source, "seed": cfg.seed, "init": init}
        prefix = f"{subrouter_folder(parent)}/"

        def fill(tmp: Path, old_manifest: dict) -> dict:
            new = json.loads(json.dumps(old_manifest))
            copy_files(bundle, [r for r in old_manifest["files"] if not r.startswith(prefix)], tmp)
            entry = new.setdefault("subdomains", {}).setdefault(
                parent, {"children": [], "adapters": {}, "router": {}})
            entry["adapters"][name] = place_adapter(work / name, tmp, subadapter_folder(parent, name), training)
            entry["router"] = {"features": add.spec, "config": asdict(add.router_cfg),
                               "training": router_summary | {"prefix_lengths": list(lengths)}}
            write_subrouter(tmp, entry, new_sub, replay, lengths, sub_splits)
            return new

        with add.timed("save"):
            result = commit(bundle, fill, {"change": "add-subdomain", "domain": label, "source": source})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The promise: nothing but the parent's sub-router changed.
    check_kept(manifest["files"], result["files"], lambda rel: not rel.startswith(prefix), "bundle file",
               "adding a subdomain")
    return {"version": result["version"], "parent": parent, "subdomain": name, "children": children,
            "aligned_with_parent": aligned, "fallback_threshold": threshold, "router_training": router_summary,
            "adapter_training": summary, "split": {k: v for k, v in sub_splits[name].items() if not k.endswith("_ids")},
            "timing": add.rounded_timing()}
