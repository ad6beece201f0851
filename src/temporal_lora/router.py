"""The router: features pooled from the frozen base model, a small gating network, calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from temporal_lora.backbone import decoder_layers
from temporal_lora.config import RouterConfig
from temporal_lora.errors import InputError


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the wanted layer has run."""


def resolve_feature_spec(spec: str, n_layers: int) -> str:
    """Normalise 'embeddings' / 'hidden:L' (L=-1 -> a lower-middle layer) to a concrete spec."""
    if spec == "embeddings":
        return spec
    kind, _, layer = spec.partition(":")
    if kind != "hidden" or not layer.lstrip("-").isdigit():
        raise InputError(f"unknown router features {spec!r}; use 'embeddings' or 'hidden:LAYER'")
    index = int(layer)
    if index == -1:
        index = n_layers // 4 + 1  # 8 of 30 for SmolLM2, 2 of 4 for the tiny test models
    if not 1 <= index <= n_layers:
        raise InputError(f"router layer {index} out of range 1..{n_layers}")
    return f"hidden:{index}"


@torch.no_grad()
def token_features(model: nn.Module, spec: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token features [batch, seq, dim] of the *base* model (no adapter is applied here).

    For `hidden:L` the forward stops right after layer L: the upper layers are never computed.
    Inputs must be right-padded so that real tokens keep their positions.
    """
    if spec == "embeddings":
        return model.get_input_embeddings()(input_ids)
    layer = int(spec.split(":")[1])
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer - 1].register_forward_hook(grab)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def pool_prefixes(features: torch.Tensor, attention_mask: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """Mean-pool token features over prefixes.

    Position 0 is left out whenever there is more than one token: decoder models park a huge
    activation there (an attention sink; norm ~23,500 vs ~160 in SmolLM2's layer 15).
    With `lengths`, returns [len(lengths), batch, dim], the mean over the first n tokens of each
    sample (capped at its real length) — one causal forward gives the features of every prefix.
    Without, returns [batch, dim] over each sample's full length.
    """
    mask = attention_mask.to(features.dtype)
    real = mask.sum(dim=1).long()  # tokens per sample
    csum = torch.cumsum(features * mask.unsqueeze(-1), dim=1)
    first = features[:, 0]
    wanted = [None] if lengths is None else lengths
    out = []
    for n in wanted:
        ends = real if n is None else torch.clamp(real, max=n)
        idx = (ends - 1).clamp(min=0)
        total = csum[torch.arange(len(ends)), idx]
        without_first = (total - first) / (ends - 1).clamp(min=1).unsqueeze(-1).to(features.dtype)
        pooled = torch.where((ends > 1).unsqueeze(-1), without_first, first)
        out.append(pooled)
    stacked = torch.stack(out)
    return stacked[0] if lengths is None else stacked


@torch.no_grad()
def prefix_features(model, spec: str, chunks: torch.Tensor, lengths: list[int], batch_size: int = 16) -> torch.Tensor:
    """Router features for every prefix length of every chunk: [len(lengths), n_chunks, dim]."""
    out = []
    for start in range(0, len(chunks), batch_size):
        x = chunks[start : start + batch_size]
        mask = torch.ones_like(x)
        out.append(pool_prefixes(token_features(model, spec, x, mask), mask, lengths))
    return torch.cat(out, dim=1)


class GatingNetwork(nn.Module):
    """Standardise features, then a one-hidden-layer MLP (or linear) to logits over domains."""

    def __init__(self, in_dim: int, n_domains: int, hidden_dim: int = 128):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("temperature", torch.ones(()))
        if hidden_dim > 0:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, n_domains))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, n_domains))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.feature_mean) / self.feature_std
        return self.net(z)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities."""
        return torch.softmax(self.logits(features) / self.temperature, dim=-1)


@dataclass
class RouterTrainResult:
    train_accuracy: float
    calib_accuracy: float
    temperature: float
    nll_before: float
    nll_after: float


def train_gating(
    net: GatingNetwork,
    feats: torch.Tensor,
    labels: torch.Tensor,
    calib_feats: torch.Tensor,
    calib_labels: torch.Tensor,
    cfg: RouterConfig,
    seed: int = 0,
) -> RouterTrainResult:
    """Fit the gating network (full batch, AdamW), then temperature-scale on held-out features."""
    torch.manual_seed(seed)
    feats = feats.float()
    net.feature_mean.copy_(feats.mean(dim=0))
    net.feature_std.copy_(feats.std(dim=0).clamp(min=1e-4))
    opt = torch.optim.AdamW(net.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net.logits(feats), labels)
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_acc = float((net.logits(feats).argmax(-1) == labels).float().mean())
        calib_logits = net.logits(calib_feats.float())
        before = float(nn.functional.cross_entropy(calib_logits, calib_labels))
        temperature, after = fit_temperature(calib_logits, calib_labels)
        net.temperature.fill_(temperature)
        calib_acc = float((calib_logits.argmax(-1) == calib_labels).float().mean())
    return RouterTrainResult(train_acc, calib_acc, temperature, before, after)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Temperature scaling: the T in a log-spaced grid that minimises held-out NLL."""
    grid = torch.logspace(-1.5, 1.5, 121)
    nlls = torch.stack([nn.functional.cross_entropy(logits / t, labels) for t in grid])
    best = int(nlls.argmin())
    return float(grid[best]), float(nlls[best])
