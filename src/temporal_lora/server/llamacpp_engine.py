"""The batching engine on llama.cpp: our routing and sampling, llama.cpp's forward passes.

Routing is decided exactly as in the torch `Engine` (`plan_routes`), and every token is picked by the
same `Decoder` (per-request seed, temperature, top_p, penalties, stop strings) from llama.cpp's logits.
llama.cpp applies one adapter->scale set to a whole decode call, so each decoding step runs one call
per distinct set among the running requests (hard routing: one per domain at most), switching the
context's set before each (measured: about 4 ms a switch, against 60-170 ms a call). All requests
share one context whose KV buffer is unified (measured: 1.45x the tokens/s of one buffer per
sequence at 16 sequences); each request owns one KV sequence of it, cleared before its prompt and
after its end, so nothing computed under another request or adapter set is ever reused.
"""

from __future__ import annotations

import threading
import time
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
    """The bundle's base and adapters as GGUF files on llama.cpp, and the engine's context."""

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
        self.context = self._new_context()  # the engine's: one KV sequence per running request
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

    def decode(self, adapters: tuple, items: list[tuple[int, list[int], int]]) -> list[np.ndarray]:
        """One decode call on the engine's context under this adapter set (`LlamaContext.decode`)."""
        self.context.set_adapters(adapters)
        return self.context.decode(items)

    def adapter_set(self, weights: torch.Tensor) -> tuple[tuple[str, float], ...]:
        """One request's adapter weights as llama.cpp's adapter->scale set (zero weights left out)."""
        return tuple((self.adapter_files[i], float(w)) for i, w in enumerate(weights.tolist()) if w != 0.0)

    def close(self) -> None:
        self.context.close()
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
        self._free = list(range(max_batch))  # the context's unused KV sequences
        self.decode_calls = 0  # decode calls made for decoding steps (one per adapter set per step)
        self.decode_seconds = 0.0  # time inside llama.cpp's decode calls, prompts included (measurements)
        super().__init__(tl, max_batch=max_batch, batch_wait_s=batch_wait_s, on_batch=on_batch, name=name)

    def close(self) -> None:
        super().close()
        with self._lock:
            self.runtime.close()

    def _reset(self) -> None:
        """After a failure every running request has ended: all sequences are free again."""
        self.runtime.context.clear()
        self._free = list(range(self.max_batch))

    def _give_back(self, seq: int) -> None:
        self.runtime.context.clear(seq)
        self._free.append(seq)

    def _decode_groups(self, items: list[tuple[_Row, list[int]]]) -> None:
        """Run each row's tokens, one decode call per adapter set; sets each row's logits and position."""
        groups: dict[tuple, list[tuple[_Row, list[int]]]] = {}
        for row, tokens in items:
            groups.setdefault(row.adapters, []).append((row, tokens))
        for adapters, members in groups.items():
            start = time.perf_counter()
            out = self.runtime.decode(adapters, [(row.seq, tokens, row.pos) for row, tokens in members])
            self.decode_seconds += time.perf_counter() - start
            for (row, tokens), logits in zip(members, out, strict=True):
                row.logits, row.pos = logits, row.pos + len(tokens)

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
                seq = self._free.pop()
                self.runtime.context.clear(seq)
                rows.append(_Row(Decoder(job, self.tl.tokenizer, self.eos_ids), seq, self.runtime.adapter_set(w),
                                 0, np.empty(0, dtype=np.float32)))
            self._decode_groups([(row, row.decoder.job.prompt_ids) for row in rows])
        except BaseException:
            self._reset()
            raise
        return _Rows(rows) if rows else None

    @torch.no_grad()
    def _step(self, batch: _Rows) -> _Rows | None:
        """Sample one token per request, free finished ones, then one decode call per adapter set."""
        try:
            live: list[tuple[_Row, list[int]]] = []
            for row in batch.rows:
                token = row.decoder.next_token(torch.from_numpy(row.logits))
                if row.decoder.finished:
                    self._give_back(row.seq)
                else:
                    live.append((row, [token]))
            if not live:
                return None
            self.decode_calls += len({row.adapters for row, _ in live})
            self._decode_groups(live)
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
