"""The gating network: standardised features -> a small MLP -> calibrated probabilities over domains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from temporal_lora.config import RouterConfig
from temporal_lora.errors import BundleError


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
    weights: torch.Tensor | None = None,
) -> RouterTrainResult:
    """Fit the gating network (full batch, AdamW), then temperature-scale on held-out features.

    `weights` (one per training row) weigh the loss, e.g. a user's route examples above replay rows."""
    torch.manual_seed(seed)
    feats = feats.float()
    net.feature_mean.copy_(feats.mean(dim=0))
    net.feature_std.copy_(feats.std(dim=0).clamp(min=1e-4))
    opt = torch.optim.AdamW(net.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            opt.zero_grad()
            if weights is None:
                loss = nn.functional.cross_entropy(net.logits(feats), labels)
            else:
                per_row = nn.functional.cross_entropy(net.logits(feats), labels, reduction="none")
                loss = (per_row * weights).sum() / weights.sum()
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


def fit_router(features: dict[str, dict[str, torch.Tensor]], router_cfg: RouterConfig,
               seed: int = 0, examples: dict[str, torch.Tensor] | None = None,
               example_weight: float = 1.0) -> tuple[GatingNetwork, dict]:
    """Train a gating network on every class's stored features (label = position in `features`).

    `features[name]` is {"train": [L, n, dim], "calib": [L, m, dim]} over prefix lengths (replay.py),
    optionally with "short" / "short_calib" ([k, dim]: headings, lines, questions).
    `examples[name]` ([k, dim], optional) are a user's route examples: training rows whose loss
    counts `example_weight` times a replay row's (examples of names not in `features` are ignored).
    """
    feats, labels, cfeats, clabels = [], [], [], []
    for label, f in enumerate(features.values()):
        # Windows' prefix features [L, n, dim] and, where stored, short texts' features [k, dim].
        x = torch.cat([f["train"].float().flatten(0, 1), *([f["short"].float()] if "short" in f else [])])
        c = torch.cat([f["calib"].float().flatten(0, 1), *([f["short_calib"].float()] if "short_calib" in f else [])])
        feats.append(x)
        cfeats.append(c)
        labels.append(torch.full((len(x),), label))
        clabels.append(torch.full((len(c),), label))
    weights = None
    n_replay = int(sum(len(x) for x in feats))
    user = {name: t for name, t in (examples or {}).items() if name in features and len(t)}
    if user:
        names = list(features)
        for name, t in user.items():
            feats.append(t.float())
            labels.append(torch.full((len(t),), names.index(name)))
        weights = torch.cat([torch.ones(n_replay), torch.full((int(sum(len(t) for t in user.values())),),
                                                              float(example_weight))])
    x, y = torch.cat(feats), torch.cat(labels)
    # Seeded before the network is built: its initial weights must not depend on what drew random
    # numbers before (adapter training), or the same rows would give another router in each recipe.
    torch.manual_seed(seed)
    net = GatingNetwork(x.shape[1], len(features), router_cfg.hidden_dim)
    result = train_gating(net, x, y, torch.cat(cfeats), torch.cat(clabels), router_cfg, seed=seed, weights=weights)
    summary = {
        "examples": n_replay,
        "calibration_examples": int(sum(len(c) for c in cfeats)),
        **({"user_examples": int(sum(len(t) for t in user.values())), "user_example_weight": float(example_weight)}
           if user else {}),
        "train_accuracy": round(result.train_accuracy, 4),
        "calibration_accuracy": round(result.calib_accuracy, 4),
        "temperature": round(result.temperature, 4),
        "calibration_nll_before": round(result.nll_before, 4),
        "calibration_nll_after": round(result.nll_after, 4),
    }
    return net.eval(), summary


def save_gating(net: GatingNetwork, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def load_gating(path: Path, in_dim: int, n_outputs: int, hidden_dim: int) -> GatingNetwork:
    """A gating network from safetensors; a shape that does not match is a BundleError."""
    net = GatingNetwork(in_dim, n_outputs, hidden_dim)
    try:
        net.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise BundleError(f"router weights {Path(path).name} do not match the manifest: {exc}") from exc
    return net.eval()
