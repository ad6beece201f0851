"""What the API does for a request, as one facade over the parts that do it: validation
(validation.py), admission (admission.py), local generation (generation.py) or forwarding to a
backend engine (relay.py), and the live bundle version (residency.py). No HTTP here: methods return
`Answer` / `Stream` values or raise named errors, and app.py turns both into responses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.segments import SegmentConfig
from temporal_lora.server.admission import Admission
from temporal_lora.server.answers import Answer, Stream, route_answer
from temporal_lora.server.engine import Engine
from temporal_lora.server.forward import Backend
from temporal_lora.server.generation import Generator
from temporal_lora.server.live import Live
from temporal_lora.server.metrics import Metrics
from temporal_lora.server.relay import Relay
from temporal_lora.server.residency import Residency
from temporal_lora.server.schemas import ChatRequest, CompletionRequest
from temporal_lora.server.settings import ServerSettings
from temporal_lora.server.validation import Prepared, RequestChecks

__all__ = ["ServerSettings", "Service"]


class Service:
    """Every request runs on the bundle version (`Unit`) that was live when it was admitted."""

    def __init__(self, tl: TemporalLoRA, settings: ServerSettings, *, bundle: str | Path | None = None,
                 loader: Callable[[Path], TemporalLoRA] | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.backend = None
        if settings.backend_url:
            self.backend = Backend(settings.backend_url, api_key=settings.backend_api_key,
                                   timeout=settings.backend_timeout_s)
        self.residency = Residency(tl, settings, self.metrics, self.backend, bundle=bundle, loader=loader)
        self.checks = RequestChecks(settings)
        self.admission = Admission(settings.max_concurrency, self.metrics, self.live)
        self.generator = Generator(self.checks, self.admission, self.metrics)
        self.relay = None
        if self.backend:
            self.relay = Relay(self.backend, settings, self.checks, self.admission, self.metrics)

    @property
    def live(self) -> Live:
        return self.residency.live

    @property
    def tl(self) -> TemporalLoRA:
        return self.live.unit.tl

    @property
    def engine(self) -> Engine:
        return self.live.unit.engine

    @property
    def model_ids(self) -> list[str]:
        return self.live.unit.model_ids

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    async def start(self) -> None:
        await self.residency.start()

    async def close(self) -> None:
        self.residency.close()
        if self.backend:
            await self.backend.close()

    # ------------------------------------------------------------------ versions and adapters
    async def reload(self, force: bool = False) -> dict:
        return await self.residency.reload(force=force)

    def bundle_info(self) -> dict:
        return self.residency.bundle_info()

    async def load_adapter(self, name: str, path: str) -> str:
        return await self.residency.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> str:
        return await self.residency.unload_adapter(name)

    # ------------------------------------------------------------------ requests
    # Each takes the live unit and admits (pins) it with no await between, so a reload cannot
    # close it under the request.
    async def completions(self, req: CompletionRequest) -> Answer | Stream:
        return await self._run(self.checks.completion(req, self.live.unit))

    async def chat_completions(self, req: ChatRequest) -> Answer | Stream:
        return await self._run(self.checks.chat(req, self.live.unit))

    async def _run(self, p: Prepared) -> Answer | Stream:
        if self.relay is not None:
            return await self.relay.forward(p)
        return await self.generator.generate(p)

    async def route(self, texts: list[str], segments: str | None) -> Answer:
        self.checks.route_inputs(texts, self.live.unit.tl)
        config = SegmentConfig.parse(segments) if segments else None
        unit = self.live.pin()
        try:
            rows = await asyncio.to_thread(unit.engine.route_texts, texts, config)
        finally:
            self.live.unpin(unit)
        return route_answer(rows, unit.version)
