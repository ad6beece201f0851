"""The one cache directory for downloaded packages, the converted base model and extracted corpora."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from temporal_lora.errors import FetchError

CACHE_ENV = "TLORA_CACHE"


def cache_dir() -> Path:
    """`$TLORA_CACHE` if set, else the user cache dir (e.g. ~/.cache/temporal-lora)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("temporal-lora"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_package(requirement: str, *, sdist: bool = False) -> Path:
    """Download one exact `name==version` from the package index (no dependencies) into the cache.

    Returns the archive path. Idempotent: a finished download is reused. Downloads land in a
    temporary directory first, so an interrupted fetch never leaves a partial archive behind.
    """
    name, _, version = requirement.partition("==")
    if not version:
        raise FetchError(f"fetch_package needs an exact 'name==version', got {requirement!r}")
    dest = cache_dir() / "packages"
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_archive(dest, name, version, sdist)
    if found:
        return found
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = _find_archive(Path(tmp), name, version, sdist)
        if proc.returncode != 0 or got is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise FetchError(f"could not download {requirement}: {tail[0]}")
        final = dest / got.name
        os.replace(got, final)
    return final


def _find_archive(folder: Path, name: str, version: str, sdist: bool) -> Path | None:
    norm = name.lower().replace("-", "_")
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)
    for path in sorted(folder.iterdir()):
        low = path.name.lower().replace("-", "_")
        if low.startswith(f"{norm}_{version}") and path.name.endswith(suffixes):
            return path
    return None


def shareable_mode(*, is_dir: bool) -> int:
    """The mode an ordinary new file or folder gets under the current umask (mkstemp and mkdtemp
    create owner-only ones; caches and bundles are ordinary data)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp file in the same directory and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, shareable_mode(is_dir=False))  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

