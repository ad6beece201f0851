"""Perplexity helpers shared by the evaluation report and the benchmarks."""

from __future__ import annotations

import math

import torch

from temporal_lora.mixing import one_hot


def perplexity(nll: torch.Tensor, chunks: torch.Tensor) -> float:
    """exp(mean next-token NLL) of chunks whose summed NLL per chunk is `nll`."""
    return round(math.exp(float(nll.sum()) / chunks[:, 1:].numel()), 4)


def adapter_nll(tl, name: str, chunks: torch.Tensor) -> torch.Tensor:
    """Summed NLL per chunk under one adapter loaded in `tl`'s PEFT model (a domain or a baseline)."""
    with tl.using_adapters([name]):
        return tl.token_nll(chunks, torch.ones(len(chunks), 1))


@torch.no_grad()
def plain_nll(model, chunks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Summed next-token NLL per chunk of any causal LM (e.g. PEFT's Arrow model)."""
    out = []
    for start in range(0, len(chunks), batch_size):
        x = chunks[start : start + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1))
    return torch.cat(out)


def routed_nll(tl, chunks: torch.Tensor, label: int, oracle: torch.Tensor, picked: list[int | None]) -> torch.Tensor:
    """NLL under hard routing to the `picked` domain adapters, given the true domain's (`oracle`):
    only misrouted chunks need a forward pass."""
    nll = oracle.clone()
    wrong = [i for i, p in enumerate(picked) if p != label]
    if wrong:
        nll[wrong] = tl.token_nll(chunks[wrong], one_hot([picked[i] for i in wrong], len(tl.domains)))
    return nll
