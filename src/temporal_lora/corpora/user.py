"""The user's own corpora (a folder or a JSONL file), and which corpus a domain reads: the user's
when a path was given for it, else the built-in one (corpora/sources.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from temporal_lora.corpora.document import Document
from temporal_lora.corpora.sources import BUILTIN_DOMAINS, load_builtin
from temporal_lora.errors import CorpusError

USER_SUFFIXES = (".txt", ".md", ".jsonl")
# File names (stems) that mark a .txt file of a folder as a list of short texts, one per line.
LIST_NAMES = ("question", "request", "queries", "lines")
_DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


# --- user corpora -----------------------------------------------------------------------------


def load_user_corpus(path: str | Path) -> list[Document]:
    """Documents from a folder (see `load_folder`), a .jsonl file (a string `text` per line, optional
    `id` and `group`; lines that are conversations, `{"messages": [...]}` or `{"question", "answer"}`,
    are skipped here: conversations.py reads them; a `question` alone is a short text), or a .txt
    file of short texts, one per line (requests, questions, FAQ headings)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus path {root} does not exist")
    if root.is_dir():
        return load_folder(root)
    if root.suffix.lower() == ".jsonl":
        return _load_jsonl(root)
    if root.suffix.lower() == ".txt":
        return load_text_lines(root)
    raise CorpusError(f"corpus path {root} must be a folder of .txt/.md/.jsonl files, a .jsonl file or a .txt "
                      "file with one text per line")


def load_text_lines(file: Path, prefix: str = "") -> list[Document]:
    """One document per non-blank line of a text file: a list of short texts."""
    docs = [Document(id=f"{prefix}line-{n}", text=line.strip(), group=f"{prefix}line-{n}")
            for n, line in enumerate(_decode(file.read_bytes(), file).splitlines(), start=1) if line.strip()]
    if not docs:
        raise CorpusError(f"{file} has no non-blank lines")
    return docs


def is_question_list(file: Path, text: str) -> bool:
    """A .txt file of a folder that is a list of short texts rather than a document: its name says
    so (questions.txt, faq-questions.txt, requests.txt), or it has 3+ lines and most end with '?'."""
    words = re.split(r"[^a-z0-9]+", file.stem.lower())  # 'faq-questions' yes, 'guidelines' no
    if any(w.startswith(name) for w in words for name in LIST_NAMES):
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 3 and sum(line.endswith("?") for line in lines) >= 0.8 * len(lines)


def load_folder(root: Path) -> list[Document]:
    """A department's folder, each file used for what it is: .md and .txt files are documents (a
    handbook, policies), one each, except question lists (`is_question_list`: one short text per
    line); .jsonl files hold documents, short texts and conversations (the conversations are read
    by conversations.py). Ids are relative paths (`path:line-N` for lines and JSONL records)."""
    files = sorted(corpus_files(root))
    if not files:
        raise CorpusError(f"no .txt, .md or .jsonl files under {root}")
    docs = []
    for file in files:
        rel = file.relative_to(root).as_posix()
        if file.suffix.lower() == ".jsonl":
            docs += [Document(f"{rel}:{d.id}", d.text, f"{rel}:{d.group}") for d in _load_jsonl(file)]
            continue
        text = _decode(file.read_bytes(), file).strip()
        if not text:
            continue
        if file.suffix.lower() == ".txt" and is_question_list(file, text):
            docs += load_text_lines(file, prefix=f"{rel}:")
        else:
            docs.append(Document(id=rel, text=text, group=rel))
    if not docs and all(f.suffix.lower() != ".jsonl" for f in files):
        raise CorpusError(f"all {len(files)} .txt/.md files under {root} are empty")
    return docs


def corpus_files(root: Path, suffixes: tuple[str, ...] = USER_SUFFIXES) -> Iterator[Path]:
    """The corpus files below a folder (hidden files and folders left out)."""
    for file in root.rglob("*"):
        rel_parts = file.relative_to(root).parts
        # Hidden files and folders (.git, editor swap files) are never corpus text.
        if any(part.startswith(".") for part in rel_parts):
            continue
        if file.is_file() and file.suffix.lower() in suffixes:
            yield file


