"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /v1/route.

Generation runs in the batching `Engine` (local) or is forwarded to an OpenAI-compatible multi-LoRA
engine (`Backend`) after our router decided. Every response says how it was routed: a `routing`
object in the body and an `X-Route` header. This module wires HTTP to `Service`: routes, status
codes (each named error of server/errors.py maps to one) and response types live here.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from temporal_lora.errors import TemporalLoRAError
from temporal_lora.meta import __version__
from temporal_lora.model import TemporalLoRA
from temporal_lora.server.answers import Answer, Stream
from temporal_lora.server.errors import (
    RequestError,
    ServerBusyError,
    UnknownNameError,
    VersionClosedError,
)
from temporal_lora.server.forward import BackendError
from temporal_lora.server.live import ReloadError
from temporal_lora.server.schemas import (
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    RouteRequest,
    UnloadAdapterRequest,
)
from temporal_lora.server.service import Service
from temporal_lora.server.settings import ServerSettings
from temporal_lora.server.transport import APIError, BodyGuard, EventStream

__all__ = ["APIError", "ServerSettings", "create_app"]


def create_app(tl: TemporalLoRA, settings: ServerSettings | None = None, *, bundle: str | Path | None = None,
               loader: Callable[[Path], TemporalLoRA] | None = None) -> FastAPI:
    """Build the FastAPI app around a loaded bundle. The engine thread starts here.

    With `bundle` (the directory `tl` was loaded from) the server follows the bundle's versions:
    it polls manifest.json every `settings.reload_poll_s` seconds and reloads on POST /admin/reload;
    `loader(bundle)` loads a version (default `TemporalLoRA.from_pretrained`)."""
    settings = settings or ServerSettings()
    if settings.routing_mode not in ("hard", "soft", "topk"):
        raise TemporalLoRAError(f"unknown routing mode {settings.routing_mode!r}")
    if settings.engine not in ("torch", "llama-cpp", "auto") or settings.engine_threads < 1:
        raise TemporalLoRAError(f"unknown engine {settings.engine!r} (or engine_threads < 1)")
    if settings.backend_lora_updates not in ("vllm", "off"):
        raise TemporalLoRAError(f"unknown backend adapter updates {settings.backend_lora_updates!r}")
    service = Service(tl, settings, bundle=bundle, loader=loader)

    @asynccontextmanager
    async def lifespan(_app):
        await service.start()
        yield
        await service.close()

    app = FastAPI(title="Temporal LoRA", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API with automatic per-request routing to domain LoRA adapters.")
    app.add_middleware(BodyGuard, limit=settings.max_body_bytes, metrics=service.metrics)
    app.state.service = service  # its `engine` is the live version's (a reload replaces it)

    # ------------------------------------------------------------------ errors and auth
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

    @app.exception_handler(RequestError)
    async def _refused(_request, exc: RequestError):
        return APIError(400, exc.message, param=exc.param, code=exc.code).response()

    @app.exception_handler(UnknownNameError)
    async def _unknown(_request, exc: UnknownNameError):
        return APIError(404, exc.message, param=exc.param, code=exc.code).response()

    @app.exception_handler(ServerBusyError)
    async def _busy(_request, exc: ServerBusyError):
        return APIError(429, str(exc), type="rate_limit_error", code="concurrency_limit",
                        headers={"Retry-After": "1"}).response()

    @app.exception_handler(VersionClosedError)
    async def _closed(_request, exc: VersionClosedError):
        return APIError(503, str(exc), type="server_error", headers={"Retry-After": "0"}).response()

    @app.exception_handler(BackendError)
    async def _backend(_request, exc: BackendError):
        status = exc.status if 400 <= exc.status < 500 else 502
        kind = "backend_error" if status == 502 else "invalid_request_error"
        return APIError(status, f"backend: {exc}", type=kind).response()

    @app.exception_handler(TemporalLoRAError)
    async def _ours(_request, exc: TemporalLoRAError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Constant-time comparison: response timing must not reveal how much of a key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    # ------------------------------------------------------------------ endpoints
    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        html = resources.files("temporal_lora.server").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> dict:
        unit = service.live.unit
        return {"status": "ok", "domains": unit.tl.domains, "base_model": unit.tl.base_id,
                "backend": settings.backend_url or "local", "in_flight": service.in_flight,
                "bundle_version": unit.version}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created,
                                            "owned_by": "temporal-lora"} for m in service.model_ids]}

    @app.get("/v1/bundle", dependencies=[Depends(authorize)])
    async def bundle_info() -> dict:
        return service.bundle_info()

    @app.post("/admin/reload", dependencies=[Depends(authorize)])
    async def reload(force: bool = False) -> dict:
        try:
            return await service.reload(force=force)
        except ReloadError as exc:
            raise APIError(409, str(exc), type="reload_refused", code="reload_refused") from exc

    if settings.runtime_lora_updates:  # vLLM's runtime adapter endpoints (its VLLM_ALLOW_RUNTIME_LORA_UPDATING)
        @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize)])
        async def load_lora_adapter(req: LoadAdapterRequest) -> PlainTextResponse:
            return PlainTextResponse(await service.load_adapter(req.lora_name, req.lora_path))

        @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize)])
        async def unload_lora_adapter(req: UnloadAdapterRequest) -> PlainTextResponse:
            return PlainTextResponse(await service.unload_adapter(req.lora_name))

    @app.post("/v1/route", dependencies=[Depends(authorize)])
    async def route(req: RouteRequest) -> Response:
        return respond(await service.route([req.input] if isinstance(req.input, str) else list(req.input),
                                           req.segments))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest) -> Response:
        return respond(await service.completions(req))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatRequest) -> Response:
        return respond(await service.chat_completions(req))

    return app


def respond(answer: Answer | Stream) -> Response:
    """A whole answer as JSON, a streamed one as server-sent events."""
    if isinstance(answer, Stream):
        return EventStream(answer.events, on_close=answer.close, headers=answer.headers)
    return JSONResponse(answer.body, headers=answer.headers)
