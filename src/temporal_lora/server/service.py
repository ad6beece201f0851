"""What the API does for a request: validate it, route it, generate (locally or on a backend engine)
and shape the answer in OpenAI's format, plain or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from temporal_lora.errors import InputError
from temporal_lora.model import RouteDecision, TemporalLoRA, tokenize
from temporal_lora.server.engine import Engine, Job, Route, Sampling
from temporal_lora.server.forward import Backend
from temporal_lora.server.metrics import Metrics
from temporal_lora.server.schemas import ChatRequest, CompletionRequest, _Common
from temporal_lora.server.transport import APIError, EventStream

# The router reads the newest user turns of a chat, back to about this many tokens, so a later turn
# can switch domain while a short follow-up ("and the dose?") keeps the conversation's domain.
CHAT_ROUTE_TOKENS = 64
MAX_STOPS = 4
MAX_SEQUENCES = 32  # prompts x n in one request


@dataclass
class ServerSettings:
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    default_max_tokens: int = 128
    max_body_bytes: int = 1_000_000
    max_concurrency: int = 32  # generation requests accepted at once (queued or running)
    max_batch: int = 8
    routing_mode: str = "hard"
    api_key: str | None = None
    backend_url: str | None = None  # forward generation to this OpenAI-compatible engine
    backend_api_key: str | None = None
    backend_base_model: str = "base"  # the engine's name for the plain base model
    backend_timeout_s: float = 600.0


class _Call:
    """One API request's jobs. Engine events arrive on an asyncio queue; the concurrency slot is
    released when every job has ended, even if the client went away before reading anything."""

    def __init__(self, release: Callable[[], None]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []
        self.open = 0
        self._release = release

    def job(self, prompt_ids: list[int], route: Route, sampling: Sampling) -> Job:
        index = len(self.jobs)

        def emit(*event):
            try:
                self.loop.call_soon_threadsafe(self._event, index, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        job = Job(prompt_ids, route, sampling, emit)
        self.jobs.append(job)
        self.open += 1
        return job

    def _event(self, index: int, event: tuple) -> None:
        self.queue.put_nowait((index, event))
        if event[0] in ("done", "error"):
            self.open -= 1
            if self.open == 0:
                self._release()

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


class Service:
    def __init__(self, tl: TemporalLoRA, settings: ServerSettings):
        self.tl = tl
        self.settings = settings
        self.metrics = Metrics()
        self.engine = Engine(tl, max_batch=settings.max_batch, on_batch=self.metrics.batch_size.observe)
        self.backend = None
        if settings.backend_url:
            self.backend = Backend(settings.backend_url, api_key=settings.backend_api_key,
                                   timeout=settings.backend_timeout_s)
        self.model_ids = ["auto", *tl.domains, "base"]
        self.in_flight = 0

    async def close(self) -> None:
        self.engine.close()
        if self.backend:
            await self.backend.close()

    # ------------------------------------------------------------------ requests
    async def completions(self, req: CompletionRequest):
        if req.echo or req.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if req.echo else "logprobs")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) * req.n > MAX_SEQUENCES:
            raise APIError(400, f"at most {MAX_SEQUENCES} sequences per request (prompts x n)", param="prompt")
        max_new = self._max_new(req.max_tokens)
        ids = [self.encode(p, "prompt") for p in prompts]
        for p in ids:
            self._check_lengths(p, max_new)
        if self.backend:
            return await self._forward("/completions", req, prompts, max_new)
        return await self._generate("text", req, ids, ids, max_new)

    async def chat_completions(self, req: ChatRequest):
        tl = self.tl
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if not getattr(tl.tokenizer, "chat_template", None):
            raise APIError(400, f"base model {tl.base_id!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        max_new = self._max_new(req.max_completion_tokens or req.max_tokens)
        prompt = tl.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = self.encode(prompt, "messages")
        self._check_lengths(prompt_ids, max_new)
        route_text = self._chat_route_text(req)
        if self.backend:
            return await self._forward("/chat/completions", req, [route_text], max_new)
        return await self._generate("chat", req, [prompt_ids], [self.encode(route_text, "messages")], max_new)

    async def route(self, texts: list[str], segments: str | None) -> JSONResponse:
        if not texts:
            raise APIError(400, "input is empty", param="input")
        for i, text in enumerate(texts):
            self._check_lengths(self.encode(text, f"input[{i}]"), 0)
        decisions = await asyncio.to_thread(self.engine.route, texts)
        data = [{"index": i, **d.to_dict()} for i, d in enumerate(decisions)]
        if self.tl.hierarchy is not None:  # a bundle with subdomains: add the second level (hierarchy.py)
            subs = await asyncio.to_thread(self.engine.route_subdomains, texts)
            for row, sub in zip(data, subs, strict=True):
                row.update({k: v for k, v in sub.items() if k not in row})
        if segments:  # per-segment routes on request (segment routing with hysteresis)
            per_text = await asyncio.to_thread(self.engine.route_segments, texts, segments)
            for row, found in zip(data, per_text, strict=True):
                row["segments"] = [s.to_dict() for s in found]
        return JSONResponse({"object": "list", "data": data},
                            headers={"X-Route": ",".join(dict.fromkeys(d.domain or "base" for d in decisions))})

    # ------------------------------------------------------------------ checks
    def encode(self, text: str, what: str, *, allow_empty: bool = False) -> list[int]:
        try:  # unlike TemporalLoRA.encode, a whitespace-only prompt is fine here (as in OpenAI's API)
            ids = tokenize(self.tl.tokenizer, text, what)
        except InputError as exc:  # e.g. lone surrogates, which JSON can carry
            raise APIError(400, str(exc), param=what) from exc
        if not ids and not allow_empty:
            raise APIError(400, f"{what} is empty", param=what)
        return ids

    def _check_lengths(self, prompt_ids: list[int], max_new: int) -> None:
        limit = self.settings.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; the limit is {limit}",
                           code="context_length_exceeded")
        if len(prompt_ids) + max_new > self.tl.context_length:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_new}) exceeds the "
                           f"model's context of {self.tl.context_length}", code="context_length_exceeded")

    def _max_new(self, requested: int | None) -> int:
        max_new = requested or self.settings.default_max_tokens
        if max_new > self.settings.max_new_tokens:
            raise APIError(400, f"max_tokens {max_new} exceeds the server's limit of {self.settings.max_new_tokens}",
                           param="max_tokens")
        return max_new

    def _sampling(self, req: _Common, max_new: int, index: int) -> Sampling:
        stops = req.stop_list()
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop strings", param="stop")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return Sampling(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                        seed=(seed + index) % 2**63, stop=stops, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty)

    def _resolve_model(self, model: str) -> str | None:
        """The forced domain ('base' included), or None for 'auto'. Unknown names get a 404."""
        if model == "auto":
            return None
        if model == "base" or model in self.tl.domains:
            return model
        raise APIError(404, f"model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                       param="model", code="model_not_found")

    def _chat_route_text(self, req: ChatRequest) -> str:
        turns = [m.text() for m in req.messages if m.role == "user" and m.text().strip()]
        if not turns:
            raise APIError(400, "messages hold no user message to answer", param="messages")
        picked, tokens = [], 0
        for text in reversed(turns):
            picked.insert(0, text)
            tokens += len(self.encode(text, "messages", allow_empty=True))
            if tokens >= CHAT_ROUTE_TOKENS:
                break
        return "\n".join(picked)

    def _acquire(self) -> Callable[[], None]:
        """Take a concurrency slot or shed the request with 429; returns the (idempotent) release."""
        if self.in_flight >= self.settings.max_concurrency:
            self.metrics.shed.inc()
            raise APIError(429, f"server busy: {self.settings.max_concurrency} requests are in progress; "
                           "retry shortly", type="rate_limit_error", code="concurrency_limit",
                           headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.in_flight.inc()
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()

        return release

    # ------------------------------------------------------------------ routing decisions
    def _routing_info(self, model: str, forced: str | None, mode: str, decision: RouteDecision | None,
                      weights: dict[str, float] | None, count: bool = True) -> dict:
        chosen = forced if forced else (decision.domain if decision and decision.domain else "base")
        info = {"model": model, "domain": chosen, "mode": "forced" if forced else mode, "routed": forced is None,
                "abstained": bool(decision and decision.abstained), "confidence": None, "probs": None,
                "weights": weights}
        if decision is not None:
            info.update(confidence=decision.confidence, probs=decision.probs)
        if count:
            self.metrics.routes.labels(chosen, "routed" if forced is None else "forced").inc()
            if info["abstained"]:
                self.metrics.abstentions.inc()
        return info

    # ------------------------------------------------------------------ local generation
    async def _generate(self, kind: str, req: _Common, prompts: list[list[int]], route_ids: list[list[int]],
                        max_new: int):
        """Submit n jobs per prompt to the engine; answer with JSON or an event stream."""
        forced = self._resolve_model(req.model)
        mode = req.routing_mode or self.settings.routing_mode
        release = self._acquire()
        call = _Call(release)
        try:
            sampling = [self._sampling(req, max_new, i) for i in range(req.n)]
            for prompt, ids in zip(prompts, route_ids, strict=True):
                route = Route(domain=forced, route_ids=None if forced else ids, mode=mode, top_k=req.top_k)
                for s in sampling:
                    self.engine.submit(call.job(prompt, route, s))
        except BaseException:
            call.cancel()
            release()
            raise
        started = time.perf_counter()
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        k = len(call.jobs)
        routes: list[dict | None] = [None] * k
        early: list[tuple[int, tuple]] = []
        try:  # the engine reports each route before any text: it goes into the X-Route header
            while any(r is None for r in routes):
                index, event = await call.queue.get()
                if event[0] == "route":  # metrics count one route per prompt, not per choice
                    routes[index] = self._routing_info(req.model, forced, mode, event[1], event[2],
                                                       count=index % req.n == 0)
                elif event[0] == "error":
                    raise event[1]
                else:
                    early.append((index, event))
        except BaseException:
            call.cancel()
            raise
        reply = _Reply(kind, req.model, routes, prompt_tokens)

        async def events() -> AsyncIterator[tuple[int, tuple]]:
            remaining = k - sum(1 for _, e in early if e[0] == "done")
            for item in early:
                yield item
            while remaining:
                index, event = await call.queue.get()
                if event[0] == "error":
                    raise event[1]
                remaining -= event[0] == "done"
                yield index, event

        def finished(completion_tokens: int) -> None:
            self.metrics.tokens.labels("completion").inc(completion_tokens)
            endpoint = "/v1/completions" if kind == "text" else "/v1/chat/completions"
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

        if not req.stream:
            texts, reasons, counts = [""] * k, [None] * k, [0] * k
            try:
                async for index, event in events():
                    if event[0] == "text":
                        texts[index] += event[1]
                    elif event[0] == "done":
                        reasons[index], counts[index] = event[1], event[2]
            finally:
                call.cancel()
            finished(sum(counts))
            return JSONResponse(reply.body(texts, reasons, counts), headers=reply.headers())

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def stream() -> AsyncIterator[str]:
            total, first_text = 0, True
            try:
                for i in range(k):
                    yield reply.chunk(i, None, None, first=True)
                async for index, event in events():
                    if event[0] == "text":
                        if first_text:
                            self.metrics.first_token.observe(time.perf_counter() - started)
                            first_text = False
                        yield reply.chunk(index, event[1], None)
                    elif event[0] == "done":
                        total += event[2]
                        yield reply.chunk(index, None, event[1])
                if include_usage:
                    yield reply.usage_chunk(total)
                yield "data: [DONE]\n\n"
                finished(total)
            except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
                yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error"}})

        async def close() -> None:
            call.cancel()  # a client that went away frees its batch row at the next decoding step

        return EventStream(stream(), on_close=close, headers=reply.headers())

    # ------------------------------------------------------------------ scale-out: forward to an engine
    async def _forward(self, path: str, req: _Common, route_texts: list[str], max_new: int):
        forced = self._resolve_model(req.model)
        mode = req.routing_mode or self.settings.routing_mode
        if mode != "hard" and forced is None:
            raise APIError(400, "with a backend engine only hard routing is possible (one adapter per request)",
                           param="routing_mode")
        if len(route_texts) != 1:
            raise APIError(400, "with a backend engine, send one prompt per request", param="prompt")
        release = self._acquire()
        streaming = False
        try:
            decision = None
            if forced is None:
                decision = (await asyncio.to_thread(self.engine.route, route_texts))[0]
            weights = self.tl.named(self.tl.domain_weights(forced or decision.domain, 1)[0])
            info = self._routing_info(req.model, forced, "hard", decision, weights)
            target = info["domain"] if info["domain"] != "base" else self.settings.backend_base_model
            payload = req.model_dump(exclude_unset=True, exclude={"routing_mode", "top_k", "max_completion_tokens"})
            payload.update(model=target, max_tokens=max_new)
            headers = {"X-Route": info["domain"]}
            if not req.stream:
                body = await self.backend.complete(path, payload)
                body.update(model=req.model, routing=info)
                return JSONResponse(body, headers=headers)
            lines = await self.backend.stream(path, payload)
            streaming = True
        finally:
            if not streaming:
                release()

        async def relay() -> AsyncIterator[str]:
            first = True
            async for data in lines:
                if data != "[DONE]":
                    obj = json.loads(data)
                    obj["model"] = req.model
                    if first:
                        obj["routing"] = info
                        first = False
                    data = json.dumps(obj)
                yield f"data: {data}\n\n"

        async def close() -> None:
            await lines.aclose()
            release()

        return EventStream(relay(), on_close=close, headers=headers)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Reply:
    """OpenAI's response shapes for one request: `kind` 'text' (completions) or 'chat'."""

    def __init__(self, kind: str, model: str, routes: list[dict], prompt_tokens: int):
        self.kind, self.model, self.routes, self.prompt_tokens = kind, model, routes, prompt_tokens
        self.id = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.chunk_object = "text_completion" if kind == "text" else "chat.completion.chunk"

    def headers(self) -> dict[str, str]:
        return {"X-Route": ",".join(dict.fromkeys(r["domain"] for r in self.routes))}

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def body(self, texts: list[str], reasons: list[str | None], counts: list[int]) -> dict:
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            choice = {"index": i, "finish_reason": reason, "routing": self.routes[i]}
            if self.kind == "text":
                choice.update(text=text, logprobs=None)
            else:
                choice["message"] = {"role": "assistant", "content": text}
            choices.append(choice)
        return {"id": self.id, "object": "text_completion" if self.kind == "text" else "chat.completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self._usage(sum(counts)), "routing": self.routes[0]}

    def chunk(self, index: int, delta: str | None, finish: str | None, first: bool = False) -> str:
        if self.kind == "text":
            choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
        else:
            content = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
            choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        payload = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "choices": [choice]}
        if first:
            payload["routing"] = self.routes[index]
        return _sse(payload)

    def usage_chunk(self, completion_tokens: int) -> str:
        return _sse({"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                     "choices": [], "usage": self._usage(completion_tokens)})
