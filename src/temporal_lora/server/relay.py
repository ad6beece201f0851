"""Scale-out: our router decides, a backend OpenAI-compatible multi-LoRA engine (server/forward.py)
generates with the chosen domain's adapter, and its answer is relayed with our `routing` added."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from temporal_lora.server.admission import Admission
from temporal_lora.server.answers import Answer, Stream, routing_info
from temporal_lora.server.forward import Backend
from temporal_lora.server.metrics import Metrics
from temporal_lora.server.settings import ServerSettings
from temporal_lora.server.validation import Prepared, RequestChecks


class Relay:
    """Forwards prepared requests to `backend` under the routed domain's name (hard routing only)."""

    def __init__(self, backend: Backend, settings: ServerSettings, checks: RequestChecks, admission: Admission,
                 metrics: Metrics):
        self.backend, self.settings, self.checks = backend, settings, checks
        self.admission, self.metrics = admission, metrics

    async def forward(self, p: Prepared) -> Answer | Stream:
        req, unit = p.req, p.unit
        forced = self.checks.resolve_model(req.model, unit)
        self.checks.forwardable(p, forced, self.checks.mode(req))
        release = self.admission.admit(unit)
        path = "/completions" if p.kind == "text" else "/chat/completions"
        streaming = False
        try:
            decision = None
            if forced is None:
                decision = (await asyncio.to_thread(unit.engine.route, p.route_texts))[0]
            weights = unit.tl.named(unit.tl.domain_weights(forced or decision.domain, 1)[0])
            info = routing_info(self.metrics, unit, req.model, forced, "hard", decision, weights)
            target = info["domain"] if info["domain"] != "base" else self.settings.backend_base_model
            payload = req.model_dump(exclude_unset=True, exclude={"routing_mode", "top_k", "max_completion_tokens"})
            payload.update(model=target, max_tokens=p.max_new)
            headers = {"X-Route": info["domain"], "X-Bundle-Version": str(unit.version)}
            if not req.stream:
                body = await self.backend.complete(path, payload)
                body.update(model=req.model, routing=info)
                return Answer(body, headers)
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

        return Stream(relay(), close, headers)
