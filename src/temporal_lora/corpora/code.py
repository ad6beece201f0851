"""Python source of the running interpreter's standard library."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from temporal_lora.corpora.document import Document, progress_bar

# Tests, the IDLE app, the old 2to3 tool and third-party packages are not representative stdlib
# code; pydoc_data is one huge string literal of documentation.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "pydoc_data",
    }
)
# Shorter files are mostly re-export shims and package __init__ stubs.
MIN_LINES = 40
# Written by the interpreter's build (_sysconfigdata_*.py, config-3.x-*/python-config.py).
_BUILD_CONFIG = "_sysconfigdata"
# encodings/cp1252.py and ~60 siblings are generated lookup tables, not code anyone writes.
_GENERATED_CODEC = "generated from"


def extract(progress: bool = True) -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(_source_files(root))
    docs = []
    for file in progress_bar(files, desc="code", unit=" files", enabled=progress):
        text = _read_source(file)
        if text is None or text.count("\n") < MIN_LINES or _is_generated_codec(text):
            continue
        rel = file.relative_to(root)
        group = rel.parts[0].removesuffix(".py")
        docs.append(Document(id=rel.as_posix(), text=text, group=group))
    return docs


def _source_files(root: Path) -> Iterator[Path]:
    # os.walk so skipped folders (site-packages can be gigabytes) are never descended into.
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_BUILD_CONFIG):
                yield Path(folder) / name


def _skip_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith((".", "config-"))


def _read_source(file: Path) -> str | None:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # a stray non-UTF-8 file is not worth failing the whole corpus for


def _is_generated_codec(text: str) -> bool:
    head = text[:600]
    return "Codec" in head and _GENERATED_CODEC in head
