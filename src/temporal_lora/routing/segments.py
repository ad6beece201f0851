"""Segment routing: re-decide the domain every segment of a long or mixed text, with hysteresis.

A text is cut into segments (sentences, paragraphs, or windows of K tokens). The router reads
each segment on its own (optionally with `context` preceding tokens) and gives calibrated
probabilities `p_j`. Two mechanisms keep the decision from flapping on one odd sentence while
still following a real change of topic:

* smoothing: `s_j = a * p_j + (1 - a) * s_{j-1}` (exponential moving average, a = `smoothing`);
* switching margin: the active domain changes only when another domain's smoothed probability
  beats the active one's by more than `margin`;
* confirmation: ... and only once it has done so for `confirm` consecutive segments;
* confidence gate: ... counting only segments where the router's own calibrated probability for
  the challenger is at least `min_confidence` (an unsure segment keeps the current adapter).

Hard routing applies the active domain's adapter, soft routing the smoothed probabilities.
The router is causal: segment j's decision uses segments 0..j only, so the same state machine
drives generation (`generate_segmented` re-routes after every K generated tokens and switches
adapters there, keeping the KV cache of the text so far).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from temporal_lora.errors import InputError
from temporal_lora.sampling import Sampling, TokenSampler, eos_ids
from temporal_lora.text import encode_text

UNITS = ("sentence", "paragraph", "tokens")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_PARAGRAPH_END = re.compile(r"\n\s*\n")


@dataclass
class SegmentConfig:
    """How a text is cut and how much the decision is smoothed."""

    unit: str = "tokens"
    """'sentence', 'paragraph' or 'tokens' (windows of `size` tokens)"""
    size: int = 32
    """tokens per segment for unit='tokens'"""
    min_tokens: int = 8
    """shorter sentences/paragraphs are merged into the next one"""
    context: int = 0
    """preceding tokens the router reads along with each segment"""
    smoothing: float = 0.6
    """weight of the newest segment in the moving average (1 = none)"""
    margin: float = 0.2
    """switching margin: a challenger must beat the active domain's smoothed probability by this"""
    confirm: int = 1
    """segments a challenger must lead (consecutively) before the adapter switches"""
    min_confidence: float = 0.0
    """a challenger counts only on segments it wins with at least this probability"""

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise InputError(f"unknown segment unit {self.unit!r}; choose from {', '.join(UNITS)}")
        if self.size < 1 or self.min_tokens < 1 or self.context < 0 or self.confirm < 1:
            raise InputError("segment size, min_tokens and confirm must be >= 1, context >= 0")
        if not 0 < self.smoothing <= 1:
            raise InputError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if not 0 <= self.margin < 1:
            raise InputError(f"margin must be in [0, 1), got {self.margin}")
        if not 0 <= self.min_confidence < 1:
            raise InputError(f"min_confidence must be in [0, 1), got {self.min_confidence}")

    @classmethod
    def parse(cls, spec: str, **kwargs) -> SegmentConfig:
        """'sentence', 'paragraph' or 'tokens:K' (e.g. tokens:32)."""
        unit, _, size = spec.partition(":")
        if unit == "tokens" and size:
            if not size.isdigit():
                raise InputError(f"bad segment spec {spec!r}; use tokens:K with an integer K")
            kwargs["size"] = int(size)
        return cls(unit=unit, **kwargs)


