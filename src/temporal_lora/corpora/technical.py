"""Django documentation pages (reStructuredText) from the Django source archive."""

from __future__ import annotations

import re
import tarfile
from pathlib import PurePosixPath

from temporal_lora.cache import fetch_package
from temporal_lora.corpora.document import Document, progress_bar

REQUIREMENT = "Django==5.2.19"
# Release notes are 380 near-identical pages; the newest feature releases carry the real prose.
MAX_RELEASE_NOTES = 20
# Below this a page is a bare table of contents (index.txt, contents.txt) or a requirements file.
MIN_WORDS = 100
# docs/faq/ is not document text: its question/answer pairs are the built-in conversations
# (`django-faq`), held out so that a document-trained adapter has never read those answers.
HELD_OUT_SECTION = "faq"
_FEATURE_RELEASE = re.compile(r"(\d+)\.(\d+)")


def extract(progress: bool = True) -> list[Document]:
    archive = fetch_package(REQUIREMENT, sdist=True)
    pages: dict[PurePosixPath, str] = {}
    with tarfile.open(archive) as tar:
        for member in progress_bar(tar, desc="technical", unit=" files", enabled=progress):
            rel = _docs_page(member)
            if rel is not None:
                pages[rel] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    keep = without_most_release_notes(sorted(pages))
    docs = []
    for rel in keep:
        text = pages[rel].strip()
        if len(text.split()) >= MIN_WORDS:
            docs.append(Document(id=rel.as_posix(), text=text, group=section_of(rel)))
    return docs


def _docs_page(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The path below docs/ of a documentation page, or None for anything else."""
    parts = PurePosixPath(member.name).parts
    if (
        not member.isfile()
        or len(parts) < 3
        or parts[1] != "docs"
        or not member.name.endswith(".txt")
    ):
        return None
    rel = PurePosixPath(*parts[2:])
    if rel.parts[0].startswith("_"):  # _theme/ and friends are Sphinx machinery, not docs
        return None
    if rel.parts[0] == HELD_OUT_SECTION:  # the FAQ: held-out conversations (corpora/django_faq.py)
        return None
    return rel


def without_most_release_notes(pages: list[PurePosixPath]) -> list[PurePosixPath]:
    """All non-release pages plus the newest MAX_RELEASE_NOTES feature-release notes (x.y.txt)."""
    releases = []
    others = []
    for rel in pages:
        if rel.parts[0] != "releases":
            others.append(rel)
            continue
        match = _FEATURE_RELEASE.fullmatch(rel.stem)
        if len(rel.parts) == 2 and match:
            releases.append(((int(match[1]), int(match[2])), rel))
    newest = [rel for _, rel in sorted(releases, reverse=True)[:MAX_RELEASE_NOTES]]
    return others + sorted(newest)


def section_of(rel: PurePosixPath) -> str:
    """Group key that keeps related pages together.

    A page directly in a top-level section (howto/csrf.txt) is its own group; deeper pages are
    grouped by their folder, at most three levels deep (ref/models/fields.txt -> ref/models,
    ref/contrib/gis/install/postgis.txt -> ref/contrib/gis). All release notes form one group.
    """
    parts = rel.with_suffix("").parts
    if parts[0] == "releases":
        return "releases"
    if len(parts) <= 2:
        return "/".join(parts)
    return "/".join(parts[: min(3, len(parts) - 1)])
