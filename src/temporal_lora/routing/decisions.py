"""From router probabilities to decisions and adapter weights: the one place that decides routes.

`plan_routes` is what every generation path uses (library `generate`, the server's engine): the
top-level decision, the subdomain below it when the bundle has any, and the adapter weights over
every adapter the mixer holds. `route_texts` is what `tlora route` and `/v1/route` answer. Both
take the `TemporalLoRA` facade (duck-typed: this layer sits below it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from temporal_lora.errors import InputError
from temporal_lora.routing.hierarchy import SubDecision, display_name
from temporal_lora.routing.segments import SegmentConfig, SegmentRouter
from temporal_lora.routing.styles import StyleChoice, apply_styles

MODES = ("hard", "soft", "topk")


@dataclass
class RouteDecision:
    """What the router decided for one input. `domain` is None when it abstained."""

    domain: str | None
    probs: dict[str, float]
    confidence: float
    abstained: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RoutePlan:
    """Routes of a batch and the adapter weights they imply.

    `weights` is [n, n_adapters] over every adapter the mixer holds (domains, then subdomains);
    `named` is each row as {'domain' or 'domain/child': weight}; `decisions` is None per row when
    the adapter was forced; `subdecisions` holds the second level (bundles with subdomains, hard mode).
    """

    decisions: list[RouteDecision | None]
    weights: torch.Tensor
    named: list[dict[str, float]]
    subdecisions: list[SubDecision | None]
    styles: list[StyleChoice | None] | None = None  # the style used per row (routing/styles.py)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def decide(probs: torch.Tensor, domains: list[str], threshold: float) -> list[RouteDecision]:
    """One decision per row of calibrated probabilities; below `threshold` the router abstains."""
    result = []
    for row in probs:
        conf, idx = float(row.max()), int(row.argmax())
        abstained = conf < threshold
        result.append(RouteDecision(domain=None if abstained else domains[idx],
                                    probs=named_row(domains, row), confidence=round(conf, 6),
                                    abstained=abstained))
    return result


def mix_weights(probs: torch.Tensor, mode: str, top_k: int, threshold: float) -> torch.Tensor:
    """Adapter weights [n, n_domains] for a routing mode; abstained rows are all zero (base model)."""
    check_mode(mode)
    keep = probs.max(dim=1).values >= threshold
    if mode == "hard":
        w = torch.zeros_like(probs).scatter(1, probs.argmax(dim=1, keepdim=True), 1.0)
    elif mode == "soft":
        w = probs.clone()
    else:
        k = max(1, min(top_k, probs.shape[1]))
        top = probs.topk(k, dim=1)
        w = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        w = w / w.sum(dim=1, keepdim=True)
    return w * keep.unsqueeze(1).to(w.dtype)


def named_row(names: list[str], row: torch.Tensor) -> dict[str, float]:
    """One row of per-name values as {name: value} for JSON ('~' in adapter names shown as '/')."""
    return {display_name(n): round(float(x), 6) for n, x in zip(names, row, strict=True)}


def forced_weights(adapters: list[str], name: str | None, n: int) -> torch.Tensor:
    """Weights [n, len(adapters)] forcing one adapter: 'domain' or 'domain/child'; None or 'base'
    forces none (the base model)."""
    w = torch.zeros(n, len(adapters))
    if name is None or name == "base":
        return w
    shown = [display_name(a) for a in adapters]
    if name not in shown:
        domains = [a for a in shown if "/" not in a]
        raise InputError(f"unknown domain {name!r}; this bundle has {', '.join(domains)}")
    w[:, shown.index(name)] = 1.0
    return w


@torch.no_grad()
def plan_routes(tl, route_ids: list[list[int]], *, mode: str = "hard", top_k: int = 2,
                domain: str | None = None, style: str | list[str | None] | None = None) -> RoutePlan:
    """Route a batch (or force `domain`) and give the adapter weights every generation path applies.

    Hard routing in a bundle with subdomains goes down a level: the subdomain's adapter, or the
    parent's after a fallback. Soft and top-k mixes stay over the domains. `style` (one for all
    rows or one per row; 'auto' reads the prompt's register; None = each domain's default) then
    swaps a domain's adapter for its style adapter (routing/styles.py).
    """
    plan = _plan_domains(tl, route_ids, mode=mode, top_k=top_k, domain=domain)
    styles = getattr(tl, "styles", None)
    requested = list(style) if isinstance(style, list | tuple) else [style] * len(route_ids)
    if len(requested) != len(route_ids):
        raise InputError(f"{len(requested)} styles for {len(route_ids)} prompts")
    if styles is None and all(r is None for r in requested):
        return plan
    texts = [tl.tokenizer.decode(ids) if r == "auto" else "" for ids, r in zip(route_ids, requested, strict=True)]
    w, choices = apply_styles(styles, tl.mixer.adapter_names, plan.weights, requested, texts)
    return RoutePlan(plan.decisions, w, [named_row(tl.mixer.adapter_names, r) for r in w], plan.subdecisions,
                     choices)


def _plan_domains(tl, route_ids: list[list[int]], *, mode: str, top_k: int, domain: str | None) -> RoutePlan:
    check_mode(mode)
    adapters = tl.mixer.adapter_names
    n = len(route_ids)
    if domain:
        w = forced_weights(adapters, domain, n)
        return RoutePlan([None] * n, w, [named_row(adapters, r) for r in w], [None] * n)
    feats = tl.route_features(route_ids)
    probs = tl.router_probs(feats, route_ids)
    threshold = tl.router_config.abstain_threshold
    decisions = decide(probs, tl.domains, threshold)
    top = mix_weights(probs, mode, top_k, threshold)
    w = torch.zeros(n, len(adapters))
    w[:, : len(tl.domains)] = top
    subs: list[SubDecision | None] = [None] * n
    if tl.hierarchy is not None and mode == "hard":
        subs = tl.hierarchy.decide([d.domain for d in decisions], feats)
        w.zero_()
        for row, sub in enumerate(subs):
            if sub.adapter is not None:
                w[row, adapters.index(sub.adapter)] = 1.0
    return RoutePlan(decisions, w, [named_row(adapters, r) for r in w], subs)


def route_texts(tl, texts: list[str], *, segments: SegmentConfig | None = None,
                fallback_threshold: float | None = None) -> list[dict]:
    """The routing answer for each text, as JSON-ready dicts: the decision (domain, probs,
    confidence, abstained); with subdomains also subdomain, route, subdomain_probs,
    subdomain_confidence and fallback; with `segments` also the text's segment-by-segment routes
    (`segments`, `switches`, `domains`). `tlora route` and `/v1/route` print exactly this."""
    ids = tl.encode(texts)
    feats = tl.route_features(ids)
    probs = tl.router_probs(feats, ids)
    rows = [d.to_dict() for d in decide(probs, tl.domains, tl.router_config.abstain_threshold)]
    if tl.hierarchy is not None:
        subs = tl.hierarchy.decide([r["domain"] for r in rows], feats, fallback_threshold)
        for row, sub in zip(rows, subs, strict=True):
            row.update({k: v for k, v in sub.to_dict().items() if k != "domain"})
    if segments is not None:
        router = SegmentRouter(tl, segments)
        for row, text in zip(rows, texts, strict=True):
            found = router.route(text)
            row.update(segments=[s.to_dict() for s in found], switches=sum(s.switched for s in found),
                       domains=list(dict.fromkeys(s.domain for s in found)))
    return rows
