"""Domain corpora: five built-in ones read from package archives, plus the user's own text."""

from temporal_lora.corpora.registry import (
    BUILTIN_DOMAINS,
    Document,
    fetch_builtin,
    load_builtin,
    load_domain,
    load_user_corpus,
    parse_data_spec,
    read_jsonl_texts,
    source_of,
    source_paths,
)

__all__ = [
    "BUILTIN_DOMAINS",
    "Document",
    "fetch_builtin",
    "load_builtin",
    "load_domain",
    "load_user_corpus",
    "parse_data_spec",
    "read_jsonl_texts",
    "source_of",
    "source_paths",
]
