"""Bundle versions: every change is a new version, the manifest keeps the history, any version can be restored.

A bundle directory always holds its *current* version (manifest.json plus the files it lists).
Older versions live inside it under `versions/`:

    versions/v<N>.json           the complete manifest of version N
    versions/objects/<sha256>    every file any version listed, stored once under its content hash

Adapters never change once trained, so a new version only adds the files that are new (an
adapter, the router, its replay memory). Objects are named by their sha256 and verified when a
version is restored. Each change is written with `bundle.write_atomic_dir`: a crash leaves the
old version or the new one, never a mix. Versions are numbered 1, 2, ... from the first saved
bundle; a bundle written before versions existed counts as version 1.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from temporal_lora.bundle import MANIFEST, read_manifest, safe_path, sha256_file, write_atomic_dir
from temporal_lora.errors import BundleError, InputError
from temporal_lora.meta import __version__

STORE = "versions"


def history(manifest: dict) -> list[dict]:
    """The manifest's history; a bundle from before versions existed is version 1 ('train')."""
    entries = manifest.get("history") or []
    if entries:
        return [dict(e) for e in entries]
    return [{"version": 1, "time": manifest.get("created"), "change": "train", "domains": list(manifest["domains"])}]


def current_version(manifest: dict) -> int:
    return int(history(manifest)[-1]["version"])


def list_versions(bundle: str | Path) -> list[dict]:
    """History entries with `stored` (its files can be restored) and `current` flags."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    now = current_version(manifest)
    rows = []
    for entry in history(manifest):
        v = int(entry["version"])
        stored = v == now or (bundle / STORE / f"v{v}.json").is_file()
        rows.append(entry | {"current": v == now, "stored": stored})
    return rows


def commit(bundle: str | Path, fill: Callable[[Path, dict], dict], change: dict) -> dict:
    """Write a new version of `bundle` atomically and return its manifest.

    `fill(tmp, old_manifest)` writes the new version's files into `tmp` (everything except
    manifest.json and versions/) and returns its manifest without `files`, `history` and
    `version`; those are added here, as is the versions store with the old and the new version.
    `change` describes the change for the history ({"change": "add-domain", "domain": ...}).
    """
    bundle = Path(bundle)
    old = read_manifest(bundle)  # verifies every file of the current version
    seen = (bundle / MANIFEST).read_bytes()
    past = history(old)
    version = int(past[-1]["version"]) + 1
    result: dict = {}

    def build(tmp: Path) -> None:
        # Runs under the bundle's writer lock: refuse to overwrite a version written meanwhile.
        if (bundle / MANIFEST).read_bytes() != seen:
            raise BundleError(f"bundle {bundle} was changed by another process during this change; "
                              "nothing was written, run it again")
        manifest = fill(tmp, old)
        manifest["files"] = _checksums(tmp)
        manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        manifest["temporal_lora_version"] = __version__
        entry = {"version": version, "time": manifest["created"], **change, "domains": list(manifest["domains"])}
        manifest["history"] = [*past, entry]
        manifest["version"] = version
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _carry_store(bundle, tmp)
        _snapshot(bundle, old | {"history": past, "version": int(past[-1]["version"])}, tmp / STORE)
        _snapshot(tmp, manifest, tmp / STORE)
        result.update(manifest)

    write_atomic_dir(bundle, build)
    return result


def rollback(bundle: str | Path, to: int) -> dict:
    """Restore version `to` as a new version (the history records the rollback). Returns the manifest."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    known = [int(e["version"]) for e in history(manifest)]
    if to not in known:
        raise InputError(f"bundle {bundle} has no version {to}; its versions are {', '.join(map(str, known))}")
    target = _stored_manifest(bundle, manifest, to)

    def fill(tmp: Path, _old: dict) -> dict:
        for rel, digest in target["files"].items():
            src = bundle / STORE / "objects" / digest.removeprefix("sha256:")
            if not src.is_file():
                raise BundleError(f"version {to} cannot be restored: its file {rel} is not stored in {STORE}/")
            dst = safe_path(tmp, rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            if sha256_file(dst) != digest:
                raise BundleError(f"version {to} cannot be restored: the stored copy of {rel} is corrupt")
        return {k: v for k, v in target.items() if k not in ("files", "history", "version")}

    return commit(bundle, fill, {"change": "rollback", "to": to})


def copy_files(src_root: Path, rels: list[str], dst_root: Path) -> None:
    """Copy files verbatim (bytes unchanged) from one bundle into a version being built."""
    for rel in rels:
        dst = dst_root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_path(src_root, rel), dst)


def _stored_manifest(bundle: Path, manifest: dict, version: int) -> dict:
    if version == current_version(manifest):
        return manifest
    path = bundle / STORE / f"v{version}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"version {version} is not stored in {bundle / STORE} ({exc})") from exc


def _checksums(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST and not rel.startswith(f"{STORE}/"):
            out[rel] = sha256_file(path)
    return out


def _carry_store(old_bundle: Path, tmp: Path) -> None:
    """Bring the old bundle's versions/ along; objects are immutable, so hard links suffice."""
    src = old_bundle / STORE
    if not src.is_dir():
        return
    for path in sorted(src.rglob("*")):
        dst = tmp / STORE / path.relative_to(src)
        if path.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dst)
        except OSError:
            shutil.copyfile(path, dst)


def _snapshot(root: Path, manifest: dict, store: Path) -> None:
    """Record `manifest` as versions/v<N>.json and store each of its files under its hash."""
    objects = store / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    for rel, digest in manifest["files"].items():
        obj = objects / digest.removeprefix("sha256:")
        if not obj.exists():  # a copy, not a link: editing a live file must not alter history
            shutil.copyfile(safe_path(root, rel), obj)
    (store / f"v{manifest['version']}.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
