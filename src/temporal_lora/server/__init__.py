"""OpenAI-compatible HTTP server: automatic routing, batched generation, a playground page."""

from __future__ import annotations

from pathlib import Path

from temporal_lora.model import TemporalLoRA
from temporal_lora.server.app import create_app
from temporal_lora.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]


def serve(bundle: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          settings: ServerSettings | None = None, abstain_threshold: float | None = None) -> None:
    """Load a bundle and serve it until interrupted (binds to loopback unless told otherwise);
    new committed versions of the bundle go live without a restart (see `create_app`)."""
    import logging

    import uvicorn

    def load(path: Path) -> TemporalLoRA:
        tl = TemporalLoRA.from_pretrained(path)
        if abstain_threshold is not None:
            tl.router_config.abstain_threshold = abstain_threshold
        return tl

    log = logging.getLogger("temporal_lora.server")  # reloads and refused versions
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(load(Path(bundle)), settings, bundle=bundle, loader=load)
    uvicorn.run(app, host=host, port=port, log_level="info")
