"""What adding one adapter to a bundle takes, shared by add-domain and add-subdomain: the
training settings derived from the bundle, the base model it was trained on (verified), the
new text's chunks, and one adapter trained on them without touching the base."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from temporal_lora.adapters import train_adapter
from temporal_lora.backbone import fingerprint, load_backbone
from temporal_lora.bundle import read_manifest
from temporal_lora.config import PRESETS, RouterConfig, RunContext, TrainConfig, settings_for
from temporal_lora.errors import BaseModelMismatchError, BundleError
from temporal_lora.routing.abstain import choose_from_replay
from temporal_lora.routing.lexical import fit_router_lexical, hash_texts, hashed_rows
from temporal_lora.storage import read_lexical
from temporal_lora.train import DomainData, conversation_tokens, training_rows


def bundle_train_config(manifest: dict) -> TrainConfig:
    """The TrainConfig a bundle was trained with (defaults for whatever an old manifest lacks)."""
    return TrainConfig.from_dict(manifest.get("train_config"), manifest["router"].get("config"))


def derive_config(manifest: dict, *, budget: str | None, seed: int | None, config: TrainConfig | None,
                  keep_adapter_shape: bool = False) -> TrainConfig:
    """Settings for one more adapter: the given config, or the budget's preset (default: the
    bundle's own budget and seed). A budget or seed that disagrees with a given config is an
    InputError (config.settings_for). The block size is always the bundle's (its replay memory was
    computed on blocks of that size); `keep_adapter_shape` also keeps the bundle's LoRA shape (an
    adapter that starts from an existing one needs it). The caller's config is never modified."""
    own = bundle_train_config(manifest)
    cfg = settings_for(config, budget, seed, PRESETS, default_budget=own.budget if own.budget in PRESETS else "quick",
                       default_seed=own.seed)
    changes: dict = {"block_size": own.block_size}
    if keep_adapter_shape:
        changes["adapter"] = own.adapter
    return replace(cfg, **changes)


def load_base_for(manifest: dict, base: str | None):
    """The bundle's base model (or `base`, which must have the same weights) and tokenizer."""
    model, tokenizer, _ = load_backbone(base or manifest["base_model"]["id"])
    if fingerprint(model) != manifest["base_model"]["fingerprint"]:
        raise BaseModelMismatchError(f"the bundle was trained on base model {manifest['base_model']['id']!r}; "
                                     "the model given has different weights")
    return model, tokenizer


