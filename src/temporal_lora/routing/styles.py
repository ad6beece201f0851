"""Answer styles: DPO-trained style adapters under a domain ('legal/plain', 'legal/formal').

A style adapter is a PEFT adapter initialised from its domain's adapter and trained on
preferences (evolve/styles.py). It is chosen per request: `style="plain"`, the domain's default
style from the manifest, or `style="auto"` (the register of the prompt itself). Choosing a style
replaces the domain's adapter by the domain's style adapter in the row's weights, so a mixed
batch of domains and styles is one mixer forward like any other. A domain without the style
keeps its own adapter, and the routing info says why.

This module is the in-memory side; `storage.py` reads and writes it (styles/<domain>/<style>/).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from temporal_lora.rewards import register
from temporal_lora.routing.hierarchy import adapter_name

AUTO = "auto"
NONE = "none"  # explicitly no style: the domain's own adapter, even when it has a default style


@dataclass
class StyleChoice:
    """The style used for one input. `style` is None when the domain's own adapter answers."""

    requested: str | None
    style: str | None
    domain: str | None
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Styles:
    """Every domain's style adapters and default style, as the manifest records them:
    {domain: {"default": style or None, "adapters": {style: {"path", "config", "training"}}}}."""

    def __init__(self, entries: dict[str, dict]):
        self.entries = entries

    def of(self, domain: str | None) -> list[str]:
        return list((self.entries.get(domain) or {}).get("adapters", {})) if domain else []

    def default(self, domain: str | None) -> str | None:
        return (self.entries.get(domain) or {}).get("default") if domain else None

    def adapter_names(self) -> list[str]:
        return [adapter_name(d, s) for d, e in self.entries.items() for s in e.get("adapters", {})]

    def route_names(self) -> list[str]:
        """How requests name a style adapter: 'domain/style'."""
        return [f"{d}/{s}" for d, e in self.entries.items() for s in e.get("adapters", {})]

    def choose(self, domain: str | None, requested: str | None, text: str) -> StyleChoice:
        """The style for an input routed (or forced) to `domain`. Never raises: a style the domain
        lacks falls back to the domain's own adapter with a note."""
        if domain is None:
            note = "no domain (the base model answers): style ignored" if requested not in (None, NONE) else None
            return StyleChoice(requested, None, None, note)
        styles = self.of(domain)
        if requested == NONE:
            return StyleChoice(requested, None, domain)
        if requested is None:
            return StyleChoice(None, self.default(domain), domain)
        if not styles:
            return StyleChoice(requested, None, domain, f"domain {domain!r} has no style adapters: style ignored")
        wanted = register(text) if requested == AUTO else requested
        if wanted in styles:
            note = f"auto: the prompt reads as {wanted}" if requested == AUTO else None
            return StyleChoice(requested, wanted, domain, note)
        fallback = self.default(domain)
        where = f"auto chose {wanted!r}, which" if requested == AUTO else f"style {wanted!r}"
        note = (f"{where} domain {domain!r} does not have (its styles: {', '.join(styles)}); "
                + (f"its default {fallback!r} answers" if fallback else "its own adapter answers"))
        return StyleChoice(requested, fallback, domain, note)


def apply_styles(styles: Styles | None, adapters: list[str], weights: torch.Tensor, requested: list[str | None],
                 texts: list[str]) -> tuple[torch.Tensor, list[StyleChoice | None]]:
    """Move each row's weight from a domain's adapter (or its subdomain's) to the domain's style
    adapter, for the style chosen for that row. A row forced to 'domain/style' keeps it.
    Returns the new weights and one StyleChoice per row (None for bundles without styles)."""
    n = weights.shape[0]
    if styles is None or not styles.entries:
        notes = [None] * n
        for row, req in enumerate(requested):
            if req not in (None, NONE):
                notes[row] = StyleChoice(req, None, None, "this bundle has no style adapters: style ignored")
        return weights, notes
    w = weights.clone()
    style_names = set(styles.adapter_names())
    style_cols = {a: i for i, a in enumerate(adapters) if a in style_names}
    choices: list[StyleChoice | None] = []
    for row in range(n):
        nonzero = [int(i) for i in torch.nonzero(w[row]).flatten()]
        if not nonzero:
            choices.append(styles.choose(None, requested[row], texts[row]))
            continue
        top = max(nonzero, key=lambda i: float(w[row, i]))
        if adapters[top] in style_cols:  # forced 'domain/style'
            domain, _, style = adapters[top].partition("~")
            choices.append(StyleChoice(requested[row] or style, style, domain))
            continue
        choice = styles.choose(adapters[top].split("~")[0], requested[row], texts[row])
        choices.append(choice)
        if choice.style is None:
            continue
        for col in nonzero:  # soft and top-k mixes: every mixed domain that has the style uses it
            target = style_cols.get(adapter_name(adapters[col].split("~")[0], choice.style))
            if target is not None and target != col:
                w[row, target] += w[row, col]
                w[row, col] = 0.0
    return w, choices
