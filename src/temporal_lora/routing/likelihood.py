"""Likelihood routing, as Branch-Train-Merge estimates its domain posterior.

Each domain's adapter scores a request by how well it predicts the request's own tokens:
p(d | x) ∝ prior(d) · exp(-NLL_d(x) / τ). One batched forward scores every adapter: the request is
repeated once per adapter (and once for the base model), and each row gets its own adapter through
the per-row mixer. It costs a forward of 1 + n_domains rows per request where the router needs one
(partial) forward, so it serves as a second opinion when the router is unsure (`tie_break`) rather
than as the router.
"""

from __future__ import annotations

import torch

from temporal_lora.routing.gating import fit_temperature
from temporal_lora.text import pad_batch, pad_id, separator_id


@torch.no_grad()
def adapter_nll(tl, ids: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """Mean next-token NLL [n, 1 + n_domains] of each request under the base model (column 0) and
    each domain's adapter (columns 1.., in `tl.domains` order).

    The router's view of a request is scored: its first `tl.router_config.max_tokens` tokens. They
    follow the tokenizer's end-of-sequence token, as packed short texts follow it in training, so
    that every token, the first included, is predicted, and a one-token request has one prediction.
    With no such token the first token is only context; a request with nothing left to predict
    scores 0 under every adapter, which `likelihood_probs` turns into a uniform posterior.
    `batch_size` counts requests: one forward holds batch_size * (1 + n_domains) rows.
    `tl` is a TemporalLoRA (duck-typed: tokenizer, domains, router_config, mixer, model).
    """
    start = separator_id(tl.tokenizer)
    n_cols = 1 + len(tl.domains)
    limit = tl.router_config.max_tokens
    # One-hot rows over the mixer's adapters (domains come first); row 0 all zero = the base model.
    # Repeated per request, so one batch mixes base rows and adapter rows: the hook multiplies the
    # base rows' LoRA deltas by exactly zero, which leaves them the base model's logits.
    pattern = torch.zeros(n_cols, len(tl.mixer.adapter_names))
    pattern[1:, : len(tl.domains)] = torch.eye(len(tl.domains))
    out = [torch.zeros(0, n_cols)]
    for first in range(0, len(ids), batch_size):
        seqs = [([start] if start is not None else []) + list(seq[:limit]) for seq in ids[first:first + batch_size]]
        rows = [seq for seq in seqs for _ in range(n_cols)]
        # Right padding keeps every real token at its own position (as the router's features do).
        x, mask = pad_batch(rows, pad_id(tl.tokenizer), left=False)
        with tl.mixer.weights(pattern.repeat(len(seqs), 1)):
            logits = tl.model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        target = mask[:, 1:].bool()  # predictions of a real token from a real token; padding scores nothing
        # where, not a product: a padded position's logits never reach the sum, even if not finite.
        total = torch.where(target, nll, torch.zeros_like(nll)).sum(1)
        mean = total / target.sum(1).clamp(min=1)  # nothing to predict: 0 under every adapter
        out.append(mean.view(len(seqs), n_cols))
    return torch.cat(out)


def likelihood_probs(nll: torch.Tensor, temperature: float = 1.0, prior: torch.Tensor | None = None) -> torch.Tensor:
    """The posterior over domains [n, n_domains] from `adapter_nll`'s output:
    softmax_d(-NLL_d / temperature + log prior_d). `prior` ([n_domains], need not sum to 1; None:
    uniform) is BTM's empirical domain prior; the base column is not a domain and is left out."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    # The mean NLL per token, not BTM's sum over the sequence. Under a uniform prior both pick the
    # same domain (a request's columns share one token count: the sum is the mean times it), so
    # they differ only in how sure the posterior is: the sum's sharpness grows with the length,
    # which leaves a 40-token request's posterior near one-hot over a small per-token difference
    # and no single temperature right for both short and long requests. The mean, with a
    # temperature fitted on calibration rows, stays calibrated at every length, and calibration is
    # what `tie_break` relies on when it multiplies this posterior with the router's. (With a
    # prior they differ more: under the sum the evidence of a long request outweighs the prior, as
    # Bayes' rule on independent tokens says; under the mean the prior weighs the same throughout.)
    logits = -nll[:, 1:].float() / temperature
    if prior is not None:
        logits = logits + torch.log(prior.float())  # a constant factor cancels in the softmax
    return torch.softmax(logits, dim=-1)


def fit_likelihood_temperature(nll: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the posterior's NLL on calibration rows (`adapter_nll` output
    and their domains' indices), by the router's own grid search (routing/gating.py)."""
    return fit_temperature(-nll[:, 1:].float(), labels.long())[0]


def tie_break(router_probs: torch.Tensor, lik_probs: torch.Tensor, margin: float) -> torch.Tensor:
    """The router's probabilities, except on rows whose top probability is below `margin`: there the
    product with the likelihood posterior, renormalised (two independent opinions, each calibrated,
    combined as a product of experts). The router's dtype is kept (its probabilities are float64)."""
    joint = router_probs * lik_probs.to(router_probs.dtype)
    total = joint.sum(-1, keepdim=True)
    unsure = router_probs.max(-1).values < margin
    # Where the two put all their mass on different domains the product is all zero: the router's
    # row stands rather than a row of zeros.
    unsure = unsure & (total.squeeze(-1) > 0)
    return torch.where(unsure.unsqueeze(-1), joint / total.clamp(min=torch.finfo(joint.dtype).tiny), router_probs)
