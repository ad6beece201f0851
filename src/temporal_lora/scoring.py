"""Scores shared by the evaluation reports and the benchmarks: perplexity helpers, and how well a
generated answer matches a reference (SQuAD-style token F1) and a list of required facts (regexes)."""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter

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


# ----------------------------------------------------------------------------------- answer scores
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation removed (ASCII as SQuAD, and any Unicode
    punctuation), the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of a generated answer against a reference: the bag-of-tokens overlap of the
    normalised texts (normalize_answer), harmonic mean of precision and recall; 1.0 when both are
    empty after normalisation, 0.0 when only one is."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def facts_found(text: str, facts: list[str]) -> list[bool]:
    """For each fact (a regular expression), whether it occurs anywhere in `text`, ignoring case."""
    return [re.search(fact, text, re.IGNORECASE) is not None for fact in facts]
