"""Hierarchical routing: a domain may have subdomains with their own adapters.

The top-level router picks the domain; a second gating network per parent (same frozen
base-model features, so one feature pass serves both levels) picks the subdomain. When the
sub-router's calibrated confidence is below the parent's `fallback_threshold`, the parent's own
adapter is used instead. A parent needs at least two children before its sub-router exists;
until then its texts use the parent adapter.

This module is the in-memory side; `storage.py` reads and writes it (subadapters/, subrouters/),
and `evolve/subdomains.py` adds a subdomain to a bundle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from temporal_lora.routing.gating import GatingNetwork

DEFAULT_FALLBACK = 0.6


def adapter_name(parent: str, child: str) -> str:
    """PEFT adapter name of a subdomain. '~' never occurs in a domain name, so it cannot collide."""
    return f"{parent}~{child}"


def route_name(parent: str, child: str | None) -> str:
    """How routes and weights name an adapter: 'parent' or 'parent/child'."""
    return parent if child is None else f"{parent}/{child}"


def display_name(adapter: str) -> str:
    """'parent~child' (the PEFT adapter name) as 'parent/child'; a domain's name unchanged."""
    return adapter.replace("~", "/")


@dataclass
class SubRouter:
    """The second level under one parent: children, their gating network (None below 2 children)."""

    parent: str
    children: list[str]
    router: GatingNetwork | None
    fallback_threshold: float


@dataclass
class SubDecision:
    """Two-level route of one input. `route` is 'parent/child', or 'parent' after a fallback."""

    domain: str | None
    subdomain: str | None
    route: str | None
    subdomain_probs: dict[str, float]
    subdomain_confidence: float | None
    fallback: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def adapter(self) -> str | None:
        """The PEFT adapter this route applies (None = base model)."""
        if self.domain is None:
            return None
        return adapter_name(self.domain, self.subdomain) if self.subdomain else self.domain


class Hierarchy:
    """Every parent's SubRouter, plus what the bundle records about them (manifest entries, replay)."""

    def __init__(self, subs: dict[str, SubRouter], entries: dict[str, dict], replay: dict[str, dict],
                 lengths: dict[str, list[int]], splits: dict[str, dict]):
        self.subs = subs
        self.entries = entries
        self.replay = replay
        self.lengths = lengths
        self.splits = splits

    def adapter_names(self) -> list[str]:
        return [adapter_name(p, c) for p, s in self.subs.items() for c in s.children]

    def set_threshold(self, threshold: float) -> None:
        """Use one fallback threshold under every parent from now on (e.g. a server's setting)."""
        for s in self.subs.values():
            s.fallback_threshold = threshold

    @torch.no_grad()
    def decide(self, domains: list[str | None], feats: torch.Tensor,
               fallback_threshold: float | None = None) -> list[SubDecision]:
        """Second-level decisions for inputs whose top-level domain is `domains[i]` (None = abstained).
        `fallback_threshold` overrides every parent's own threshold for this call."""
        out = []
        for domain, f in zip(domains, feats, strict=True):
            sub = self.subs.get(domain) if domain else None
            if sub is None or sub.router is None:
                out.append(SubDecision(domain, None, domain, {}, None, domain in self.subs))
                continue
            threshold = sub.fallback_threshold if fallback_threshold is None else fallback_threshold
            probs = sub.router(f.unsqueeze(0))[0]
            conf, idx = float(probs.max()), int(probs.argmax())
            fallback = conf < threshold
            child = None if fallback else sub.children[idx]
            out.append(SubDecision(domain, child, route_name(domain, child),
                                   {c: round(float(p), 6) for c, p in zip(sub.children, probs, strict=True)},
                                   round(conf, 6), fallback))
        return out
