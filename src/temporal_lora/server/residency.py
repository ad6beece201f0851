"""Residency: which bundle version (`Unit`) serves new requests, and which adapters are loaded.

Reloads of the bundle, vLLM-style runtime adapter loading and unloading on our own server, and,
when generation is forwarded, telling the backend engine which adapters to load or drop. Versions
are swapped by server/live.py; this module decides what goes into a version and who hears of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path

from temporal_lora.model import TemporalLoRA
from temporal_lora.server.errors import RequestError, UnknownNameError
from temporal_lora.server.forward import Backend, BackendError
from temporal_lora.server.live import ADAPTER_NAME, Live, ReloadError, Unit, log
from temporal_lora.server.llamacpp_engine import make_engine
from temporal_lora.server.metrics import Metrics
from temporal_lora.server.settings import ServerSettings


class Residency:
    """The live bundle version and its reloads. With a `backend` (and backend_lora_updates 'vllm'),
    the engine learns a new version's adapters before the swap and drops unused ones after."""

    def __init__(self, tl: TemporalLoRA, settings: ServerSettings, metrics: Metrics, backend: Backend | None, *,
                 bundle: str | Path | None = None, loader: Callable[[Path], TemporalLoRA] | None = None):
        self.settings, self.backend = settings, backend
        tell = backend is not None and settings.backend_lora_updates == "vllm"
        # Forwarding generates elsewhere: the local engine only routes, so it stays the torch one.
        engine = partial(make_engine, choice="torch" if backend else settings.engine,
                         weights=settings.engine_weights, n_threads=settings.engine_threads)
        self.live = Live(tl, metrics, max_batch=settings.max_batch, bundle=bundle,
                         loader=loader or TemporalLoRA.from_pretrained,
                         prepare=self.engine_loads if tell else None, on_free=self.engine_unloads if tell else None,
                         make_engine=engine)
        self._watcher: asyncio.Task | None = None

    @property
    def unit(self) -> Unit:
        """The version new requests start on."""
        return self.live.unit

    async def start(self) -> None:
        """Poll the bundle for new versions (when served from a directory and polling is on)."""
        if self.live.bundle is not None and self.settings.reload_poll_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self.live.watch(self.settings.reload_poll_s))

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.live.close()

    # ------------------------------------------------------------------ versions
    async def reload(self, force: bool = False) -> dict:
        """Load the bundle's committed version beside the live one and swap; raises ReloadError when
        it is refused (the old version keeps serving)."""
        return await self.live.reload(force=force)

    def bundle_info(self) -> dict:
        """What GET /v1/bundle answers."""
        unit = self.live.unit
        return {"object": "bundle", **unit.describe(), "versions_alive": [u.version for u in self.live.units],
                "last_reload_error": self.live.last_error}

    # ------------------------------------------------------------------ runtime adapters
    async def load_adapter(self, name: str, path: str) -> str:
        """Our own server as a multi-LoRA engine: vLLM's runtime adapter loading, same request and
        answer. The adapter is loaded beside the live unit and swapped in like a new bundle version."""
        unit = self.live.unit
        if not ADAPTER_NAME.match(name or "") or name in ("auto", "base"):
            raise RequestError(f"invalid adapter name {name!r}", param="lora_name")
        if name in unit.tl.domains or name in unit.extras:
            raise RequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        folder = Path(path or "")
        if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
            raise RequestError(f"{path!r} is not a PEFT adapter folder (adapter_config.json and "
                               "adapter_model.safetensors)", param="lora_path")
        await self._reload_extras({**unit.extras, name: str(folder.resolve())})
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, name: str) -> str:
        """vLLM's runtime adapter unloading (runtime-loaded adapters only, not the bundle's domains)."""
        unit = self.live.unit
        if name not in unit.extras:
            if name not in unit.tl.domains:
                raise UnknownNameError(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            raise RequestError(f"'{name}' is a domain of the bundle, not a runtime-loaded adapter", param="lora_name")
        await self._reload_extras({k: v for k, v in unit.extras.items() if k != name})
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def _reload_extras(self, extras: dict[str, str]) -> None:
        if self.live.bundle is None:
            raise RequestError("this server was started without a bundle directory")
        try:
            await self.live.reload(force=True, extras=extras, reason="adapters")
        except ReloadError as exc:
            raise RequestError(str(exc), param="lora_path") from exc

    # ------------------------------------------------------------------ the backend engine's adapters
    async def engine_loads(self, old: Unit, new: Unit) -> None:
        """Forwarding: before the swap, the engine learns the new version's new or changed adapters."""
        before, after = adapter_digests(old.manifest), adapter_digests(new.manifest)
        for domain, digest in after.items():
            if before.get(domain) == digest:
                continue
            if domain in before:  # same name, other weights: replace it
                await self._engine_call("/unload_lora_adapter", {"lora_name": domain}, missing_ok=True)
            path = (self.live.bundle / new.manifest["adapters"][domain]["path"]).resolve()
            await self._engine_call("/load_lora_adapter", {"lora_name": domain, "lora_path": str(path)})
            log.info("engine %s loaded adapter %r", self.backend.url, domain)

    async def engine_unloads(self, freed: Unit) -> None:
        """Forwarding: once the old version drained, the engine drops adapters no live version uses."""
        live = adapter_digests(self.live.unit.manifest)
        for domain in adapter_digests(freed.manifest):
            if domain not in live:
                try:
                    await self._engine_call("/unload_lora_adapter", {"lora_name": domain}, missing_ok=True)
                except BackendError as exc:
                    log.warning("engine %s did not unload adapter %r: %s", self.backend.url, domain, exc)

    async def _engine_call(self, path: str, payload: dict, missing_ok: bool = False) -> None:
        try:
            await self.backend.post(path, payload)
        except BackendError as exc:
            text = str(exc).lower()
            if "already" in text and "loaded" in text:
                return  # the engine serves it already (e.g. started with --lora-modules)
            if missing_ok and exc.status in (400, 404) and ("not found" in text or "cannot be found" in text):
                return
            raise


def adapter_digests(manifest: dict) -> dict[str, str]:
    """Each domain's adapter weights digest in a manifest ({} for a manifest not read from disk)."""
    files = manifest.get("files") or {}
    out = {}
    for domain, entry in (manifest.get("adapters") or {}).items():
        out[domain] = files.get(f"{entry['path']}/adapter_model.safetensors", "")
    return out
