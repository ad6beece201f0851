"""The bundle on disk: manifest.json + standard PEFT adapter folders + router safetensors.

Writes are atomic: the whole bundle is built in a temporary sibling directory and renamed into
place, so a crash leaves either the old bundle or the new one. Replacing a directory takes two
renames (old bundle aside, new one in); a process killed between them leaves no bundle at the
path, so the next reader or writer puts the old one back (`recover`). Writers hold an exclusive
lock on the parent directory, so leftovers found under it are known to be a dead writer's.
Loading verifies the format version, that every path stays inside the bundle, and every file's
sha256 against the manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from temporal_lora.cache import shareable_mode
from temporal_lora.errors import BundleError

FORMAT = "temporal-lora-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def checksums(folder: Path, root: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its path relative to `root`."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Call `fill(tmp)` to build a directory, then move it to `target`, replacing any old one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(target):
        _recover(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            fill(tmp)
            _make_shareable(tmp)
            if target.exists():
                if not (target / MANIFEST).exists() and any(target.iterdir()):
                    raise BundleError(f"refusing to replace {target}: it exists and is not a bundle")
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
                os.replace(target, old / "bundle")
                os.replace(tmp, target)  # a kill between these two renames is undone by _recover
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def writer_lock(target: Path) -> Iterator[None]:
    """Exclusive lock for writing `target`; the OS drops it when the holder dies, even by SIGKILL.

    The lock is taken on the parent directory itself, so it leaves no lock file behind; writers of
    other bundles in the same directory wait too, which costs little: they only copy files under it.
    """
    fd = os.open(Path(target).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def recover(target: Path) -> None:
    """Undo what a killed writer left at `target`: restore the old bundle if the new one never arrived."""
    target = Path(target)
    if not any(target.parent.glob(f".{target.name}.old-*")):
        return  # nothing set aside: no lock file is created for a path that simply does not exist
    try:
        with writer_lock(target):
            _recover(target)
    except OSError:  # a read-only location: leave it as it is; the caller reports the missing bundle
        pass


def _recover(target: Path) -> None:
    # Called with the writer lock held, so every temp or set-aside directory found is a dead writer's.
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if not target.exists() and (old / "bundle" / MANIFEST).is_file():
            os.replace(old / "bundle", target)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _make_shareable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.chmod(path, shareable_mode(is_dir=path.is_dir()))


def read_manifest(bundle: Path) -> dict:
    """Read and validate manifest.json; verify paths and checksums of every listed file."""
    bundle = Path(bundle)
    if not bundle.exists():
        recover(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} does not exist or is not a directory")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a Temporal LoRA manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {manifest.get('format_version')!r} is not supported "
            f"(this version of temporal-lora reads version {FORMAT_VERSION})"
        )
    for key in ("base_model", "domains", "adapters", "router", "files"):
        if key not in manifest:
            raise BundleError(f"{path} lacks the {key!r} entry")
    for rel, expected in manifest["files"].items():
        file = safe_path(bundle, rel)
        if not file.is_file():
            raise BundleError(f"bundle {bundle} is missing {rel}")
        if sha256_file(file) != expected:
            raise BundleError(f"bundle file {rel} is corrupt or was modified (checksum mismatch)")
    return manifest


def safe_path(bundle: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing absolute paths, '..' and symlinks that leave the bundle."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise BundleError(f"manifest path {rel!r} points outside the bundle")
    root = bundle.resolve()
    resolved = (bundle / rel).resolve()
    if root != resolved and root not in resolved.parents:
        raise BundleError(f"manifest path {rel!r} points outside the bundle")
    return resolved