class Addition:
    """One adapter being added to `bundle`; times each step into `timing`."""

    def __init__(self, bundle: str | Path, *, budget: str | None, seed: int | None, config: TrainConfig | None,
                 keep_adapter_shape: bool = False):
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle)
        self.cfg = derive_config(self.manifest, budget=budget, seed=seed, config=config,
                                 keep_adapter_shape=keep_adapter_shape)
        self.spec = self.manifest["router"]["features"]
        self.router_cfg = RouterConfig(**self.manifest["router"]["config"])
        self.timing: dict[str, float] = {}
        self.model = self.tokenizer = None

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """`with addition.timed("adapter"): ...` adds the block's seconds to timing[step]."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timing[step] = self.timing.get(step, 0.0) + time.perf_counter() - t0

    def load_model(self, base: str | None) -> None:
        with self.timed("load_base_model"):
            self.model, self.tokenizer = load_base_for(self.manifest, base)

    def rows(self, dd: DomainData, label: str) -> tuple[list, list]:
        """The new adapter's training rows, drawn as first training draws them: document chunks and
        conversation rows (train.training_rows; the router's text comes from train.router_text)."""
        with self.timed("chunk"):
            return training_rows(dd, self.tokenizer, self.cfg, conversation_tokens(self.model, self.tokenizer),
                                 f"{label} train split")

    def train(self, train_chunks: torch.Tensor | list, out_dir: Path, label: str, *, run: RunContext,
              init_from: Path | None = None, conversations: list | None = None) -> dict:
        """Train the new adapter into `out_dir`; the base model must come out bit-identical."""
        chunks = train_chunks.tolist() if isinstance(train_chunks, torch.Tensor) else train_chunks
        with self.timed("adapter"):
            summary = train_adapter(self.model, chunks, out_dir, self.cfg, desc=label,
                                    run=run, init_from=init_from, conversations=conversations)
        if fingerprint(self.model) != self.manifest["base_model"]["fingerprint"]:
            raise RuntimeError("base model weights changed during adapter training")
        return summary

    def rounded_timing(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.timing.items()}


def place_adapter(trained: Path, root: Path, rel: str, training: dict) -> dict:
    """Copy a freshly trained PEFT adapter folder to `root/rel` in the version being built; returns
    its manifest entry ({"path", "config", "training"})."""
    folder = root / rel
    folder.mkdir(parents=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(trained / file, folder / file)
    return {"path": rel, "config": json.loads((folder / "adapter_config.json").read_text()), "training": training}


def check_kept(old_files: dict[str, str], new_files: dict[str, str], kept: Callable[[str], bool],
               noun: str, change: str) -> None:
    """Every old file that `kept` says stays must have exactly its old checksum in the new version
    (the promise of every change: nothing else is touched)."""
    for rel, digest in old_files.items():
        if kept(rel) and new_files.get(rel) != digest:
            raise BundleError(f"{noun} {rel} changed while {change}")


def refit_lexical(bundle: Path, manifest: dict, router, replay: dict, domains: list[str], *, seed: int,
                  new_rows: dict[str, dict[str, list[list[int]]]] | None = None, tokenizer=None,
                  examples: list[dict] | None = None, example_weight: float = 1.0) -> tuple:
    """The router's lexical head refit beside a refit gating network `router`: on the stored hashed
    rows of the kept domains plus `new_rows` (token ids of a new domain's router rows, hashed here)
    and the user's route examples (their texts). Returns (head, hashed rows, summary); (None, None,
    reason) when the bundle has no lexical replay memory (written before lexical heads) or the
    router config turns it off: the router then routes on hidden states alone."""
    if not RouterConfig(**manifest["router"]["config"]).lexical:
        return None, None, {"skipped": "router config lexical = false"}
    old, rows = read_lexical(bundle, manifest["router"], manifest["domains"])
    if old is None or rows is None:
        return None, None, {"skipped": "the bundle has no lexical replay memory"}
    rows = {d: rows[d] for d in domains if d in rows}
    for name, ids in (new_rows or {}).items():
        rows[name] = hashed_rows(tokenizer, ids, old.settings)
    if any(rows[d]["train"].shape[0] != replay[d]["train"].shape[0] * replay[d]["train"].shape[1] for d in domains):
        # A replay memory recomputed from the corpora (bundles written before it) has other rows.
        return None, None, {"skipped": "the router's replay memory was rebuilt: its rows no longer match"}
    ex: dict[str, list[str]] = {}
    for item in examples or []:
        ex.setdefault(item["domain"], []).append(item["text"])
    hashed_ex = {d: hash_texts(t, old.settings) for d, t in ex.items() if d in domains}
    head, summary = fit_router_lexical(router, {d: replay[d] for d in domains}, rows, seed=seed,
                                       examples=hashed_ex, example_weight=example_weight, settings=old.settings)
    return head, rows, summary


def rechoose_abstain(router_config: dict, router, replay: dict, lengths: list[int], lexical: tuple,
                     examples: list[dict], feats: dict) -> tuple[dict, dict | None]:
    """After a refit: with `abstain_auto` in the bundle's router config, the threshold chosen again
    on the kept domains' calibration rows and the stored out-of-scope examples (domain 'none').
    Returns (router config changes, report); ({}, None) when the bundle's threshold is fixed."""
    if not router_config.get("abstain_auto"):
        return {}, None
    oos = [i for i in examples if i["domain"] == "none"]
    oos_feats = torch.stack([feats[i["id"]].float() for i in oos]) if oos else None
    threshold, report = choose_from_replay(router, replay, lengths, oos_feats, lexical=lexical[0],
                                           lexical_rows=lexical[1], oos_texts=[i["text"] for i in oos])
    return {"abstain_threshold": threshold}, report
