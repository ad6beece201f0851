"""Short views of a document and the questions in it: the shapes short user inputs take.

A router trained only on 8-128-token windows of running text meets titles, one-line questions,
signatures and pasted single lines at run time. These helpers cut such pieces out of the
training documents themselves (no template-generated text): headings, first sentences of
paragraphs, single lines (a verse line, a code-list entry), `def`/`class` signatures, docstring
first lines and comments, and the questions the text itself asks (FAQ headings, questions in
abstracts, docstrings and plays).
"""

from __future__ import annotations

import random
import re

_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
_MD_HEADING = re.compile(r"^#{1,6}\s+(.+)$")
_SIGNATURE = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+\w+[^\n]*?:\s*(?:#.*)?$")
_COMMENT = re.compile(r"^\s*#\s+(.+)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_RST_MARKUP = re.compile(r":[a-z]+:`([^`<]*)(?:<[^>]*>)?`|``([^`]*)``|`([^`<]*)(?:<[^>]*>)?`_*")
_TERMINATOR = re.compile(r"([.!?\n])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_STOP = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being it its this
that these those there here what which who whom whose when where why how can could should would may might must
will shall do does did done have has had i you he she we they me my your our their not no yes so than then also
into about over under such any all some each more most other very just only own same too use used using""".split())


def clean_markup(line: str) -> str:
    """A line without the commonest reST/Markdown inline markup (roles, literals, links, emphasis)."""
    line = _RST_MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), line)
    return re.sub(r"\s+", " ", line.replace("**", "").replace("*", "")).strip()


def _words(text: str) -> int:
    return len(text.split())


def headings(text: str) -> list[str]:
    """reST (underlined) and Markdown headings."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        md = _MD_HEADING.match(line)
        if md:
            out.append(md.group(1))
        elif i > 0 and _UNDERLINE.match(line) and lines[i - 1].strip() and not _UNDERLINE.match(lines[i - 1]):
            out.append(lines[i - 1])
    return [h for h in (clean_markup(x) for x in out) if 2 <= _words(h) <= 20]


def first_sentences(text: str) -> list[str]:
    """The first sentence of every prose paragraph (4-40 words)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(line.strip() for line in para.splitlines())
        if not para or para.startswith(("..", ">>>", "$", "|", "+--")):
            continue
        first = clean_markup(_SENTENCE_END.split(para, maxsplit=1)[0])
        if 4 <= _words(first) <= 40:
            out.append(first)
    return out


def code_lines(text: str) -> list[str]:
    """`def`/`class` signatures, docstring first lines and whole-line comments of Python source."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if _SIGNATURE.match(line):
            out.append(line.strip())
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if nxt.startswith(('"""', "'''")):
                doc = nxt.strip("\"' ")
                if _words(doc) >= 3:
                    out.append(doc)
        else:
            comment = _COMMENT.match(line)
            if comment and _words(comment.group(1)) >= 4:
                out.append(comment.group(1).strip())
    return out


def single_lines(text: str) -> list[str]:
    """Lines of 4-30 words standing on their own (a verse line, a table entry, a list item)."""
    return [x for x in (clean_markup(line) for line in text.splitlines()) if 4 <= _words(x) <= 30]


def short_views(text: str, *, limit: int, seed: int = 0) -> list[str]:
    """Up to `limit` distinct short pieces of `text`: headings, first sentences, code lines and single
    lines, each kind taking turns so that no one kind fills the quota (deterministic given `seed`)."""
    rng = random.Random(seed)
    kinds = [headings(text), first_sentences(text), code_lines(text), single_lines(text)]
    for kind in kinds:
        rng.shuffle(kind)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < limit and any(kinds):
        for kind in kinds:
            while kind:
                piece = kind.pop()
                if piece.lower() not in seen:
                    seen.add(piece.lower())
                    out.append(piece)
                    break
            if len(out) == limit:
                break
    return out


def questions_in(text: str) -> list[str]:
    """The questions a text asks itself: sentences or headings ending in '?' (5-30 words, prose)."""
    out = []
    for line in headings(text) + [" ".join(text.split())]:
        for candidate in _question_runs(line):
            q = clean_markup(candidate).lstrip("-#*>\"' ")
            if 5 <= _words(q) <= 30 and q[:1].isupper() and not re.search(r"[{}<>=\[\]\\]|\(\)", q):
                out.append(q)
    return list(dict.fromkeys(out))


def _question_runs(line: str) -> list[str]:
    r"""Every run of text between sentence ends (. ! ? or a newline) that ends in '?', with the '?':
    what the regex `[^.!?\n]*\?` finds, in linear time (that regex backtracks quadratically on long
    text with few sentence ends, such as source code)."""
    parts = _TERMINATOR.split(line)  # [text, terminator, text, terminator, ..., text]
    return [parts[i] + "?" for i in range(0, len(parts) - 1, 2) if parts[i + 1] == "?"]


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if len(w) >= 4 and w.lower() not in _STOP}


def keep_generated_question(question: str, document: str, *, min_shared: int = 2, max_copied: int = 8) -> bool:
    """The on-topic filter for a question a model wrote about `document`: one question (ends in '?',
    5-30 words, no chat boilerplate) that shares at least `min_shared` content words with the
    document (it is about it) and copies no run of `max_copied` words from it (it is a question,
    not a quoted passage)."""
    q = question.strip()
    if not q.endswith("?") or q.count("?") > 1 or not 5 <= _words(q) <= 30:
        return False
    low = q.lower()
    if any(s in low for s in ("as an ai", "here is", "here's", "question:", "sure,", "the text", "this text",
                              "the passage", "the document")):
        return False
    if len(content_words(q) & content_words(document)) < min_shared:
        return False
    doc_words = " " + " ".join(document.lower().split()) + " "
    q_words = low.rstrip("?").split()
    return not any(" " + " ".join(q_words[i:i + max_copied]) + " " in doc_words
                   for i in range(len(q_words) - max_copied + 1))
