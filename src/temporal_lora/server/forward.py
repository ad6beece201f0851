"""Forwarding to an OpenAI-compatible multi-LoRA engine (vLLM, LoRAX, SGLang, or another tlora server).

Our router decides; the engine generates with the adapter it serves under the domain's name.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx


class BackendError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Backend:
    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self.client.aclose()

    async def complete(self, path: str, payload: dict) -> dict:
        return (await self.post(path, payload)).json()

    async def post(self, path: str, payload: dict) -> httpx.Response:
        """POST and return the 200 answer (control calls such as vLLM's /v1/load_lora_adapter answer
        plain text); anything else raises BackendError."""
        try:
            resp = await self.client.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise BackendError(502, f"backend {self.url} unreachable: {exc}") from exc
        if resp.status_code != 200:
            raise BackendError(resp.status_code, _message(resp.content, resp.status_code))
        return resp

    async def stream(self, path: str, payload: dict) -> EventLines:
        """Open the stream, raising on a non-200 answer; iterate the result for each event's data."""
        request = self.client.build_request("POST", path, json=payload)
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise BackendError(502, f"backend {self.url} unreachable: {exc}") from exc
        if resp.status_code != 200:
            body = await resp.aread()
            await resp.aclose()
            raise BackendError(resp.status_code, _message(body, resp.status_code))
        return EventLines(resp)


class EventLines:
    """The data fields of a server-sent event stream; `aclose` ends the upstream request."""

    def __init__(self, resp: httpx.Response):
        self.resp = resp

    async def __aiter__(self) -> AsyncIterator[str]:
        async for line in self.resp.aiter_lines():
            if line.startswith("data:"):
                yield line[5:].strip()

    async def aclose(self) -> None:
        await self.resp.aclose()


def _message(body: bytes, status: int) -> str:
    """The error message of an OpenAI-style ({"error": {"message"}}) or vLLM-style ({"message"}) body."""
    try:
        data = json.loads(body)
        return data["error"]["message"] if isinstance(data.get("error"), dict) else str(data["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"backend answered HTTP {status}"
