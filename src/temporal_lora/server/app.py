"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /v1/route.

Generation runs in the batching `Engine` (local) or is forwarded to an OpenAI-compatible multi-LoRA
engine (`Backend`) after our router decided. Every response says how it was routed: a `routing`
object in the body and an `X-Route` header.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from temporal_lora import __version__
from temporal_lora.errors import TemporalLoRAError
from temporal_lora.model import RouteDecision, TemporalLoRA
from temporal_lora.server.engine import Engine, Job, Route, Sampling
from temporal_lora.server.forward import Backend, BackendError
from temporal_lora.server.metrics import Metrics
from temporal_lora.server.schemas import ChatRequest, CompletionRequest, RouteRequest, _Common

# The router reads the newest user turns of a chat, back to about this many tokens, so a later turn
# can switch domain while a short follow-up ("and the dose?") keeps the conversation's domain.
CHAT_ROUTE_TOKENS = 64
MAX_STOPS = 4
MAX_SEQUENCES = 32  # prompts x n in one request
KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/route"}


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


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _Guard:
    """ASGI middleware: refuse oversized bodies (413) before parsing, count responses by status."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            declared = int(dict(scope["headers"]).get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            await _too_large(self.limit)(scope, receive, counting_send)
        else:
            body, size, more = [], 0, True
            while more:  # read the whole body (bounded) so a chunked upload cannot exceed the limit
                message = await receive()
                if message["type"] != "http.request":
                    return
                body.append(message.get("body", b""))
                size += len(body[-1])
                more = message.get("more_body", False)
                if size > self.limit:
                    await _too_large(self.limit)(scope, receive, counting_send)
                    break
            else:
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": b"".join(body), "more_body": False}
                    return await receive()  # afterwards: disconnect notices for streaming responses

                await self.app(scope, replay, counting_send)
        self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def _too_large(limit: int) -> JSONResponse:
    return APIError(413, f"request body is larger than the limit of {limit} bytes").response()


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


class _EventStream(StreamingResponse):
    """A server-sent event stream that runs `on_close` however it ends: finished, failed, or the
    client gone before the first byte (when the body generator never even starts)."""

    def __init__(self, content, *, on_close: Callable[[], Awaitable[None]], headers: dict):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def create_app(tl: TemporalLoRA, settings: ServerSettings | None = None) -> FastAPI:
    """Build the FastAPI app around a loaded bundle. The engine thread starts here."""
    settings = settings or ServerSettings()
    if settings.routing_mode not in ("hard", "soft", "topk"):
        raise TemporalLoRAError(f"unknown routing mode {settings.routing_mode!r}")
    metrics = Metrics()
    engine = Engine(tl, max_batch=settings.max_batch, on_batch=metrics.batch_size.observe)
    backend = None
    if settings.backend_url:
        backend = Backend(settings.backend_url, api_key=settings.backend_api_key, timeout=settings.backend_timeout_s)
    slots = {"in_flight": 0}
    model_ids = ["auto", *tl.domains, "base"]

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()
        if backend:
            await backend.close()

    app = FastAPI(title="Temporal LoRA", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API with automatic per-request routing to domain LoRA adapters.")
    app.add_middleware(_Guard, limit=settings.max_body_bytes, metrics=metrics)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings

    # ------------------------------------------------------------------ errors, auth, limits
    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request"))
        return APIError(400, message, param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(BackendError)
    async def _backend(_request, exc: BackendError):
        status = exc.status if 400 <= exc.status < 500 else 502
        return APIError(status, f"backend: {exc}", type="backend_error" if status == 502 else
                        "invalid_request_error").response()

    @app.exception_handler(TemporalLoRAError)
    async def _ours(_request, exc: TemporalLoRAError):
        return APIError(400, str(exc)).response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time comparison: response timing must not reveal how much of a key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    def acquire() -> Callable[[], None]:
        if slots["in_flight"] >= settings.max_concurrency:
            metrics.shed.inc()
            raise APIError(429, f"server busy: {settings.max_concurrency} requests are in progress; retry shortly",
                           type="rate_limit_error", code="concurrency_limit", headers={"Retry-After": "1"})
        slots["in_flight"] += 1
        metrics.in_flight.inc()
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                slots["in_flight"] -= 1
                metrics.in_flight.dec()

        return release

    # ------------------------------------------------------------------ helpers
    def resolve_model(model: str) -> str | None:
        """The forced domain ('base' included), or None for 'auto'. Unknown names get a 404."""
        if model == "auto":
            return None
        if model == "base" or model in tl.domains:
            return model
        raise APIError(404, f"model {model!r} does not exist; available: {', '.join(model_ids)}",
                       param="model", code="model_not_found")

    def encode(text: str, what: str, *, allow_empty: bool = False) -> list[int]:
        try:
            ids = tl.tokenizer(text, add_special_tokens=False)["input_ids"]
        except (TypeError, ValueError) as exc:  # e.g. lone surrogates, which JSON can carry
            raise APIError(400, f"{what} is not valid Unicode text", param=what) from exc
        if not ids and not allow_empty:
            raise APIError(400, f"{what} is empty", param=what)
        return ids

    def check_lengths(prompt_ids: list[int], max_new: int) -> None:
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; the limit is {settings.max_prompt_tokens}",
                           code="context_length_exceeded")
        if len(prompt_ids) + max_new > tl.context_length:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_new}) exceeds the "
                           f"model's context of {tl.context_length}", code="context_length_exceeded")

    def sampling_for(req: _Common, max_new: int, index: int) -> Sampling:
        stops = req.stop_list()
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop strings", param="stop")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        return Sampling(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                        seed=(seed + index) % 2**63, stop=stops, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty)

    def max_new_for(req: _Common, requested: int | None) -> int:
        max_new = requested or settings.default_max_tokens
        if max_new > settings.max_new_tokens:
            raise APIError(400, f"max_tokens {max_new} exceeds the server's limit of {settings.max_new_tokens}",
                           param="max_tokens")
        return max_new

    def routing_info(model: str, forced: str | None, mode: str, decision: RouteDecision | None,
                     weights: dict[str, float] | None) -> dict:
        chosen = forced if forced else (decision.domain if decision and decision.domain else "base")
        info = {"model": model, "domain": chosen, "mode": "forced" if forced else mode, "routed": forced is None,
                "abstained": bool(decision and decision.abstained), "confidence": None, "probs": None,
                "weights": weights}
        if decision is not None:
            info.update(confidence=decision.confidence, probs=decision.probs)
        return info

    def count_route(info: dict) -> None:
        metrics.routes.labels(info["domain"], "routed" if info["routed"] else "forced").inc()
        if info["abstained"]:
            metrics.abstentions.inc()

    def route_header(infos: list[dict]) -> dict[str, str]:
        seen = list(dict.fromkeys(i["domain"] for i in infos))
        return {"X-Route": ",".join(seen)}

    # ------------------------------------------------------------------ generation core
    async def generate(kind: str, req: _Common, prompts: list[list[int]], route_texts: list[list[int]],
                       max_new: int):
        """Submit n jobs per prompt to the engine; return a JSON response or an SSE stream."""
        forced = resolve_model(req.model)
        mode = req.routing_mode or settings.routing_mode
        release = acquire()
        call = _Call(release)
        try:
            sampling = [sampling_for(req, max_new, i) for i in range(req.n)]
            for prompt_ids, route_ids in zip(prompts, route_texts, strict=True):
                route = Route(domain=forced, route_ids=None if forced else route_ids, mode=mode, top_k=req.top_k)
                for s in sampling:
                    engine.submit(call.job(prompt_ids, route, s))
        except BaseException:
            call.cancel()
            release()
            raise
        started = time.perf_counter()
        metrics.tokens.labels("prompt").inc(sum(len(p) for p in prompts))
        rid = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        k = len(call.jobs)
        routes: list[dict | None] = [None] * k
        early: list[tuple[int, tuple]] = []
        # The routing decision comes first from the engine; it goes into the X-Route header.
        try:
            while any(r is None for r in routes):
                index, event = await call.queue.get()
                if event[0] == "route":
                    routes[index] = routing_info(req.model, forced, mode, event[1], event[2])
                elif event[0] == "error":
                    raise event[1]
                else:
                    early.append((index, event))
        except BaseException:
            call.cancel()
            raise
        for info in routes[:: req.n]:
            count_route(info)
        headers = route_header(routes)
        usage_prompt = sum(len(p) for p in prompts)

        async def events() -> AsyncIterator[tuple[int, tuple]]:
            for item in early:
                yield item
            remaining = k - sum(1 for _, e in early if e[0] == "done")
            while remaining:
                index, event = await call.queue.get()
                if event[0] == "error":
                    raise event[1]
                if event[0] == "done":
                    remaining -= 1
                yield index, event

        def finish_metrics(completion_tokens: int) -> None:
            metrics.tokens.labels("completion").inc(completion_tokens)
            metrics.latency.labels(f"/v1/{'completions' if kind == 'text' else 'chat/completions'}").observe(
                time.perf_counter() - started)

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
            finish_metrics(sum(counts))
            choices = []
            for i in range(k):
                choice = {"index": i, "finish_reason": reasons[i], "routing": routes[i]}
                if kind == "text":
                    choice.update(text=texts[i], logprobs=None)
                else:
                    choice["message"] = {"role": "assistant", "content": texts[i]}
                choices.append(choice)
            body = {"id": rid, "object": "text_completion" if kind == "text" else "chat.completion",
                    "created": created, "model": req.model, "choices": choices,
                    "usage": {"prompt_tokens": usage_prompt, "completion_tokens": sum(counts),
                              "total_tokens": usage_prompt + sum(counts)},
                    "routing": routes[0]}
            return JSONResponse(body, headers=headers)

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        obj = "text_completion" if kind == "text" else "chat.completion.chunk"

        def chunk(index: int, delta: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "text":
                choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
            else:
                d = {} if delta is None else {"content": delta}
                if first:
                    d = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
            if first:
                payload["routing"] = routes[index]
            return f"data: {json.dumps(payload)}\n\n"

        async def stream() -> AsyncIterator[str]:
            total = 0
            first_text = True
            try:
                for i in range(k):
                    yield chunk(i, None if kind != "text" else "", None, first=True)
                async for index, event in events():
                    if event[0] == "text":
                        if first_text:
                            metrics.first_token.observe(time.perf_counter() - started)
                            first_text = False
                        yield chunk(index, event[1], None)
                    elif event[0] == "done":
                        total += event[2]
                        yield chunk(index, None if kind != "text" else "", event[1])
                if include_usage:
                    usage = {"prompt_tokens": usage_prompt, "completion_tokens": total,
                             "total_tokens": usage_prompt + total}
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': req.model, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                finish_metrics(total)
            except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
                err = {"error": {"message": f"generation failed: {exc}", "type": "server_error"}}
                yield f"data: {json.dumps(err)}\n\n"

        async def close() -> None:
            call.cancel()  # a client that went away frees its batch row at the next decoding step

        return _EventStream(stream(), on_close=close, headers=headers)

    # ------------------------------------------------------------------ endpoints
    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        html = resources.files("temporal_lora.server").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "domains": tl.domains, "base_model": tl.base_id,
                "backend": settings.backend_url or "local", "in_flight": slots["in_flight"]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created,
                                            "owned_by": "temporal-lora"} for m in model_ids]}

    @app.post("/v1/route", dependencies=[Depends(authorize)])
    async def route(req: RouteRequest) -> JSONResponse:
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise APIError(400, "input is empty", param="input")
        for i, text in enumerate(texts):
            check_lengths(encode(text, f"input[{i}]"), 0)
        decisions = await asyncio.to_thread(engine.route, texts)
        data = [{"index": i, **d.to_dict()} for i, d in enumerate(decisions)]
        if req.segments:  # per-segment routes on request (segment routing with hysteresis)
            per_text = await asyncio.to_thread(engine.route_segments, texts, req.segments)
            for row, segments in zip(data, per_text, strict=True):
                row["segments"] = [s.to_dict() for s in segments]
        return JSONResponse({"object": "list", "data": data},
                            headers={"X-Route": ",".join(dict.fromkeys(d.domain or "base" for d in decisions))})

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest):
        if req.echo or req.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if req.echo else "logprobs")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) * req.n > MAX_SEQUENCES:
            raise APIError(400, f"at most {MAX_SEQUENCES} sequences per request (prompts x n)", param="prompt")
        max_new = max_new_for(req, req.max_tokens)
        ids = [encode(p, "prompt") for p in prompts]
        for p in ids:
            check_lengths(p, max_new)
        if backend:
            return await forward("/completions", req, prompts, max_new)
        return await generate("text", req, ids, ids, max_new)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatRequest):
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if not getattr(tl.tokenizer, "chat_template", None):
            raise APIError(400, f"base model {tl.base_id!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        max_new = max_new_for(req, req.max_completion_tokens or req.max_tokens)
        prompt = tl.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = encode(prompt, "messages")
        check_lengths(prompt_ids, max_new)
        route_text = chat_route_text(req)
        if backend:
            return await forward("/chat/completions", req, [route_text], max_new)
        return await generate("chat", req, [prompt_ids], [encode(route_text, "messages")], max_new)

    def chat_route_text(req: ChatRequest) -> str:
        turns = [m.text() for m in req.messages if m.role == "user" and m.text().strip()]
        if not turns:
            raise APIError(400, "messages hold no user message to answer", param="messages")
        picked, tokens = [], 0
        for text in reversed(turns):
            picked.insert(0, text)
            tokens += len(encode(text, "messages", allow_empty=True))
            if tokens >= CHAT_ROUTE_TOKENS:
                break
        return "\n".join(picked)

    # ------------------------------------------------------------------ scale-out: forward to an engine
    async def forward(path: str, req: _Common, route_texts: list[str], max_new: int):
        forced = resolve_model(req.model)
        mode = req.routing_mode or settings.routing_mode
        if mode != "hard" and forced is None:
            raise APIError(400, "with a backend engine only hard routing is possible (one adapter per request)",
                           param="routing_mode")
        if len(route_texts) != 1:
            raise APIError(400, "with a backend engine, send one prompt per request", param="prompt")
        release = acquire()
        streaming = False
        try:
            decision, weights = None, None
            if forced is None:
                decision = (await asyncio.to_thread(engine.route, route_texts))[0]
                weights = {d: float(d == decision.domain) for d in tl.domains}
            else:
                weights = {d: float(d == forced) for d in tl.domains}
            info = routing_info(req.model, forced, "hard", decision, weights)
            count_route(info)
            target = info["domain"] if info["domain"] != "base" else settings.backend_base_model
            payload = req.model_dump(exclude_unset=True, exclude={"routing_mode", "top_k"})
            payload["model"] = target
            payload["max_tokens"] = max_new
            payload.pop("max_completion_tokens", None)
            headers = route_header([info])
            if not req.stream:
                body = await backend.complete(path, payload)
                body["model"] = req.model
                body["routing"] = info
                return JSONResponse(body, headers=headers)
            lines = await backend.stream(path, payload)
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

        return _EventStream(relay(), on_close=close, headers=headers)

    return app
