"""One sampler for every generation loop: the server's engine, segment generation, style sampling.

A step reads the float logits of the next token and goes penalties -> temperature -> top-p -> pick;
temperature 0 picks the argmax (greedy). Generation ends at any id of one end-of-sequence set,
`eos_ids`, derived the same way for every caller. Library `TemporalLoRA.generate` still runs
transformers' `generate` (see `model.generate_ids` for why) but stops on the same set.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """Per-request decoding settings (OpenAI names). temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


def eos_ids(tokenizer, model=None) -> set[int]:
    """The ids that end generation: the tokenizer's eos plus the model's `generation_config` eos
    (one id or a list: chat models often stop on several)."""
    config = getattr(model, "generation_config", None)
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN and +-inf replaced by the lowest/largest finite float (NaN counts as lowest)."""
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)


def repetition_penalty_(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, in place on one row of logits [vocab]: the logit of every id in
    `seen` is divided by `penalty` when positive and multiplied by it otherwise (transformers' rule)."""
    if penalty != 1.0 and len(seen):
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def count_penalties_(logits: torch.Tensor, counts: dict[int, int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, in place on one row of logits [vocab]: an id
    generated n > 0 times loses `presence + frequency * n`."""
    if counts and (presence or frequency):
        ids = torch.tensor(list(counts), dtype=torch.long)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits[ids] -= presence + frequency * n
    return logits


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities [..., vocab] cut to the smallest most-likely set whose mass reaches `top_p`
    (the rest set to 0, not renormalised: `torch.multinomial` does not need it)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    keep[..., 0] = True  # the most likely token, even for a top_p below float32's smallest number
    return torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)


def pick(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token id(s) from logits [..., vocab]: the argmax when temperature <= 0, else one sample
    of softmax(logits / temperature) cut to `top_p`, drawn from `generator`. Shape [...]."""
    if temperature <= 0:
        return finite(logits).argmax(-1)
    # Extreme but valid settings (a penalty of 1e-300, a temperature of 1e-30) overflow to inf;
    # clamped to the largest finite float they still pick the most likely tokens.
    probs = torch.softmax(finite(logits / temperature), dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TokenSampler:
    """The sampler of one sequence: its settings, its own random generator (seeded with
    `settings.seed`, so a sequence's tokens do not depend on what else is decoding), and the
    prompt and generated ids its penalties read."""

    def __init__(self, settings: Sampling, prompt_ids: list[int]):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.prompt = torch.tensor(prompt_ids, dtype=torch.long)
        self.tokens: list[int] = []
        self.counts: dict[int, int] = {}

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick the next token from this sequence's logits [vocab] (modified in place) and record it."""
        s = self.settings
        if s.repetition_penalty != 1.0:
            seen = torch.cat([self.prompt, torch.tensor(self.tokens, dtype=torch.long)]).unique()
            repetition_penalty_(logits, seen, s.repetition_penalty)
        count_penalties_(logits, self.counts, s.presence_penalty, s.frequency_penalty)
        token = int(pick(logits, s.temperature, s.top_p, self.generator))
        self.tokens.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def _forward_kwargs(model) -> dict:
    # Like transformers' generate: only the last position's logits when the model can skip the rest
    # (a PeftModel forwards the argument to the model it wraps).
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


@torch.no_grad()
def sample_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 temperature: float, top_p: float, stop_ids: set[int], pad_id: int,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample continuations of a left-padded batch [n, time] with a KV cache; the new ids of each row,
    up to (not including) its first id in `stop_ids`.

    The whole batch draws from one `generator` (default: torch's global one), one step at a time, as
    transformers' `generate` does, so a seeded batch gives what `generate(do_sample=True)` gave.
    Rows that stopped keep decoding `pad_id` until every row has stopped or `max_new_tokens` is reached.
    """
    extra = _forward_kwargs(model)
    # A mask of all ones is dropped, as generate does: the attention then takes its unmasked path.
    mask = None if bool(attention_mask.all()) else attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    running = torch.ones(len(input_ids), dtype=torch.bool)
    new: list[torch.Tensor] = []
    step_ids, cache = input_ids, None
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, **extra)
        cache = out.past_key_values
        tokens = pick(out.logits[:, -1].float(), temperature, top_p, generator)
        tokens = torch.where(running, tokens, torch.full_like(tokens, pad_id))
        new.append(tokens)
        running &= ~torch.isin(tokens, stops)
        if not running.any():
            break
        step_ids = tokens[:, None]
        positions = positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(len(input_ids))]
    out_rows = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        out_rows.append(row[:end])
    return out_rows