@dataclass
class Segment:
    start: int  # token offsets into the text's token ids
    end: int
    probs: list[float]  # the router's calibrated probabilities for this segment alone
    smoothed: list[float]
    domain: str | None  # the active domain after this segment (hard routing)
    switched: bool
    text: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HysteresisState:
    """The causal state machine: feed it each segment's probabilities in order."""

    smoothing: float
    margin: float
    confirm: int = 1
    min_confidence: float = 0.0
    smoothed: torch.Tensor | None = None
    active: int | None = None
    switches: int = field(default=0)
    _pending: tuple[int, int] = (-1, 0)  # (challenger, consecutive segments it has led)

    def step(self, probs: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        probs = probs.float()
        self.smoothed = probs.clone() if self.smoothed is None else \
            self.smoothing * probs + (1 - self.smoothing) * self.smoothed
        best = int(self.smoothed.argmax())
        switched = False
        if self.active is None:
            self.active = best
        elif (best != self.active and float(self.smoothed[best] - self.smoothed[self.active]) > self.margin
              and float(probs[best]) >= self.min_confidence):
            count = self._pending[1] + 1 if self._pending[0] == best else 1
            self._pending = (best, count)
            if count >= self.confirm:
                self.active, switched = best, True
                self.switches += 1
                self._pending = (-1, 0)
        else:
            self._pending = (-1, 0)
        return self.smoothed, self.active, switched


def split_spans(text: str, tokenizer, cfg: SegmentConfig) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and the [start, end) token spans of its segments."""
    enc = encode_text(tokenizer, text, "the text", return_offsets_mapping=cfg.unit != "tokens")
    ids = list(enc["input_ids"])
    if not ids:
        raise InputError("the text has no tokens")
    if cfg.unit == "tokens":
        return ids, token_spans(len(ids), cfg.size)
    pattern = _SENTENCE_END if cfg.unit == "sentence" else _PARAGRAPH_END
    char_ends = [m.end() for m in pattern.finditer(text)]
    starts = [s for s, _ in enc["offset_mapping"]]
    cuts, k = [], 0
    for pos, start in enumerate(starts):  # a segment ends before the first token starting past a break
        while k < len(char_ends) and char_ends[k] <= start:
            if pos > 0 and (not cuts or cuts[-1] != pos):
                cuts.append(pos)
            k += 1
    bounds = [0, *cuts, len(ids)]
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return ids, merge_short(spans, cfg.min_tokens)


def token_spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def merge_short(spans: list[tuple[int, int]], min_tokens: int) -> list[tuple[int, int]]:
    """Merge segments shorter than `min_tokens` into the following one (the last into the previous)."""
    out: list[tuple[int, int]] = []
    pending = None
    for a, b in spans:
        a = pending if pending is not None else a
        if b - a < min_tokens:
            pending = a
            continue
        pending = None
        out.append((a, b))
    if pending is not None:
        if out:
            out[-1] = (out[-1][0], spans[-1][1])
        else:
            out.append((pending, spans[-1][1]))
    return out


class SegmentRouter:
    """Segment-by-segment routing of one text with a TemporalLoRA's router."""

    def __init__(self, tl, cfg: SegmentConfig | None = None):
        self.tl = tl
        self.cfg = cfg or SegmentConfig()

    def segment_probs(self, ids: list[int], spans: list[tuple[int, int]]) -> torch.Tensor:
        """Calibrated router probabilities [n_segments, n_domains], each segment read on its own."""
        inputs = [ids[max(0, a - self.cfg.context): b] for a, b in spans]
        return self.tl.route_probs(inputs)

    def decide(self, probs: torch.Tensor, spans: list[tuple[int, int]], ids: list[int] | None = None,
               with_text: bool = False) -> list[Segment]:
        state = HysteresisState(self.cfg.smoothing, self.cfg.margin, self.cfg.confirm, self.cfg.min_confidence)
        out = []
        for (a, b), p in zip(spans, probs, strict=True):
            smoothed, active, switched = state.step(p)
            text = self.tl.tokenizer.decode(ids[a:b]) if with_text and ids is not None else None
            out.append(Segment(a, b, [round(float(x), 6) for x in p], [round(float(x), 6) for x in smoothed],
                               self.tl.domains[active], switched, text))
        return out

    def route_ids(self, ids: list[int], spans: list[tuple[int, int]] | None = None) -> list[Segment]:
        spans = spans or token_spans(len(ids), self.cfg.size)
        return self.decide(self.segment_probs(ids, spans), spans, ids)

    def route(self, text: str, with_text: bool = True) -> list[Segment]:
        """Segments of `text` with their probabilities, smoothed weights and active domain."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text is empty")
        ids, spans = split_spans(text, self.tl.tokenizer, self.cfg)
        return self.decide(self.segment_probs(ids, spans), spans, ids, with_text=with_text)

    def token_weights(self, segments: list[Segment], n_tokens: int, mode: str = "hard",
                      causal: bool = False) -> torch.Tensor:
        """Per-token adapter weights [n_tokens, n_domains] from segment decisions.

        `causal=True` applies segment j's decision only from segment j+1 on (what a streaming
        generator can do: it knows a segment's domain after reading it); the first segment then
        uses its own decision, as a routed prompt would.
        """
        if mode not in ("hard", "soft"):
            raise InputError(f"segment routing mode must be hard or soft, got {mode!r}")
        k = len(self.tl.domains)
        w = torch.zeros(n_tokens, k)
        for j, seg in enumerate(segments):
            src = segments[max(0, j - 1)] if causal else seg
            if mode == "hard":
                w[seg.start: seg.end, self.tl.domains.index(src.domain)] = 1.0
            else:
                w[seg.start: seg.end] = torch.tensor(src.smoothed)
        return w


@torch.no_grad()
def generate_segmented(tl, prompt: str, *, cfg: SegmentConfig | None = None, max_new_tokens: int = 64,
                       mode: str = "hard", repetition_penalty: float = 1.0) -> dict:
    """Greedy generation that re-routes every `cfg.size` generated tokens and switches adapters there.

    The prompt is routed segment by segment; then after each block of `size` new tokens the
    router reads that block, the hysteresis state updates, and the following tokens use the new
    weights (earlier tokens keep their KV cache). Returns the text and the route of each block.
    """
    cfg = cfg or SegmentConfig()
    router = SegmentRouter(tl, cfg)
    ids, spans = split_spans(prompt, tl.tokenizer, cfg)
    if len(ids) + max_new_tokens > tl.context_length:
        raise InputError(f"prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the context")
    state = HysteresisState(cfg.smoothing, cfg.margin, cfg.confirm, cfg.min_confidence)
    for p in router.segment_probs(ids, spans):
        state.step(p)

    def weights() -> torch.Tensor:
        if mode == "soft":
            return state.smoothed.unsqueeze(0)
        w = torch.zeros(1, len(tl.domains))
        w[0, state.active] = 1.0
        return w

    routes = [{"tokens": [0, len(ids)], "domain": tl.domains[state.active], "source": "prompt"}]
    past, step_input = None, torch.tensor([ids])
    sample = TokenSampler(Sampling(temperature=0, repetition_penalty=repetition_penalty), ids)
    new = sample.tokens  # the sampler records each picked token here
    eos = eos_ids(tl.tokenizer, tl.model)
    current = weights()
    for _ in range(max_new_tokens):
        with tl.mixer.weights(current):
            out = tl.model(input_ids=step_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = sample(out.logits[0, -1].float())
        if token in eos:
            break
        step_input = torch.tensor([[token]])
        if len(new) % cfg.size == 0:  # a full block: let the router read it and maybe switch
            _, _, switched = state.step(tl.route_probs([new[-cfg.size:]])[0])
            current = weights()
            routes.append({"tokens": [len(ids) + len(new) - cfg.size, len(ids) + len(new)],
                           "domain": tl.domains[state.active], "switched": switched, "source": "generated"})
    return {"prompt": prompt, "text": tl.tokenizer.decode(new, skip_special_tokens=True), "routes": routes,
            "switches": state.switches}
