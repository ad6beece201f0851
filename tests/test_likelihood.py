"""Likelihood routing (routing/likelihood.py): one batched forward with per-row adapters gives each
adapter's NLL of a request exactly as separate forwards do; the posterior and the tie-breaker."""

import pytest
import torch

from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.likelihood import adapter_nll, likelihood_probs, tie_break
from temporal_lora.text import separator_id


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    return TemporalLoRA.from_pretrained(tiny_bundle)


def one_at_a_time(tl, seq: list[int], adapter: int | None) -> float:
    """Mean next-token NLL of `seq` after the separator, one adapter (None: the base), alone."""
    x = torch.tensor([[separator_id(tl.tokenizer), *seq]])
    w = torch.zeros(1, len(tl.mixer.adapter_names))
    if adapter is not None:
        w[0, adapter] = 1.0
    with torch.no_grad(), tl.mixer.weights(w):
        logits = tl.model(input_ids=x, use_cache=False).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:]))


def test_batched_per_row_adapters_equal_separate_forwards(tl):
    ids = tl.encode(["def parse(argv):\n    return argv[1:]", "Thou art", "Permission is hereby granted, free of charge"])
    assert len({len(s) for s in ids}) == 3  # different lengths: padding is exercised
    nll = adapter_nll(tl, ids, batch_size=2)
    assert nll.shape == (3, 1 + len(tl.domains))
    for i, seq in enumerate(ids):
        expected = [one_at_a_time(tl, seq, None)] + [one_at_a_time(tl, seq, d) for d in range(len(tl.domains))]
        assert torch.allclose(nll[i], torch.tensor(expected), atol=1e-5)


def test_a_one_token_request_gets_finite_probabilities(tl):
    ids = [tl.encode(["def"])[0][:1]]
    probs = likelihood_probs(adapter_nll(tl, ids))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(1))


def test_the_posterior_favours_the_lowest_nll_and_the_tie_breaker_only_touches_unsure_rows():
    nll = torch.tensor([[3.0, 2.0, 1.0, 2.5], [3.0, 1.0, 2.0, 2.0]])  # base, then three domains
    probs = likelihood_probs(nll)
    assert probs.argmax(-1).tolist() == [1, 0]
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(probs[0], torch.softmax(torch.tensor([-2.0, -1.0, -2.5]), -1))
    router = torch.tensor([[0.95, 0.03, 0.02], [0.4, 0.5, 0.1]])
    lik = torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    out = tie_break(router, lik, margin=0.9)
    assert torch.equal(out[0], router[0])  # confident: the router's own
    joint = router[1] * lik[1]
    assert torch.allclose(out[1], joint / joint.sum())  # unsure: the product decides (0.32 vs 0.05)
    assert out[1].argmax() == 0
