"""Hot reload: the version of the bundle a server answers with, swapped without dropping a request.

A `Unit` is one loaded bundle version: its `TemporalLoRA`, its own batching `Engine` (one worker
thread, its own model copy) and the version number. `Live` holds the unit new requests start on.
Each request pins the unit it was admitted on and unpins it when its last job ends, so its route
and adapters never change mid-answer. A reload loads the new version *beside* the old one (in a
worker thread, while both keep serving), then switches the pointer on the event loop: requests
admitted from then on use the new unit; the old one is closed and freed when its last request ends.
A version that fails to load (checksum mismatch, another base model, a half-written or vanished
bundle) is refused and logged, and the old version keeps serving.

New versions are noticed by polling manifest.json (its digest, every `reload_poll_s` seconds):
portable (inotify is Linux-only and misses renames of a watched directory, which is exactly how a
bundle version is committed) and cheap (one small file read). `POST /admin/reload` reloads at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from temporal_lora.bundle import MANIFEST
from temporal_lora.errors import BundleError
from temporal_lora.mixing import AdapterMixer
from temporal_lora.model import TemporalLoRA
from temporal_lora.server.engine import Engine
from temporal_lora.server.metrics import Metrics
from temporal_lora.versions import current_version

log = logging.getLogger("temporal_lora.server")

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOAD_ATTEMPTS = 3  # a version committed while we were loading the previous one: load again


class ReloadError(Exception):
    """A new version (or runtime adapter set) was refused; the old version keeps serving."""


@dataclass(eq=False)
class Unit:
    """One loaded bundle version (plus any runtime-loaded adapters) and the engine decoding it."""

    tl: TemporalLoRA | None
    engine: Engine | None
    version: int
    manifest: dict
    digest: str | None  # sha256 of the manifest.json bytes it was loaded from (None: not known)
    extras: dict[str, str] = field(default_factory=dict)  # runtime adapters: name -> folder
    refs: int = 0  # requests admitted on this unit and not finished
    retired: bool = False  # no longer live: freed when refs reaches 0
    closed: bool = False

    @property
    def model_ids(self) -> list[str]:
        styles = self.tl.styles.route_names() if getattr(self.tl, "styles", None) else []
        return ["auto", *self.tl.domains, *styles, *self.extras, "base"]

    def serves(self, name: str) -> bool:
        styles = self.tl.styles.route_names() if getattr(self.tl, "styles", None) else []
        return name == "base" or name in self.tl.domains or name in self.extras or name in styles

    def describe(self) -> dict:
        """What GET /v1/bundle answers for this unit."""
        tl = self.tl
        subdomains = {p: list(s.children) for p, s in tl.hierarchy.subs.items()} if tl.hierarchy else {}
        return {"version": self.version, "domains": list(tl.domains), "subdomains": subdomains,
                "runtime_adapters": list(self.extras), "base_model": tl.base_id,
                "history": self.manifest.get("history") or tl.info.get("history") or []}


def manifest_version(manifest: dict) -> int:
    return current_version(manifest) if manifest.get("domains") is not None else 1


def peek(bundle: Path) -> tuple[str, dict, tuple] | None:
    """(digest, parsed manifest, stamp) of the bundle's manifest.json now; None while it is
    unreadable (e.g. in the instant between the two renames of a commit). The stamp (inode,
    mtime) tells a re-committed copy of a manifest from the one a refusal was about."""
    try:
        path = bundle / MANIFEST
        stat = path.stat()
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return digest, manifest, (digest, stat.st_ino, stat.st_mtime_ns)


def attach_runtime_adapters(tl: TemporalLoRA, extras: dict[str, str]) -> None:
    """Load PEFT adapter folders onto `tl` as forced-only adapters (after domains and subdomains)."""
    if not extras:
        return
    names = list(tl.mixer.adapter_names)
    tl.mixer.remove()
    for name, folder in extras.items():
        if not (Path(folder) / "adapter_model.safetensors").is_file():
            raise BundleError(f"adapter folder {folder} has no adapter_model.safetensors")
        tl.peft_model.load_adapter(str(folder), adapter_name=name)
    tl.peft_model.eval()
    tl.mixer = AdapterMixer(tl.peft_model, names + list(extras))


def release_memory() -> None:
    """Collect the freed version's reference cycles (hooks) and hand free heap pages back to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its pages for reuse
        pass


