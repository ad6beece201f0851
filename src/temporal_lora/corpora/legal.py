"""Licence texts from the spdx wheel, grouped by licence family."""

from __future__ import annotations

import re
import zipfile
from pathlib import PurePosixPath

from temporal_lora.cache import fetch_package
from temporal_lora.corpora.document import Document, progress_bar

REQUIREMENT = "spdx==2.5.1"
_DEPRECATED = "deprecated_"


def extract(progress: bool = True) -> list[Document]:
    archive = fetch_package(REQUIREMENT)
    docs = []
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if _is_licence_text(n))
        for name in progress_bar(names, desc="legal", unit=" licences", enabled=progress):
            licence = PurePosixPath(name).stem.removeprefix(_DEPRECATED)
            text = zf.read(name).decode("utf-8", errors="replace").strip()
            if text:
                docs.append(Document(id=licence, text=text, group=licence_family(licence)))
    return docs


def _is_licence_text(name: str) -> bool:
    path = PurePosixPath(name)
    return (
        path.parent == PurePosixPath("spdx/data")
        and path.suffix == ".txt"
        and path.stem != "README"
    )


def licence_family(licence: str) -> str:
    """The family of an SPDX id: its first dash-separated word, upper-cased.

    Stripping only versions and -only/-or-later/-with-... suffixes (GPL-2.0-only -> GPL) is not
    enough: variants such as BSD-2-Clause/BSD-3-Clause or CC-BY-SA/CC-BY-NC-SA share most of
    their wording, and keeping them in one group stops them from leaking across splits.
    Upper-casing merges spellings such as Zlib and zlib-acknowledgement.
    """
    head = re.split(r"[-+_]", licence.removeprefix(_DEPRECATED), maxsplit=1)[0]
    return head.upper() or licence.upper()
