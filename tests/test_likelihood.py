"""Likelihood routing (routing/likelihood.py): one batched forward with per-row adapters gives each
adapter's NLL of a request exactly as separate forwards do; the posterior, its temperature and the
tie-breaker."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from temporal_lora.backbone import load_backbone
from temporal_lora.config import RouterConfig
from temporal_lora.mixing import AdapterMixer
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.likelihood import (
    adapter_nll,
    fit_likelihood_temperature,
    likelihood_probs,
    tie_break,
)
from temporal_lora.text import separator_id

DOMAINS = ["alpha", "beta", "gamma"]
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
TEXTS = ["def parse(argv):\n    return argv[1:]", "Thou art", "Permission is hereby granted, free of charge"]


def random_adapters(model_dir, arch: str) -> SimpleNamespace:
    """What adapter_nll reads of a TemporalLoRA, on a tiny base with three random (non-zero) adapters:
    the adapters clearly differ, so a column scored under the wrong adapter cannot pass."""
    model, tokenizer, _ = load_backbone(str(model_dir))
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                        fan_in_fan_out=arch == "gpt2")  # GPT-2's Conv1D stores its weight transposed
    peft_model = get_peft_model(model, config, adapter_name=DOMAINS[0])
    for name in DOMAINS[1:]:
        peft_model.add_adapter(name, config)
    peft_model.eval()
    return SimpleNamespace(model=peft_model.get_base_model(), tokenizer=tokenizer, domains=list(DOMAINS),
                           router_config=RouterConfig(), mixer=AdapterMixer(peft_model, DOMAINS))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def duck(request, tiny_llama, tiny_gpt2):
    return random_adapters(tiny_llama if request.param == "llama" else tiny_gpt2, request.param)


def alone(tl, seq: list[int], weights: torch.Tensor | None) -> float:
    """Mean next-token NLL of `seq` (unpadded, no attention mask) in a forward of its own."""
    x = torch.tensor([seq])
    with torch.no_grad(), tl.mixer.weights(weights):
        logits = tl.model(input_ids=x, use_cache=False).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, x[0, 1:]))


def one_hot(tl, column: int | None) -> torch.Tensor:
    w = torch.zeros(1, len(tl.mixer.adapter_names))
    if column is not None:
        w[0, column] = 1.0
    return w


def test_batched_per_row_adapters_equal_one_adapter_at_a_time(duck):
    ids = duck.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert len({len(s) for s in ids}) == 3  # different lengths: padding is exercised
    nll = adapter_nll(duck, ids, batch_size=2)  # two batches of different widths
    assert nll.shape == (3, 1 + len(DOMAINS))
    eos = separator_id(duck.tokenizer)
    for i, seq in enumerate(ids):
        expected = [alone(duck, [eos, *seq], one_hot(duck, d)) for d in range(len(DOMAINS))]
        assert torch.allclose(nll[i, 1:], torch.tensor(expected), atol=1e-5), (i, nll[i], expected)
        assert len({round(v, 3) for v in nll[i].tolist()}) == 1 + len(DOMAINS)  # the columns differ


def test_the_base_column_is_the_model_with_all_zero_weights(duck):
    ids = duck.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    nll = adapter_nll(duck, ids, batch_size=3)
    eos = separator_id(duck.tokenizer)
    for i, seq in enumerate(ids):
        zero = alone(duck, [eos, *seq], one_hot(duck, None))
        plain = alone(duck, [eos, *seq], None)  # the mixer off: no LoRA matmul at all
        assert abs(float(nll[i, 0]) - zero) < 1e-5 and abs(zero - plain) < 1e-6


def test_only_the_routers_first_max_tokens_are_read(duck):
    seq = duck.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    short = SimpleNamespace(**{**vars(duck), "router_config": RouterConfig(max_tokens=5)})
    assert len(seq) > 5
    assert torch.allclose(adapter_nll(short, [seq]), adapter_nll(duck, [seq[:5]]), atol=1e-6)


def test_a_one_token_request_is_scored_after_the_end_of_sequence_token(duck):
    token = duck.tokenizer("def", add_special_tokens=False)["input_ids"][:1]
    nll = adapter_nll(duck, [token])
    eos = separator_id(duck.tokenizer)
    expected = [alone(duck, [eos, *token], one_hot(duck, d)) for d in [None, *range(len(DOMAINS))]]
    assert torch.allclose(nll[0], torch.tensor(expected), atol=1e-5)
    probs = likelihood_probs(nll)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(1))


def test_without_an_end_of_sequence_token_a_one_token_request_gets_a_uniform_posterior(duck):
    bare = SimpleNamespace(**{**vars(duck), "tokenizer": SimpleNamespace(eos_token_id=None, pad_token_id=0)})
    seq = duck.tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    nll = adapter_nll(bare, [seq[:1], seq])  # padded beside a longer one, and alone
    assert torch.equal(nll[0], torch.zeros(1 + len(DOMAINS)))
    assert torch.equal(adapter_nll(bare, [seq[:1]]), nll[:1])
    probs = likelihood_probs(nll)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs[0], torch.full((len(DOMAINS),), 1 / len(DOMAINS)))
    # The longer one is scored from its first token on, which is then only context.
    assert abs(float(nll[1, 2]) - alone(duck, seq, one_hot(duck, 1))) < 1e-5


def test_no_requests_give_an_empty_table(duck):
    assert adapter_nll(duck, []).shape == (0, 1 + len(DOMAINS))


def test_a_trained_bundle_agrees_with_its_own_token_nll(tiny_bundle):
    tl = TemporalLoRA.from_pretrained(tiny_bundle)
    ids = tl.encode(TEXTS)
    nll = adapter_nll(tl, ids)
    eos = separator_id(tl.tokenizer)
    for i, seq in enumerate(ids):
        chunk = torch.tensor([[eos, *seq]])
        weights = torch.cat([torch.zeros(1, len(tl.domains)), torch.eye(len(tl.domains))])
        summed = tl.token_nll(chunk.expand(len(weights), -1), weights)
        assert torch.allclose(nll[i], summed / len(seq), atol=1e-5)


def test_the_posterior_favours_the_lowest_nll():
    nll = torch.tensor([[3.0, 2.0, 1.0, 2.5], [3.0, 1.0, 2.0, 2.0]])  # base, then three domains
    probs = likelihood_probs(nll)
    assert probs.argmax(-1).tolist() == [1, 0]
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(probs[0], torch.softmax(torch.tensor([-2.0, -1.0, -2.5]), -1))
    # The base column is not a domain: changing it changes nothing.
    assert torch.equal(likelihood_probs(nll.index_fill(1, torch.tensor([0]), 9.0)), probs)
    # A temperature flattens, a prior shifts (Bayes' rule: prior times likelihood).
    assert torch.allclose(likelihood_probs(nll, 2.0)[0], torch.softmax(torch.tensor([-1.0, -0.5, -1.25]), -1))
    prior = torch.tensor([0.2, 0.2, 0.6])
    shifted = likelihood_probs(nll, prior=prior)
    assert torch.allclose(shifted[0], probs[0] * prior / (probs[0] * prior).sum())
    assert shifted[1].argmax() == 2  # row 1: domains 1 and 2 tie on NLL (2.0), the prior decides


def test_the_fitted_temperature_recovers_the_one_the_labels_were_drawn_with():
    gen = torch.Generator().manual_seed(0)
    nll = torch.rand(4000, 5, generator=gen) * 2
    labels = torch.multinomial(torch.softmax(-nll[:, 1:] / 0.5, -1), 1, generator=gen).squeeze(1)
    assert 0.4 < fit_likelihood_temperature(nll, labels) < 0.6


def test_the_tie_breaker_only_touches_unsure_rows():
    router = torch.tensor([[0.95, 0.03, 0.02], [0.4, 0.5, 0.1], [0.9, 0.05, 0.05]], dtype=torch.float64)
    lik = torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    out = tie_break(router, lik, margin=0.9)
    assert out.dtype == torch.float64  # the router's probabilities keep their precision
    assert torch.equal(out[0], router[0])  # confident: the router's own
    assert torch.equal(out[2], router[2])  # exactly at the margin: confident too
    # Unsure: 0.4 * 0.8 = 0.32, 0.5 * 0.1 = 0.05, 0.1 * 0.1 = 0.01 out of 0.38; domain 0 wins.
    assert torch.allclose(out[1], torch.tensor([32 / 38, 5 / 38, 1 / 38], dtype=torch.float64))
    # Opinions with no domain in common: the product is all zero, and the router's row stands.
    disjoint = tie_break(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]]), margin=0.9)
    assert torch.equal(disjoint, torch.tensor([[0.5, 0.5, 0.0]]))
