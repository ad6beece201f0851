"""HTTP plumbing: OpenAI-style errors, the request-body guard, event streams that always clean up."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse, StreamingResponse

from temporal_lora.server.metrics import Metrics

KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/route",
               "/v1/bundle", "/admin/reload", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


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


class BodyGuard:
    """ASGI middleware: refuse oversized bodies (413) before parsing, count responses by status."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"  # bounded label values
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
            await self._too_large()(scope, receive, counting_send)
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
                    await self._too_large()(scope, receive, counting_send)
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

    def _too_large(self) -> JSONResponse:
        return APIError(413, f"request body is larger than the limit of {self.limit} bytes").response()


class EventStream(StreamingResponse):
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
