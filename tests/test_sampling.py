"""The one sampler (sampling.py): each step of penalties -> temperature -> top-p -> pick, and stopping."""

from types import SimpleNamespace

import pytest
import torch

from temporal_lora.sampling import (
    Sampling,
    TokenSampler,
    count_penalties_,
    eos_ids,
    pick,
    repetition_penalty_,
    sample_batch,
    top_p_filter,
)


def test_greedy_picks_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pick(logits, temperature=0), logits.argmax(-1))
    row = logits[3].clone()
    assert TokenSampler(Sampling(temperature=0), [1, 2])(row) == int(logits[3].argmax())
    # inf and NaN logits (extreme settings overflow) still give the largest finite choice
    odd = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert int(pick(odd, temperature=0)) == 2


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 3.0, 1.0])
    repetition_penalty_(logits, torch.tensor([0, 1]), 2.0)
    assert logits.tolist() == [1.0, -4.0, 3.0, 1.0]
    # a sequence's sampler penalises every id of its prompt and of what it generated so far
    sample = TokenSampler(Sampling(temperature=0, repetition_penalty=4.0), [0])
    assert sample(torch.tensor([3.0, 2.0, -1.0])) == 1  # 3/4 < 2
    assert sample(torch.tensor([3.0, 2.0, -1.0])) == 0  # 3/4 > 2/4
    assert sample.tokens == [1, 0]


def test_presence_and_frequency_penalties_subtract_per_count():
    logits = torch.zeros(4)
    count_penalties_(logits, {1: 1, 3: 2}, presence=0.5, frequency=0.25)
    assert logits.tolist() == [0.0, -0.75, 0.0, -1.0]


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # most likely first: ids 1, 3, then 0 and 2
    assert top_p_filter(probs, 0.75).tolist() == [0.0, 0.5, 0.0, 0.25]
    assert top_p_filter(probs, 0.5).tolist() == [0.0, 0.5, 0.0, 0.0]
    assert top_p_filter(probs, 0.76).tolist()[1:] == [0.5, 0.0, 0.25] and top_p_filter(probs, 0.76)[0] > 0
    assert top_p_filter(probs, 1e-30).tolist() == [0.0, 0.5, 0.0, 0.0]  # never empty
    # batched: each row keeps its own set
    both = top_p_filter(torch.stack([probs, probs.flip(0)]), 0.75)
    assert both[1].tolist() == [0.25, 0.0, 0.5, 0.0]
    gen = torch.Generator().manual_seed(0)
    picks = {int(pick(probs.log(), 1.0, 0.75, gen)) for _ in range(200)}
    assert picks == {1, 3}


def test_the_same_seed_gives_the_same_sample():
    logits = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(30)]

    def run(seed):
        sample = TokenSampler(Sampling(temperature=1.0, top_p=0.9, seed=seed, presence_penalty=0.3), [4, 5])
        return [sample(x.clone()) for x in logits]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_eos_ids_unite_the_tokenizer_and_the_generation_config():
    tokenizer = SimpleNamespace(eos_token_id=2)
    assert eos_ids(tokenizer, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 9]))) == {2, 9}
    assert eos_ids(tokenizer, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))) == {2}
    assert eos_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(generation_config=SimpleNamespace(
        eos_token_id=4))) == {4}
    assert eos_ids(tokenizer) == {2}


class ScriptedModel:
    """A causal LM stand-in whose row r emits script[r][step] (then token 3) at each step."""

    def __init__(self, script, vocab=12):
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        logits = torch.zeros(len(input_ids), input_ids.shape[1], self.vocab)
        for r, row in enumerate(self.script):
            logits[r, -1, row[self.calls] if self.calls < len(row) else 3] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)

    __call__ = forward


def test_a_stop_id_from_the_eos_set_ends_generation():
    model = ScriptedModel([[4, 9, 6, 6], [5, 6, 6, 6]])
    ids, mask = torch.tensor([[0, 1], [2, 1]]), torch.tensor([[0, 1], [1, 1]])
    new = sample_batch(model, ids, mask, max_new_tokens=10, temperature=0, top_p=1.0, stop_ids={9, 5}, pad_id=0)
    assert new == [[4], []]  # row 0 stops at its 9, row 1 at once on 5; the stop ids are not returned
    assert model.calls == 2  # and decoding ends when every row has stopped
    model = ScriptedModel([[4, 6], [5, 6]])
    assert sample_batch(model, ids, mask, max_new_tokens=3, temperature=0, top_p=1.0, stop_ids={9},
                        pad_id=0) == [[4, 6, 3], [5, 6, 3]]


@pytest.mark.parametrize("temperature", [14.0, 26.0])
def test_a_seeded_batch_draws_from_one_stream(temperature):
    model = ScriptedModel([[1] * 8, [2] * 8])
    ids, mask = torch.tensor([[0, 1], [2, 1]]), torch.ones(2, 2, dtype=torch.long)

    def run(seed):
        model.calls = 0
        return sample_batch(model, ids, mask, max_new_tokens=8, temperature=temperature, top_p=1.0,
                            stop_ids=set(), pad_id=0, generator=torch.Generator().manual_seed(seed))

    assert run(3) == run(3)
    assert run(3) != run(4)
