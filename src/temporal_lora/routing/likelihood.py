"""Likelihood routing, as Branch-Train-Merge estimates its domain posterior.

Each domain's adapter scores a request by how well it predicts the request's own tokens:
p(d | x) ∝ prior(d) · exp(-NLL_d(x) / τ). One batched forward scores every adapter: the request is
repeated once per adapter (and once for the base model), and each row gets its own adapter through
the per-row mixer. It costs a full forward per domain, so it serves as a second opinion when the
router is unsure (`tie_break`), not as the router.
"""

from __future__ import annotations

import torch

from temporal_lora.routing.gating import fit_temperature
from temporal_lora.text import pad_batch, pad_id, separator_id


@torch.no_grad()
def adapter_nll(tl, ids: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """Mean next-token NLL [n, 1 + n_domains] of each request under the base model (column 0) and
    each domain's adapter. The request (its first max_tokens tokens, as the router reads it) follows
    the end-of-sequence token, as packed short texts follow it in training, so that every token of it,
    the first included, is predicted."""
    start = separator_id(tl.tokenizer)
    n_dom = len(tl.domains)
    limit = tl.router_config.max_tokens
    out = []
    for first in range(0, len(ids), batch_size):
        seqs = [([start] if start is not None else []) + seq[:limit] for seq in ids[first:first + batch_size]]
        rows = [seq for seq in seqs for _ in range(1 + n_dom)]
        x, mask = pad_batch(rows, pad_id(tl.tokenizer), left=False)
        weights = torch.zeros(len(rows), len(tl.mixer.adapter_names))
        for r in range(len(rows)):
            if r % (1 + n_dom):
                weights[r, r % (1 + n_dom) - 1] = 1.0
        with tl.mixer.weights(weights):
            logits = tl.model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        target = mask[:, 1:].float()
        mean = (nll * target).sum(1) / target.sum(1).clamp(min=1)  # a request with nothing to predict: 0
        out.append(mean.view(len(seqs), 1 + n_dom))
    return torch.cat(out)


def likelihood_probs(nll: torch.Tensor, temperature: float = 1.0, prior: torch.Tensor | None = None) -> torch.Tensor:
    """The posterior over domains [n, n_domains] from `adapter_nll`'s output. The mean per token
    (not BTM's sum) keeps one temperature right for requests of every length; the base column
    cancels out of the softmax and is only reported."""
    logits = -nll[:, 1:] / temperature
    if prior is not None:
        logits = logits + torch.log(prior)
    return torch.softmax(logits, dim=-1)


def fit_likelihood_temperature(nll: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the posterior's NLL on calibration rows (routing/gating.py)."""
    return fit_temperature(-nll[:, 1:], labels.long())[0]


def tie_break(router_probs: torch.Tensor, lik_probs: torch.Tensor, margin: float) -> torch.Tensor:
    """The router's probabilities, except on rows where its confidence is below `margin`: there the
    product with the likelihood posterior, renormalised."""
    joint = router_probs * lik_probs
    joint = joint / joint.sum(-1, keepdim=True).clamp(min=1e-12)
    unsure = router_probs.max(-1).values < margin
    return torch.where(unsure.unsqueeze(-1), joint, router_probs)
