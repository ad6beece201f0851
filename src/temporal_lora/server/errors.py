"""The named errors of the API's request handling. They carry no HTTP status: app.py maps each class
to its status code and OpenAI error body (RequestError 400, UnknownNameError 404, ServerBusyError 429,
VersionClosedError 503, live.ReloadError 409 on POST /admin/reload)."""

from __future__ import annotations

from temporal_lora.errors import InputError


class RequestError(InputError):
    """A request refused as invalid: `param` names the offending field, `code` is OpenAI's error code."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class UnknownNameError(RequestError):
    """A model or runtime adapter name the server does not serve."""


class ServerBusyError(Exception):
    """Every concurrency slot is taken: the request is shed, the client should retry shortly."""


class VersionClosedError(Exception):
    """The bundle version a request was admitted on closed before it was pinned (a retry succeeds)."""
