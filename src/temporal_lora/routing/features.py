"""Router features: hidden states of the frozen base model, mean-pooled over (every prefix of) the input.

One causal forward gives the pooled features of every prefix length, and the forward stops after
the feature layer, so routing costs a fraction of a full forward.
"""

from __future__ import annotations

import torch
from torch import nn

from temporal_lora.backbone import decoder_layers
from temporal_lora.errors import InputError


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the wanted layer has run."""


def resolve_feature_spec(spec: str, n_layers: int) -> str:
    """Normalise 'embeddings' / 'hidden:L' (L=-1 -> a lower-middle layer) / 'hidden:L1,L2' (the
    pooled layers side by side) / 'hidden:default' (default_layers) to a concrete spec."""
    if spec == "embeddings":
        return spec
    kind, _, layers = spec.partition(":")
    if kind == "hidden" and layers == "default":
        layers = ",".join(str(i) for i in default_layers(n_layers))
    if kind != "hidden" or not layers or not all(x.lstrip("-").isdigit() for x in layers.split(",")):
        raise InputError(f"unknown router features {spec!r}; use 'embeddings', 'hidden:LAYER' or 'hidden:L1,L2'")
    indices = []
    for layer in layers.split(","):
        index = int(layer)
        if index == -1:
            index = default_layer(n_layers)
        if not 1 <= index <= n_layers:
            raise InputError(f"router layer {index} out of range 1..{n_layers}")
        indices.append(index)
    return "hidden:" + ",".join(str(i) for i in indices)


def default_layer(n_layers: int) -> int:
    """The layer `hidden:-1` reads: 12 of SmolLM2's 30 (2 of 4 for the tiny test models).

    Layer 12 routed questions and text from unseen sources best among layers 4-16 and their
    concatenations at 1.4x layer 8's latency (benchmarks/results/routing/generalisation.md);
    bundles trained with layer 8 record `hidden:8` and keep it."""
    return max(n_layers // 4 + 1, (2 * n_layers) // 5)


def default_layers(n_layers: int) -> list[int]:
    """The layers the default router reads side by side: 8 and 12 of SmolLM2's 30; one layer
    (default_layer) on models under 12 layers, such as the tiny test models.

    Layers 8+12 routed text from unseen sources, short questions and in-source windows better than
    layer 12 alone at the same cost (both stop the forward after layer 12;
    benchmarks/results/routing/generalisation.md)."""
    top = default_layer(n_layers)
    return [(4 * n_layers) // 15, top] if n_layers >= 12 else [top]


def feature_layers(spec: str) -> list[int]:
    """The decoder layers a concrete 'hidden:...' spec reads ([] for embeddings)."""
    return [] if spec == "embeddings" else [int(x) for x in spec.split(":")[1].split(",")]


@torch.no_grad()
def token_features(model: nn.Module, spec: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token features [batch, seq, dim] of the *base* model (no adapter is applied here).

    For `hidden:L` the forward stops right after layer L: the upper layers are never computed; with
    several layers (`hidden:8,16`) their states are concatenated along the feature axis.
    Inputs must be right-padded so that real tokens keep their positions.
    """
    if spec == "embeddings":
        return model.get_input_embeddings()(input_ids)
    layers = feature_layers(spec)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    blocks = decoder_layers(model)
    for layer in sorted(set(layers)):
        def grab(_module, _args, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == max(layers):
                raise _StopForward
        handles.append(blocks[layer - 1].register_forward_hook(grab))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([captured[layer] for layer in layers], dim=-1) if len(layers) > 1 else captured[layers[0]]


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
