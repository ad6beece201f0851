"""The router's replay memory: the pooled base-model features each domain's router examples produced.

The router is a small MLP over mean-pooled hidden states of the *frozen* base model, so a domain's
features never change once computed. Keeping them in the bundle (`router/replay.safetensors`,
float16) lets `add-domain` / `remove-domain` refit the router on every old domain without reading
its raw text again: only the new domain's text goes through the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from temporal_lora.errors import BundleError
from temporal_lora.routing.features import pool_prefixes, prefix_features, token_features
from temporal_lora.routing.gating import GatingNetwork
from temporal_lora.text import pad_batch

REPLAY_FILE = "router/replay.safetensors"
# Optional parts: features [n, dim] of short texts (headings, first sentences, single lines,
# questions; corpora/views.py), each read whole. Replay files without them load as before.
SHORT_PARTS = ("short", "short_calib")


def domain_features(model, spec: str, train_chunks: torch.Tensor, calib_chunks: torch.Tensor,
                    lengths: list[int], short: list[list[int]] | None = None,
                    short_calib: list[list[int]] | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Router features of one domain: {"train": [L, n, dim], "calib": [L, m, dim]} over prefix lengths,
    plus {"short": [k, dim], "short_calib": [j, dim]} for short texts (token ids) when given."""
    out = {"train": prefix_features(model, spec, train_chunks, lengths),
           "calib": prefix_features(model, spec, calib_chunks, lengths)}
    for part, seqs in (("short", short), ("short_calib", short_calib)):
        if seqs:
            out[part] = text_features(model, spec, seqs, pad_id)
    return out


@torch.no_grad()
def text_features(model, spec: str, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Pooled features [n, dim] of whole token sequences (right-padded), as routing reads an input."""
    out = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths batch with little padding
    for start in range(0, len(order), batch_size):
        rows = [seqs[i] for i in order[start:start + batch_size]]
        ids, mask = pad_batch(rows, pad_id, left=False)
        out.append(pool_prefixes(token_features(model, spec, ids, mask), mask))
    feats = torch.cat(out)
    return feats[torch.argsort(torch.tensor(order))]


def save_replay(path: Path, features: dict[str, dict[str, torch.Tensor]], lengths: list[int]) -> None:
    """Write the memory as float16 safetensors; keys are '<domain>.train' and '<domain>.calib'."""
    tensors = {f"{d}.{part}": t.to(torch.float16).contiguous() for d, f in features.items() for part, t in f.items()}
    # One metadata key: safetensors writes several in a random order, and a bundle's files must be
    # byte-identical when nothing changed (checksums, round trips).
    meta = {"replay": json.dumps({"domains": list(features), "prefix_lengths": list(lengths)})}
    save_file(tensors, str(path), metadata=meta)


def load_replay(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[int]]:
    """Read a replay memory: ({domain: {"train", "calib"}}, prefix lengths)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            info = json.loads(meta["replay"])
            domains, lengths = info["domains"], info["prefix_lengths"]
            keys = set(fh.keys())
            features = {d: {part: fh.get_tensor(f"{d}.{part}") for part in ("train", "calib", *SHORT_PARTS)
                            if part in ("train", "calib") or f"{d}.{part}" in keys} for d in domains}
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"router replay memory {path} is unreadable: {exc}") from exc
    return features, lengths


def replay_accuracy(net: GatingNetwork, features: dict[str, dict[str, torch.Tensor]], labels: dict[str, int],
                    part: str = "calib") -> dict[str, float]:
    """Per-domain accuracy of `net` on stored features (all prefix lengths), domain -> share correct."""
    out = {}
    with torch.no_grad():
        for domain, f in features.items():
            x = f[part].float().flatten(0, 1)
            pred = net(x).argmax(-1)
            out[domain] = round(float((pred == labels[domain]).float().mean()), 4)
    return out
