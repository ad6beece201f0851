"""OpenAI-compatible HTTP server: automatic routing, batched generation, a playground page."""

from __future__ import annotations

from pathlib import Path

from temporal_lora.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app", "serve"]


def serve(bundle: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          settings: ServerSettings | None = None, abstain_threshold: float | None = None) -> None:
    """Load a bundle and serve it until interrupted (binds to loopback unless told otherwise)."""
    import uvicorn

    from temporal_lora.model import TemporalLoRA

    tl = TemporalLoRA.from_pretrained(bundle)
    if abstain_threshold is not None:
        tl.router_config.abstain_threshold = abstain_threshold
    uvicorn.run(create_app(tl, settings), host=host, port=port, log_level="info")
