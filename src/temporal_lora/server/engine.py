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

from temporal_lora.model import RouteDecision, TemporalLoRA
from temporal_lora.routing.decisions import plan_routes, route_texts
from temporal_lora.routing.segments import SegmentConfig
from temporal_lora.sampling import Sampling, TokenSampler, eos_ids
from temporal_lora.text import pad_batch

__all__ = ["Decoder", "Engine", "Job", "Route", "Sampling"]  # Sampling lives in sampling.py


@dataclass
class Route:
    """What a request runs with: `domain` forced ('base' = no adapter), or routed on `route_ids`."""

    domain: str | None = None
    route_ids: list[int] | None = None
    mode: str = "hard"
    top_k: int = 2
    style: str | None = None  # routing/styles.py: a style name, 'auto', 'none' or None (the domain's default)


@dataclass(eq=False)
class Job:
    """One sequence to generate. `emit` receives ("route", decision, weights, style), ("text", delta),
    ("done", finish_reason, completion_tokens) or ("error", exception); it must be thread-safe."""

    prompt_ids: list[int]
    route: Route
    sampling: Sampling
    emit: Callable[..., None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Owns the model. One worker thread takes queued jobs in batches of up to `max_batch`."""

    def __init__(self, tl: TemporalLoRA, *, max_batch: int = 8, batch_wait_s: float = 0.01,
                 on_batch: Callable[[int], None] | None = None, name: str = "tlora-engine"):
        self.tl = tl
        self.on_batch = on_batch  # told the batch size at every decoding step (metrics)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.eos_ids = eos_ids(tl.tokenizer, tl.model)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()  # the model (and its mixer state) serves one caller at a time
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
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

    def route_texts(self, texts: list[str], segments: SegmentConfig | None = None) -> list[dict]:
        """What /v1/route answers (routing/decisions.py: the same as `tlora route`)."""
        with self._lock:
            return route_texts(self.tl, texts, segments=segments)

    # ------------------------------------------------------------------ worker
    def _take(self, jobs: list[Job], limit: int, wait_s: float) -> tuple[list[Job], bool]:
        """Add queued jobs to `jobs` up to `limit`, waiting at most `wait_s`; (jobs, stop requested).
        Jobs whose client is already gone end here without computing anything."""
        live: list[Job] = []
        deadline = time.monotonic() + wait_s
        stop = False
        while True:
            for job in jobs:
                if job.cancelled.is_set():
                    job.emit("done", "cancelled", 0)
                else:
                    live.append(job)
            if len(live) >= limit:
                break
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if wait_s else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs = [job]
        return live, stop

    def _work(self) -> None:
        # Continuous batching: between two decoding steps, newly queued jobs are prefilled and join
        # the running batch; finished sequences leave it at once.
        active: _Batch | None = None
        while True:
            if active is None:
                first = self._queue.get()
                if first is None:
                    return
                # A short wait lets requests that arrive together share the first step.
                jobs, stop = self._take([first], self.max_batch, self.batch_wait_s)
            else:
                jobs, stop = self._take([], self.max_batch - len(active.decoders), 0)
            if stop:
                return
            try:
                with self._lock:
                    if jobs:
                        fresh = self._prefill(jobs)
                        active = fresh if active is None else active.join(fresh)
                    if active is not None:
                        if self.on_batch:
                            self.on_batch(len(active.decoders))
                        active = self._step(active)
            except Exception as exc:  # noqa: BLE001 - reported to every request in the batch
                failed = [d.job for d in active.decoders] if active else []
                for job in failed + [j for j in jobs if j not in failed]:
                    job.emit("error", exc)
                active = None

    @torch.no_grad()
    def _prefill(self, jobs: list[Job]) -> _Batch:
        tl = self.tl
        weights = self._weights(jobs)
        input_ids, mask = pad_batch([j.prompt_ids for j in jobs], tl.tokenizer.pad_token_id, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with tl.mixer.weights(weights):
            out = tl.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        decoders = [Decoder(j, tl.tokenizer, self.eos_ids) for j in jobs]
        return _Batch(decoders, out.past_key_values, mask, positions[:, -1:], weights, out.logits[:, -1].float())

    @torch.no_grad()
    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token per row, drop finished rows, run one forward. None when all are done."""
        tokens = [d.next_token(batch.logits[row]) for row, d in enumerate(batch.decoders)]
        keep = [row for row, d in enumerate(batch.decoders) if not d.finished]
        if not keep:
            return None
        if len(keep) < len(batch.decoders):
            batch = batch.select(keep)
        nxt = torch.tensor([tokens[row] for row in keep], dtype=torch.long).unsqueeze(1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=1)
        batch.positions = batch.positions + 1
        with self.tl.mixer.weights(batch.weights):
            out = self.tl.model(input_ids=nxt, attention_mask=batch.mask, position_ids=batch.positions,
                                past_key_values=batch.cache, use_cache=True)
        batch.cache = out.past_key_values
        batch.logits = out.logits[:, -1].float()
        return batch

    def _weights(self, batch: list[Job]) -> torch.Tensor:
        """Each job's adapter weights, decided exactly as library `generate` decides them
        (routing/decisions.py `plan_routes`: subdomains included); jobs with the same settings
        are routed together."""
        rows: list[torch.Tensor] = [None] * len(batch)  # type: ignore[list-item]
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(batch):
            r = job.route
            groups.setdefault((r.domain, r.mode, r.top_k, r.style), []).append(i)
        for (domain, mode, top_k, style), members in groups.items():
            ids = [batch[i].route.route_ids or [] for i in members]
            plan = plan_routes(self.tl, ids, mode=mode, top_k=top_k, domain=domain, style=style)
            for row, i in enumerate(members):
                rows[i] = plan.weights[row]
                choice = plan.styles[row] if plan.styles else None
                batch[i].emit("route", plan.decisions[row], plan.named[row],
                              choice.to_dict() if choice is not None else None)
        return torch.stack(rows)


@dataclass
class _Batch:
    """Sequences decoding together: left-padded KV cache, attention mask, positions, adapter weights,
    and the logits of each row's next token (not yet sampled)."""

    decoders: list[Decoder]
    cache: object  # transformers DynamicCache, [batch, heads, time, dim] per layer
    mask: torch.Tensor
    positions: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor

    def _layers(self):
        layers = getattr(self.cache, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            raise RuntimeError("continuous batching needs a plain dynamic KV cache")
        return layers

    def select(self, rows: list[int]) -> _Batch:
        """Keep only `rows`; cut the left padding no remaining row needs."""
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[index]
        start = int(mask.any(dim=0).nonzero()[0])
        for layer in self._layers():
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        return _Batch([self.decoders[r] for r in rows], self.cache, mask[:, start:], self.positions[index],
                      self.weights[index], self.logits[index])

    def join(self, other: _Batch) -> _Batch:
        """One batch of both: the shorter history is padded on the left (masked, so it adds nothing)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])
        return _Batch(self.decoders + other.decoders, self.cache,
                      torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)]),
                      torch.cat([self.positions, other.positions]), torch.cat([self.weights, other.weights]),
                      torch.cat([self.logits, other.logits]))


class Decoder:
    """Sampling (sampling.py), incremental detokenisation and stop handling for one sequence of a batch."""

    def __init__(self, job: Job, tokenizer, eos_ids: set[int]):
        self.job = job
        self.s = job.sampling
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.sample = TokenSampler(self.s, job.prompt_ids)
        self.tokens = self.sample.tokens  # the sampler records each picked token here
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
        token = self.sample(logits)
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
