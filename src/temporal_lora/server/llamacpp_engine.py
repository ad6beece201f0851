"""The batching engine on llama.cpp: our routing and sampling, llama.cpp's forward passes.

Routing is decided exactly as in the torch `Engine` (`plan_routes`), and every token is picked by the
same `Decoder` (per-request seed, temperature, top_p, penalties, stop strings) from llama.cpp's logits.
llama.cpp applies one adapter->scale set to a whole context, and changing it makes the next decode
re-plan the context's compute graph (slow), so every distinct adapter set gets a context of its own
(sharing the model's weights); each decoding step runs one call per distinct set among the running
requests (hard routing: one per domain at most). Each request owns one KV sequence of its set's
context, cleared before its prompt, so nothing computed under another request or adapter set is ever
reused; a request without adapters decodes in a context with no adapter set at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from temporal_lora import gguf_files
from temporal_lora.backbone import DEFAULT_BASE
from temporal_lora.errors import InputError, TemporalLoRAError
from temporal_lora.llamacpp import LlamaContext, LlamaModel, missing_reason
from temporal_lora.model import TemporalLoRA
from temporal_lora.server.engine import Decoder, Engine, Job, Route, Sampling

ENGINES = ("auto", "torch", "llama-cpp")


def llamacpp_unsupported(tl: TemporalLoRA) -> str | None:
    """None if this bundle can run on llama.cpp here, else why not."""
    reason = missing_reason()
    if reason:
        return reason
    if next(tl.model.parameters()).device.type != "cpu":
        return "the model is on an accelerator (llama.cpp runs here on the CPU)"
    return gguf_files.supports(tl.model.config)


class LlamaCppRuntime:
    """The bundle's base and adapters as GGUF files on llama.cpp: one context per adapter set."""

    def __init__(self, tl: TemporalLoRA, *, weights: str = "f32", n_seq: int = 8, n_ctx_seq: int | None = None,
                 n_threads: int = 1):
        reason = llamacpp_unsupported(tl)
        if reason:
            raise TemporalLoRAError(f"the llama.cpp engine cannot run this bundle: {reason}")
        self.weights = weights
        self.base_path = gguf_files.base_gguf(tl.model, base_id=tl.base_id, fingerprint=tl.base_fingerprint,
                                              weights=weights, is_default=tl.base_id == DEFAULT_BASE)
        # One GGUF LoRA per adapter the mixer knows (domains first, then any subdomains).
        self.adapter_files = [str(gguf_files.lora_gguf(gguf_files.model_lora(tl.peft_model, name), tl.model.config))
                              for name in tl.mixer.adapter_names]
        self.n_ctx_seq = int(n_ctx_seq or min(tl.context_length, 2560))
        self.model = LlamaModel(self.base_path)
        self.n_seq, self.n_threads = n_seq, n_threads
        self.contexts: dict[tuple, LlamaContext] = {}
        self._scratch: LlamaContext | None = None

    def _new_context(self) -> LlamaContext:
        return LlamaContext(self.model, n_seq=self.n_seq, n_ctx_seq=self.n_ctx_seq, n_threads=self.n_threads,
                            kv_f32=self.weights == "f32")

    @property
    def ctx(self) -> LlamaContext:
        """A context whose adapter set the caller sets (tests, measurements); not the engine's."""
        if self._scratch is None:
            self._scratch = self._new_context()
        return self._scratch

    def context(self, adapters: tuple) -> LlamaContext:
        """The context of this adapter set (made on first use; its set never changes)."""
        if adapters not in self.contexts:
            ctx = self._new_context()
            ctx.set_adapters(adapters)
            self.contexts[adapters] = ctx
        return self.contexts[adapters]

    def drop(self, adapters: tuple) -> None:
        ctx = self.contexts.pop(adapters, None)
        if ctx is not None:
            ctx.close()

    def adapter_set(self, weights: torch.Tensor) -> tuple[tuple[str, float], ...]:
        """One request's adapter weights as llama.cpp's adapter->scale set (zero weights left out)."""
        return tuple((self.adapter_files[i], float(w)) for i, w in enumerate(weights.tolist()) if w != 0.0)

    def close(self) -> None:
        for key in list(self.contexts):
            self.drop(key)
        if self._scratch is not None:
            self._scratch.close()
        self.model.close()


@dataclass(eq=False)
class _Row:
    decoder: Decoder
    seq: int
    adapters: tuple
    pos: int
    logits: np.ndarray


