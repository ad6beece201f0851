"""Grounding: a department's own passages, found for each question and put into its prompt.

A domain trained on a handbook and answered conversations gets a full-text index of passages: the
handbook cut at its headings and paragraphs (about `passage_words` words each), plus each training
conversation's question and answer. The index is SQLite's FTS5 with BM25 ranking (the porter
stemmer over unicode61 words), one file per domain (`grounding/NAME.sqlite` in the bundle), so adding
or removing a domain never changes another domain's ranking (BM25's statistics are per file).

Routing picks the domain, the domain's index picks the top passages for the user's message, and the
passages go into the system message of the chat template (`grounded_messages`). The adapter is trained
on prompts of the same shape: each training conversation is given the passages its own question finds
(never its own question-and-answer passage, so it learns to read the handbook rather than to echo).
The bundle stores each index as the SQLite file's bytes; nothing is unpickled, and the manifest's
checksums cover it like every other file.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from temporal_lora.conversations import Conversation
from temporal_lora.corpora import Document
from temporal_lora.errors import BundleError

# Words that carry no topic: a question's FTS5 query leaves them out (BM25 would weigh them low anyway,
# but in a small handbook "do" or "the" can still decide between two passages).
STOPWORDS = frozenset("""a about am an and any are as at be been but by can could did do does for from get got had
has have how i if in is it its me my of on or our should so than that the their them then there these they this
to us was we were what when where which who why will with would you your yours hi hello please thanks""".split())
_WORD = re.compile(r"\w+", re.UNICODE)
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
CONVERSATION_TITLE = "answered question"


@dataclass(frozen=True)
class Passage:
    source: str  # the document's id (a file's relative path) or "conversation:ID"
    title: str  # the nearest heading above it (the document's id where there is none)
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # BM25, higher is better (FTS5's bm25() negated)

    def to_dict(self) -> dict:
        return self.passage.to_dict() | {"score": round(self.score, 4)}


# ------------------------------------------------------------------------------------------ passages
def document_passages(doc: Document, passage_words: int) -> list[Passage]:
    """A document cut into passages: at markdown headings, then at blank lines; paragraphs of one
    section are joined up to `passage_words` words, a longer paragraph is cut between sentences."""
    passages: list[Passage] = []
    title, paragraphs = doc.id, []

    def flush() -> None:
        buf: list[str] = []
        for para in paragraphs:
            for piece in _pieces(para, passage_words):
                if buf and len(" ".join(buf).split()) + len(piece.split()) > passage_words:
                    passages.append(Passage(doc.id, title, " ".join(buf)))
                    buf = []
                buf.append(piece)
        if buf:
            passages.append(Passage(doc.id, title, " ".join(buf)))
        paragraphs.clear()

    block: list[str] = []
    for line in doc.text.splitlines() + [""]:
        heading = _HEADING.match(line.strip())
        if heading or not line.strip():
            if block:
                paragraphs.append(" ".join(block))
                block = []
            if heading:
                flush()
                title = heading.group(2)
            continue
        block.append(line.strip())
    flush()
    return passages


def _pieces(paragraph: str, words: int) -> list[str]:
    """A paragraph as is, or cut between sentences into pieces of about `words` words."""
    if len(paragraph.split()) <= words:
        return [paragraph]
    out, buf = [], []
    for sentence in _SENTENCE.split(paragraph):
        if buf and len(" ".join(buf).split()) + len(sentence.split()) > words:
            out.append(" ".join(buf))
            buf = []
        buf.append(sentence)
    return out + ([" ".join(buf)] if buf else [])


def conversation_passage(conv_id: str, question: str, answer: str) -> Passage:
    """An answered conversation as a passage: the question and the answer, as the user asked it."""
    return Passage(f"conversation:{conv_id}", CONVERSATION_TITLE, f"Q: {question.strip()} A: {answer.strip()}")


# ------------------------------------------------------------------------------------------ the index
def fts_query(text: str) -> str:
    """An FTS5 query for a free-text question: its topic words, each quoted (so no word is read as
    FTS5 syntax), any of them matching ('OR'); '' when the text has no topic word."""
    words = dict.fromkeys(w for w in (m.lower() for m in _WORD.findall(text)) if w not in STOPWORDS)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


class PassageIndex:
    """One domain's passages in an in-memory FTS5 table, searched with BM25. It is stored in the bundle
    as the SQLite database's bytes (`to_bytes`) and read back whole (`from_bytes`), so a loaded
    index never depends on where the bundle folder was or is written next."""

    def __init__(self, con: sqlite3.Connection):
        self._con = con
        self._lock = threading.Lock()  # the server searches from several threads
        self.size = con.execute("SELECT count(*) FROM passages").fetchone()[0]

    @classmethod
    def build(cls, passages: Sequence[Passage]) -> PassageIndex:
        con = sqlite3.connect(":memory:", check_same_thread=False)
        con.execute("CREATE VIRTUAL TABLE passages USING fts5(source UNINDEXED, title, text, "
                    "tokenize='porter unicode61')")
        con.executemany("INSERT INTO passages (source, title, text) VALUES (?, ?, ?)",
                        [(p.source, p.title, p.text) for p in passages])
        con.commit()
        return cls(con)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "grounding index") -> PassageIndex:
        con = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            con.deserialize(data)
            return cls(con)
        except sqlite3.DatabaseError as exc:
            con.close()
            raise BundleError(f"{where} is not a readable FTS5 index ({exc})") from None

    def to_bytes(self) -> bytes:
        with self._lock:
            return self._con.serialize()

    def search(self, text: str, k: int, exclude: str | None = None) -> list[Hit]:
        """The `k` best passages for `text` (fewer when fewer share a topic word with it), best first;
        `exclude`: a source left out (a training conversation's own passage)."""
        query = fts_query(text)
        if not query or k < 1:
            return []
        with self._lock:
            rows = self._con.execute(
                "SELECT source, title, text, bm25(passages) FROM passages WHERE passages MATCH ? "
                "AND source IS NOT ? ORDER BY bm25(passages), rowid LIMIT ?", (query, exclude, k)).fetchall()
        return [Hit(Passage(s, t, x), -float(score)) for s, t, x, score in rows]

    def passages(self) -> list[Passage]:
        with self._lock:
            rows = self._con.execute("SELECT source, title, text FROM passages ORDER BY rowid").fetchall()
        return [Passage(*row) for row in rows]


def grounded_conversations(convs: Sequence[Conversation], index: PassageIndex, domain: str, k: int,
                           fits: Callable[[list[dict]], bool] | None = None) -> list[Conversation]:
    """Training conversations in the prompt shape of grounded answers: each gets the passages its
    first question finds, its own question-and-answer passage left out; with `fits`, the weakest
    passages are dropped until the conversation fits (so its answer is never cut off)."""
    out = []
    for conv in convs:
        first = next(m["content"] for m in conv.messages if m["role"] == "user")
        hits = index.search(first, k, exclude=conversation_passage(conv.id, "", "").source)
        out.append(replace(conv, messages=fitting(conv.messages, domain, hits, fits)[0]))
    return out


def fitting(messages: list[dict], domain: str, hits: Sequence[Hit],
            fits: Callable[[list[dict]], bool] | None) -> tuple[list[dict], list[Hit]]:
    """`grounded_messages` with as many of the best hits as `fits` allows (all of them without
    `fits`), and the hits kept."""
    hits = list(hits)
    while hits and fits is not None and not fits(grounded_messages(messages, domain, hits)):
        hits.pop()
    return grounded_messages(messages, domain, hits), hits


def conversation_passages(convs: Sequence[Conversation]) -> list[Passage]:
    """Each conversation's first question and the answer after it, as passages."""
    out = []
    for conv in convs:
        first = next(i for i, m in enumerate(conv.messages) if m["role"] == "user")
        answer = next((m["content"] for m in conv.messages[first + 1:] if m["role"] == "assistant"), None)
        if answer:
            out.append(conversation_passage(conv.id, conv.messages[first]["content"], answer))
    return out


# ------------------------------------------------------------------------------------------ prompts
def grounding_note(domain: str, hits: Sequence[Hit]) -> str:
    """The system message that carries the passages into the prompt."""
    lines = [f"You answer questions for the {domain} department. Use the passages below from its documents, "
             "and give the exact figures, names and deadlines they state."]
    lines += [f"[{i}] {h.passage.title}: {h.passage.text}" for i, h in enumerate(hits, start=1)]
    return "\n".join(lines)


def grounded_messages(messages: list[dict], domain: str, hits: Sequence[Hit]) -> list[dict]:
    """The messages with the passages added: to the first system message, or as a new one in front.
    No hits: the messages unchanged (a question that shares no word with the documents)."""
    if not hits:
        return list(messages)
    note = grounding_note(domain, hits)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + note}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