def _load_jsonl(file: Path) -> list[Document]:
    raw = file.read_bytes()
    content = _decode(raw, file)
    docs, conversations = [], 0
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        if _is_conversation_line(line):  # read by conversations.py (the same file holds both)
            conversations += 1
            continue
        doc = _jsonl_document(line, file, lineno, hint=" (or a 'messages' list: a conversation)")
        if doc.text:
            docs.append(doc)
    if not docs and not conversations:
        raise CorpusError(f"{file} has no non-empty 'text' fields")
    return docs


def _is_conversation_line(line: str) -> bool:
    """A `{"messages": [...]}` line (OpenAI / TRL conversational format) or an answered question
    (`{"question", "answer"}`) rather than a document."""
    if '"messages"' not in line and '"answer"' not in line:
        return False
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and ("messages" in record or ("question" in record and "answer" in record))


def read_jsonl_texts(path: str | Path) -> list[str]:
    """The `text` field of every non-blank line of a JSONL file, empty texts included (callers
    that route or generate must see and refuse them rather than silently shift the outputs)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CorpusError(f"{file} does not exist")
    content = _decode(file.read_bytes(), file)
    return [
        _jsonl_document(line, file, lineno).text
        for lineno, line in enumerate(content.splitlines(), start=1)
        if line.strip()
    ]


def _jsonl_document(line: str, file: Path, lineno: int, hint: str = "") -> Document:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{file}, line {lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(record, dict) and "text" not in record and isinstance(record.get("question"), str):
        record = {**record, "text": record["question"]}  # a question without an answer: a short text
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise CorpusError(f"{file}, line {lineno}: needs a string 'text' field{hint}")
    doc_id = _optional_str(record, "id", file, lineno) or f"line-{lineno}"
    group = _optional_str(record, "group", file, lineno) or doc_id
    return Document(id=doc_id, text=record["text"].strip(), group=group)


def _optional_str(record: dict[str, Any], key: str, file: Path, lineno: int) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise CorpusError(f"{file}, line {lineno}: '{key}' must be a string or an integer")
    return str(value)


def _decode(raw: bytes, file: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise CorpusError(
            f"{file} is not UTF-8 text (undecodable byte at line {line}); re-save it as UTF-8"
        ) from None


# --- choosing a corpus for a domain -----------------------------------------------------------


def parse_data_spec(spec: str) -> tuple[str, Path]:
    """Split a `NAME=PATH` command-line value into a domain name and a path."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path.strip():
        raise CorpusError(
            f"malformed data spec {spec!r}; expected NAME=PATH, e.g. notes=./my-notes"
        )
    if not _DOMAIN_NAME.fullmatch(name):
        raise CorpusError(
            f"invalid domain name {name!r} in {spec!r}; "
            "use lowercase letters, digits, '-' and '_' (starting with a letter or digit)"
        )
    return name, Path(path.strip()).expanduser()


def source_of(name: str, data_path: str | Path | None = None) -> str:
    """How a bundle records where a domain's text came from: 'path:/abs/path' or 'builtin:NAME'."""
    return f"path:{Path(data_path).resolve()}" if data_path is not None else f"builtin:{name}"


def source_paths(name: str, source: str) -> dict[str, Path]:
    """The `data_paths` that load `name` from its recorded source again: {name: path} for a user
    corpus, {} for a built-in one (what `load_domain` and `load_domain_data` take)."""
    return {name: Path(source.removeprefix("path:"))} if source.startswith("path:") else {}


def load_domain(name: str, data_paths: Mapping[str, Path], progress: bool = True) -> list[Document]:
    """The user's corpus for `name` when a path was given for it, else the built-in corpus."""
    if name in data_paths:
        return load_user_corpus(data_paths[name])
    if name in BUILTIN_DOMAINS:
        return load_builtin(name, progress=progress)
    raise CorpusError(
        f"unknown domain {name!r}: not a built-in domain ({', '.join(BUILTIN_DOMAINS)}) "
        f"and no data given for it (pass --data {name}=PATH)"
    )