class _Rows:
    """The running requests (what `Engine._work` calls a batch)."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    @property
    def decoders(self) -> list[Decoder]:
        return [r.decoder for r in self.rows]

    def join(self, other: _Rows | None) -> _Rows:
        return self if other is None else _Rows(self.rows + other.rows)


class LlamaCppEngine(Engine):
    """`Engine`'s queue, continuous batching and routing, with llama.cpp doing the forward passes."""

    def __init__(self, tl: TemporalLoRA, *, weights: str = "f32", n_threads: int = 1, n_ctx_seq: int | None = None,
                 max_batch: int = 8, batch_wait_s: float = 0.01, on_batch: Callable[[int], None] | None = None,
                 name: str = "tlora-llamacpp"):
        self.runtime = LlamaCppRuntime(tl, weights=weights, n_seq=max_batch, n_ctx_seq=n_ctx_seq,
                                       n_threads=n_threads)
        self._free: dict[tuple, list[int]] = {}  # per adapter set: its context's unused sequences
        self.decode_calls = 0  # llama_decode calls made for decoding steps (one per adapter set per step)
        super().__init__(tl, max_batch=max_batch, batch_wait_s=batch_wait_s, on_batch=on_batch, name=name)

    def close(self) -> None:
        super().close()
        with self._lock:
            self.runtime.close()

    def _reset(self) -> None:
        """After a failure every running request has ended: all sequences are free again."""
        for key in list(self.runtime.contexts):
            self.runtime.drop(key)
        self._free = {}

    def _take_seq(self, adapters: tuple) -> tuple[LlamaContext, int]:
        ctx = self.runtime.context(adapters)
        free = self._free.setdefault(adapters, list(range(self.max_batch)))
        seq = free.pop()
        ctx.clear(seq)
        return ctx, seq

    def _give_back(self, adapters: tuple, seq: int) -> None:
        self.runtime.context(adapters).clear(seq)
        free = self._free[adapters]
        free.append(seq)
        if len(adapters) > 1 and len(free) == self.max_batch:  # an idle mix's context: mixes rarely repeat
            self.runtime.drop(adapters)
            del self._free[adapters]

    @torch.no_grad()
    def _prefill(self, jobs: list[Job]) -> _Rows | None:
        try:
            weights = self._weights(jobs)
            rows: list[_Row] = []
            for job, w in zip(jobs, weights, strict=True):
                need = len(job.prompt_ids) + job.sampling.max_new_tokens
                if need > self.runtime.n_ctx_seq:
                    job.emit("error", InputError(f"prompt plus max_tokens is {need} tokens; this engine holds "
                                                 f"{self.runtime.n_ctx_seq} per request"))
                    continue
                if not job.prompt_ids:
                    job.emit("error", InputError("the prompt is empty"))
                    continue
                adapters = self.runtime.adapter_set(w)
                ctx, seq = self._take_seq(adapters)
                logits = ctx.decode([(seq, job.prompt_ids, 0)])[0]
                rows.append(_Row(Decoder(job, self.tl.tokenizer, self.eos_ids), seq, adapters,
                                 len(job.prompt_ids), logits))
        except BaseException:
            self._reset()
            raise
        return _Rows(rows) if rows else None

    @torch.no_grad()
    def _step(self, batch: _Rows) -> _Rows | None:
        """Sample one token per request, free finished ones, then one decode call per adapter set."""
        try:
            tokens = [row.decoder.next_token(torch.from_numpy(row.logits)) for row in batch.rows]
            live: list[tuple[_Row, int]] = []
            for row, token in zip(batch.rows, tokens, strict=True):
                if row.decoder.finished:
                    self._give_back(row.adapters, row.seq)
                else:
                    live.append((row, token))
            if not live:
                return None
            groups: dict[tuple, list[tuple[_Row, int]]] = {}
            for row, token in live:
                groups.setdefault(row.adapters, []).append((row, token))
            for adapters, members in groups.items():
                out = self.runtime.context(adapters).decode([(row.seq, [token], row.pos) for row, token in members])
                self.decode_calls += 1
                for (row, _), logits in zip(members, out, strict=True):
                    row.logits, row.pos = logits, row.pos + 1
            return _Rows([row for row, _ in live])
        except BaseException:
            self._reset()
            raise


def make_engine(tl: TemporalLoRA, choice: str = "torch", *, weights: str = "f32", n_threads: int = 1,
                **kwargs) -> Engine:
    """The engine for `choice`: 'torch' (the reference), 'llama-cpp', or 'auto'. `kwargs` go to the
    engine (max_batch...).

    'auto' picks llama.cpp only for one request at a time (max_batch 1) where it is installed and can
    run this bundle's base: by measurement it is faster at batch 1, while torch's one batched forward
    with per-row mixes serves concurrent requests several times faster
    (benchmarks/results/serve/engine.json)."""
    if choice not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {choice!r}")
    if choice == "auto":
        single = kwargs.get("max_batch", 8) == 1
        choice = "llama-cpp" if single and not llamacpp_unsupported(tl) else "torch"
    if choice == "torch":
        return Engine(tl, **kwargs)
    return LlamaCppEngine(tl, weights=weights, n_threads=n_threads, **kwargs)


def generate(engine: Engine, prompts: list[list[int]], *, route: Route | None = None,
             sampling: Sampling | list[Sampling] | None = None, timeout_s: float = 3600.0) -> list[dict]:
    """Run prompts (token ids) through an engine, all submitted at once; waits for every one.

    Returns per prompt {"text", "finish_reason", "completion_tokens", "route", "weights"}. The server
    runs the same engines; this is the library's way to use them (and the benchmark's)."""
    samplings = sampling if isinstance(sampling, list) else [sampling or Sampling()] * len(prompts)
    results = [{"text": "", "finish_reason": None, "completion_tokens": 0} for _ in prompts]
    done = threading.Semaphore(0)
    errors: list[BaseException] = []

    def emitter(i: int):
        def emit(kind, *args):
            if kind == "route":
                results[i]["route"], results[i]["weights"] = args[0], args[1]
            elif kind == "text":
                results[i]["text"] += args[0]
            elif kind == "done":
                results[i]["finish_reason"], results[i]["completion_tokens"] = args
                done.release()
            elif kind == "error":
                errors.append(args[0])
                done.release()
        return emit

    for i, (ids, s) in enumerate(zip(prompts, samplings, strict=True)):
        engine.submit(Job(list(ids), route or Route(), s, emitter(i)))
    for _ in prompts:
        if not done.acquire(timeout=timeout_s):
            raise TemporalLoRAError("generation timed out")
    if errors:
        raise errors[0]
    return results
