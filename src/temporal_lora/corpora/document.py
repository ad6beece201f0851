"""The document every corpus yields, its JSONL cache file, and the extraction progress bar."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from temporal_lora.cache import atomic_write_text


@dataclass(frozen=True)
class Document:
    """One text of a corpus. Documents sharing a `group` are near-identical or closely related
    (versions of one licence, pages of one docs section) and always land in the same split."""

    id: str
    text: str
    group: str


def write_documents(path: Path, docs: list[Document]) -> None:
    """Documents as JSONL, one {"id", "text", "group"} object a line; the file appears whole."""
    lines = (json.dumps(asdict(doc), ensure_ascii=False) for doc in docs)
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_documents(path: Path) -> list[Document] | None:
    """What `write_documents` wrote, or None when the file is missing or unreadable."""
    try:
        with path.open(encoding="utf-8") as fh:
            return [Document(**json.loads(line)) for line in fh if line.strip()]
    except (OSError, ValueError, TypeError):
        return None


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str = " docs",
    total: int | None = None,
    enabled: bool = True,
) -> Any:
    """A tqdm bar on stderr, or a silent stand-in when `enabled` is false."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not enabled, leave=False)
