"""Batched, routed generation for the server: requests that arrive together decode in one batch.

Each sample keeps its own adapter mix, sampling settings and random generator, so a request's output
does not depend on which other requests share its batch (the server's no-leak guarantee). That is
why this is a hand-written decode loop: `transformers.generate` samples from one global random stream
for the whole batch and cannot stream or stop samples individually.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from temporal_lora.model import RouteDecision, TemporalLoRA, _pad


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


@dataclass
class Route:
    """What a request runs with: `domain` forced ('base' = no adapter), or routed on `route_ids`."""

    domain: str | None = None
    route_ids: list[int] | None = None
    mode: str = "hard"
    top_k: int = 2


@dataclass
class Job:
    """One sequence to generate. `emit` receives ("route", decision, weights), ("text", delta),
    ("done", finish_reason, completion_tokens) or ("error", exception); it must be thread-safe."""

    prompt_ids: list[int]
    route: Route
    sampling: Sampling
    emit: Callable[..., None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Owns the model. One worker thread takes queued jobs in batches of up to `max_batch`."""

    def __init__(self, tl: TemporalLoRA, *, max_batch: int = 8, batch_wait_s: float = 0.01,
                 on_batch: Callable[[int], None] | None = None):
        self.tl = tl
        self.on_batch = on_batch  # told the size of every batch (metrics)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.eos_ids = _eos_ids(tl)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()  # the model (and its mixer state) serves one caller at a time
        self._thread = threading.Thread(target=self._work, name="tlora-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def route(self, texts: list[str]) -> list[RouteDecision]:
        """Routing only (for /v1/route); shares the model with generation, so it takes the lock."""
        with self._lock:
            return self.tl.route(texts)

    def route_segments(self, texts: list[str], spec: str) -> list[list]:
        """Segment-by-segment routes with hysteresis (segments.py), one list of segments per text."""
        from temporal_lora.segments import SegmentConfig, SegmentRouter

        router = SegmentRouter(self.tl, SegmentConfig.parse(spec))
        with self._lock:
            return [router.route(text) for text in texts]

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            # A short wait lets requests that arrive together share the batch.
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            for j in batch:
                if j.cancelled.is_set():  # its client is gone: end it without computing anything
                    j.emit("done", "cancelled", 0)
            batch = [j for j in batch if not j.cancelled.is_set()]
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                with self._lock:
                    self._run(batch)
            except Exception as exc:  # noqa: BLE001 - reported to every waiting request
                for j in batch:
                    j.emit("error", exc)

    @torch.no_grad()
    def _run(self, batch: list[Job]) -> None:
        tl = self.tl
        weights = self._weights(batch)
        input_ids, mask = _pad([j.prompt_ids for j in batch], tl.tokenizer.pad_token_id, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        decoders = [_Decoder(j, tl.tokenizer, self.eos_ids) for j in batch]
        with tl.mixer.weights(weights):
            out = tl.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
            step = 0
            while True:
                logits = out.logits[:, -1].float()
                tokens = [d.next_token(logits[row]) for row, d in enumerate(decoders)]
                if all(d.finished for d in decoders):
                    break
                step += 1
                nxt = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
                mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = tl.model(input_ids=nxt, attention_mask=mask, position_ids=positions,
                               past_key_values=out.past_key_values, use_cache=True)

    def _weights(self, batch: list[Job]) -> torch.Tensor:
        tl = self.tl
        rows: list[torch.Tensor] = [None] * len(batch)  # type: ignore[list-item]
        routed = [i for i, j in enumerate(batch) if j.route.domain is None]
        if routed:
            probs = tl.route_probs([batch[i].route.route_ids for i in routed])
            for i, p, decision in zip(routed, probs, tl.decisions(probs), strict=True):
                r = batch[i].route
                rows[i] = tl.mix_weights(p.unsqueeze(0), r.mode, r.top_k)[0]
                batch[i].emit("route", decision, _named(tl, rows[i]))
        for i, j in enumerate(batch):
            if j.route.domain is not None:
                rows[i] = tl.domain_weights(j.route.domain, 1)[0]
                j.emit("route", None, _named(tl, rows[i]))
        return torch.stack(rows)


def _named(tl: TemporalLoRA, row: torch.Tensor) -> dict[str, float]:
    return {d: round(float(x), 6) for d, x in zip(tl.domains, row, strict=True)}


def _eos_ids(tl: TemporalLoRA) -> set[int]:
    ids = set()
    for source in (tl.tokenizer.eos_token_id, getattr(tl.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


class _Decoder:
    """Sampling, incremental detokenisation and stop handling for one sequence of a batch."""

    def __init__(self, job: Job, tokenizer, eos_ids: set[int]):
        self.job = job
        self.s = job.sampling
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.generator = torch.Generator().manual_seed(self.s.seed)
        self.prompt = torch.tensor(job.prompt_ids, dtype=torch.long)
        self.tokens: list[int] = []
        self.counts: dict[int, int] = {}
        self.sent = 0  # characters of the decoded text already emitted
        self.finished = False
        # Hold back as many characters as a stop string could already have started.
        self.hold = max((len(s) for s in self.s.stop), default=1) - 1

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick this row's next token from its logits; returns a pad-safe token once finished."""
        if self.finished:
            return self.tokens[-1] if self.tokens else 0
        if self.job.cancelled.is_set():
            self._finish("cancelled")
            return 0
        token = self._sample(logits)
        self.tokens.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if token in self.eos_ids:
            self.tokens.pop()
            self._flush(final=True)
            self._finish("stop")
        elif self._flush(final=False):
            self._finish("stop")
        elif len(self.tokens) >= self.s.max_new_tokens:
            self._flush(final=True)
            self._finish("length")
        return token

    def _sample(self, logits: torch.Tensor) -> int:
        s = self.s
        if s.repetition_penalty != 1.0:
            seen = torch.cat([self.prompt, torch.tensor(self.tokens, dtype=torch.long)]).unique()
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
        if self.counts and (s.presence_penalty or s.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype)
            logits[ids] -= s.presence_penalty + s.frequency_penalty * counts
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _flush(self, final: bool) -> bool:
        """Emit newly decoded text; True if a stop string was reached (text is cut before it)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.s.stop:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                self._emit_upto(text, at)
                return True
        if final:
            self._emit_upto(text, len(text))
        elif not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self._emit_upto(text, len(text) - self.hold)
        return False

    def _emit_upto(self, text: str, end: int) -> None:
        if end > self.sent:
            self.job.emit("text", text[self.sent:end])
            self.sent = end

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.job.emit("done", reason, len(self.tokens))
