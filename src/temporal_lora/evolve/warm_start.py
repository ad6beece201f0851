"""Where a new domain's adapter starts: a fresh LoRA, the nearest existing adapter, or a blend.

Published expert-training work (Branch-Train-Merge and its clustered follow-up) finds that experts
started from a shared or related point learn more per step than experts started from scratch. A
bundle keeps only adapters and router features, never old text, so the warm starts here use
exactly that:

- `base`: a fresh LoRA (PEFT's init: B = 0, so the adapter starts as the plain base model).
- `nearest`: the existing adapter of the domain the router finds closest to the new text: the
  old router's mean probability over the new domain's router features (what it would route there).
- `blend`: the router-probability-weighted average of the existing adapters. LoRA factors of
  different adapters live in different bases (A_k B_k are only defined up to an invertible r x r
  map), so averaging A's and B's separately is meaningless; the average is taken in the delta space,
  ΔW = Σ_k p_k s_k B_k A_k (s_k = alpha_k / r_k), and re-factored to the new adapter's rank by a
  truncated SVD: B = U_r √S_r / s, A = √S_r V_rᵀ (the best rank-r approximation of the blend).

Old adapters are only read, never written: they stay byte-identical (the caller checks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from temporal_lora.errors import InputError
from temporal_lora.routing.gating import GatingNetwork

INITS = ("base", "nearest", "blend")


def check_init(init: str) -> None:
    if init not in INITS:
        raise InputError(f"unknown init {init!r}; choose from {', '.join(INITS)}")


@torch.no_grad()
def router_affinity(router: GatingNetwork, features: torch.Tensor, domains: list[str]) -> dict[str, float]:
    """Mean calibrated probability per old domain over the new text's router features ([..., dim])."""
    probs = router(features.float().reshape(-1, features.shape[-1])).mean(dim=0)
    return {d: round(float(p), 6) for d, p in zip(domains, probs, strict=True)}


def _scaling(config: dict) -> float:
    return float(config["lora_alpha"]) / float(config["r"])


def _pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """LoRA module prefix -> (lora_A key, lora_B key) of a PEFT adapter state dict."""
    out = {}
    for key in state:
        if ".lora_A." in key:
            prefix = key.split(".lora_A.")[0]
            out[prefix] = (key, key.replace(".lora_A.", ".lora_B."))
    return out


def blend_adapter(folders: dict[str, Path], weights: dict[str, float], out_dir: Path) -> Path:
    """Write a PEFT adapter folder whose delta is the best rank-r approximation of
    Σ_k weights[k] · ΔW_k over the adapters in `folders` (r, alpha and targets of the first)."""
    names = [n for n in folders if weights.get(n, 0.0) > 0]
    if not names:
        raise InputError("a blend needs at least one adapter with a positive weight")
    total = sum(weights[n] for n in names)
    configs = {n: json.loads((folders[n] / "adapter_config.json").read_text()) for n in names}
    states = {n: load_file(str(folders[n] / "adapter_model.safetensors")) for n in names}
    target = configs[names[0]]
    rank, scale = int(target["r"]), _scaling(target)
    first = states[names[0]]
    out: dict[str, torch.Tensor] = {}
    for prefix, (a_key, b_key) in _pairs(first).items():
        delta = None
        for n in names:
            if a_key not in states[n]:
                raise InputError(f"adapter {n!r} has no LoRA weights for {prefix}: targets differ, cannot blend")
            a, b = states[n][a_key].double(), states[n][b_key].double()
            d = (weights[n] / total) * _scaling(configs[n]) * (b @ a)
            delta = d if delta is None else delta + d
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:rank].sqrt()
        out[a_key] = (root.unsqueeze(1) * vh[:rank]).to(first[a_key].dtype).contiguous()
        out[b_key] = (u[:, :rank] * root.unsqueeze(0) / scale).to(first[b_key].dtype).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folders[names[0]] / "adapter_config.json", out_dir / "adapter_config.json")
    save_file(out, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def warm_start(init: str, affinity: dict[str, float], folders: dict[str, Path], work: Path) -> tuple[Path | None, dict]:
    """The adapter folder the new adapter starts from (None: a fresh LoRA) and what the manifest
    records about it. `affinity` is `router_affinity` of the new text; `folders` the old adapters."""
    check_init(init)
    if init == "base":
        return None, {"init": "base"}
    if init == "nearest":
        nearest = max(affinity, key=affinity.get)
        return folders[nearest], {"init": "nearest", "init_from": nearest, "affinity": affinity}
    return blend_adapter(folders, affinity, work / "blend-init"), {"init": "blend", "affinity": affinity}