class Live:
    """The live unit, the units still draining, reloads and the manifest watcher."""

    def __init__(self, tl: TemporalLoRA, metrics: Metrics, *, max_batch: int, bundle: Path | None,
                 loader: Callable[[Path], TemporalLoRA],
                 prepare: Callable[[Unit, Unit], Awaitable[None]] | None = None,
                 on_free: Callable[[Unit], Awaitable[None]] | None = None,
                 make_engine: Callable[..., Engine] = Engine):
        self.metrics = metrics
        self.make_engine = make_engine  # (tl, max_batch=, on_batch=, name=) -> the unit's engine
        self.max_batch = max_batch
        self.bundle = Path(bundle) if bundle is not None else None
        self.loader = loader
        self.prepare = prepare  # before a swap: e.g. tell a backend engine about new adapters
        self.on_free = on_free  # after an old unit drained: e.g. unload adapters it alone used
        version = int((tl.info.get("history") or [{"version": 1}])[-1]["version"])
        digest, manifest = None, {"history": tl.info.get("history") or []}
        seen = peek(self.bundle) if self.bundle else None
        if seen and manifest_version(seen[1]) == version:
            digest, manifest = seen[:2]
        self.unit = self._start(tl, version, manifest, digest, {})
        self.units = [self.unit]
        self.refused: tuple | None = None  # stamp of the last manifest refused (the watcher skips it)
        self.last_error: dict | None = None
        self._lock = asyncio.Lock()  # one reload at a time
        self._tasks: set[asyncio.Task] = set()
        self.metrics.bundle_version.set(version)
        self.metrics.versions_alive.set(1)

    def _start(self, tl, version: int, manifest: dict, digest: str | None, extras: dict[str, str]) -> Unit:
        engine = self.make_engine(tl, max_batch=self.max_batch, on_batch=self.metrics.batch_size.observe,
                                  name=f"tlora-engine-v{version}")
        return Unit(tl, engine, version, manifest, digest, dict(extras))

    # ------------------------------------------------------------------ requests pin their unit
    def pin(self, unit: Unit | None = None) -> Unit:
        """Count one more request on `unit` (default: the live one); `unpin` when it has ended."""
        unit = unit or self.unit
        unit.refs += 1
        return unit

    def unpin(self, unit: Unit) -> None:
        unit.refs -= 1
        self._maybe_free(unit)

    def _maybe_free(self, unit: Unit) -> None:
        if not unit.retired or unit.refs > 0 or unit.closed:
            return
        unit.closed = True
        self.units.remove(unit)
        self.metrics.versions_alive.set(len(self.units))
        if self.on_free is not None:
            task = asyncio.get_running_loop().create_task(self.on_free(unit))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Joining the engine thread may wait for its current step: not on the event loop.
        threading.Thread(target=self._close, args=(unit,), name=f"tlora-free-v{unit.version}", daemon=True).start()

    @staticmethod
    def _close(unit: Unit) -> None:
        engine = unit.engine
        if engine is not None:
            engine.close()
        unit.engine = unit.tl = None
        del engine
        release_memory()
        log.info("bundle version %s drained and freed", unit.version)

    # ------------------------------------------------------------------ reload
    async def reload(self, *, force: bool = False, extras: dict[str, str] | None = None,
                     reason: str = "admin") -> dict:
        """Load the bundle's committed version (and `extras`) beside the live one and swap to it.
        Without `force`, nothing happens when neither the manifest nor the adapter set changed."""
        if self.bundle is None:
            raise ReloadError("this server was started without a bundle directory; nothing to reload")
        async with self._lock:
            old = self.unit
            extras = dict(old.extras) if extras is None else dict(extras)
            seen = await asyncio.to_thread(peek, self.bundle)
            if not force and seen and seen[0] == old.digest and extras == old.extras:
                return self.status(reloaded=False)
            try:
                tl, digest, manifest, stamp = await asyncio.to_thread(self._load, extras)
                unit = self._start(tl, manifest_version(manifest), manifest, digest, extras)
            except Exception as exc:  # noqa: BLE001 - any failure refuses the version
                self._refuse(seen[2] if seen else None, exc, reason)
                raise ReloadError(self.last_error["message"]) from exc
            if self.prepare is not None:
                try:
                    await self.prepare(old, unit)
                except Exception as exc:  # noqa: BLE001
                    unit.retired = True
                    self.units.append(unit)
                    self._maybe_free(unit)
                    self._refuse(stamp, exc, reason)
                    raise ReloadError(self.last_error["message"]) from exc
            # The swap: everything above ran beside the live unit; this runs between two awaits
            # of the event loop, so a request is admitted either wholly before it or wholly after.
            self.unit = unit
            self.units.append(unit)
            old.retired = True
            self.refused, self.last_error = None, None
            self.metrics.reloads.inc()
            self.metrics.bundle_version.set(unit.version)
            self.metrics.versions_alive.set(len(self.units))
            log.info("bundle version %s live (%s; was %s, %d request(s) still on it)",
                     unit.version, reason, old.version, old.refs)
            self._maybe_free(old)
            return self.status(reloaded=True, previous=old.version)

    def _load(self, extras: dict[str, str]) -> tuple[TemporalLoRA, str, dict, tuple]:
        """Load the committed version; load again if another version was committed meanwhile."""
        for _ in range(LOAD_ATTEMPTS):
            before = peek(self.bundle)
            if before is None:
                raise BundleError(f"bundle {self.bundle} has no readable {MANIFEST}")
            tl = self.loader(self.bundle)
            attach_runtime_adapters(tl, extras)
            if peek(self.bundle) == before:
                return (tl, *before)
            del tl
        raise BundleError(f"bundle {self.bundle} kept changing while it was being loaded")

    def _refuse(self, stamp: tuple | None, exc: Exception, reason: str) -> None:
        self.refused = stamp
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BundleError) else str(exc)
        self.last_error = {"message": f"new bundle version refused ({message}); still serving version "
                                      f"{self.unit.version}", "reason": reason}
        self.metrics.reload_failures.inc()
        log.error("reload (%s) refused: %s; version %s keeps serving", reason, message, self.unit.version)

    def status(self, **extra) -> dict:
        return {"version": self.unit.version, "versions_alive": [u.version for u in self.units],
                "last_error": self.last_error, **extra}

    async def watch(self, interval: float) -> None:
        """Poll manifest.json every `interval` seconds; reload when its digest changes."""
        while True:
            await asyncio.sleep(interval)
            try:
                seen = await asyncio.to_thread(peek, self.bundle)
                if seen is None or seen[0] == self.unit.digest or seen[2] == self.refused:
                    continue
                await self.reload(reason="poll")
            except ReloadError:
                pass  # logged and counted; the old version keeps serving
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must outlive any single failure
                log.exception("bundle watcher")

    def close(self) -> None:
        for unit in list(self.units):
            if unit.engine is not None:
                unit.engine.close()
