"""Domain corpora: the built-in sources (one table, corpora/sources.py), plus the user's own text."""

from temporal_lora.corpora.document import Document
from temporal_lora.corpora.sources import (
    BUILTIN_DOMAINS,
    DEFAULT_DOMAINS,
    PRIMARY,
    SOURCES,
    Source,
    fetch_builtin,
    load_builtin,
    load_source,
    sources_of,
)
from temporal_lora.corpora.user import (
    corpus_files,
    load_domain,
    load_user_corpus,
    parse_data_spec,
    read_jsonl_texts,
    source_of,
    source_paths,
)

__all__ = [
    "BUILTIN_DOMAINS",
    "DEFAULT_DOMAINS",
    "PRIMARY",
    "SOURCES",
    "Document",
    "Source",
    "corpus_files",
    "fetch_builtin",
    "load_builtin",
    "load_domain",
    "load_source",
    "load_user_corpus",
    "parse_data_spec",
    "read_jsonl_texts",
    "source_of",
    "source_paths",
    "sources_of",
]
