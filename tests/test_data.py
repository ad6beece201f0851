import random

import pytest

from temporal_lora.corpora import Document
from temporal_lora.data import Splits, chunk_documents, dedupe, split_documents
from temporal_lora.errors import CorpusError

LICENCE = """Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions: The above copyright notice
and this permission notice shall be included in all copies or substantial portions of the
Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE
AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."""

PROSE = """The harbour was quiet that morning. Fishing boats lay tilted on the mud, waiting for
the tide, and a few gulls argued over what the night had left on the slipway. Down by the old
customs house a woman was mending nets, her fingers moving faster than anyone could follow,
while her grandson sorted floats into piles by colour and size and hummed to himself."""


def doc(i: int | str, text: str, group: str | None = None) -> Document:
    return Document(id=str(i), text=text, group=group if group is not None else str(i))


# --- dedupe -----------------------------------------------------------------------------------


def test_dedupe_drops_exact_duplicates_ignoring_case_and_whitespace():
    docs = [doc(1, LICENCE), doc(2, "  " + LICENCE.upper().replace(" ", "\n  ")), doc(3, PROSE)]
    assert [d.id for d in dedupe(docs)] == ["1", "3"]


def test_dedupe_drops_near_duplicate_licence_versions_keeping_the_first():
    v1 = "Example Licence version 1.0\n\n" + LICENCE
    v2 = "Example Licence version 2.0\n\n" + LICENCE.replace("free of charge", "at no charge")
    v3 = v1 + "\nThis licence is governed by the laws of Sweden."
    kept = dedupe([doc("v1", v1), doc("prose", PROSE), doc("v2", v2), doc("v3", v3)])
    assert [d.id for d in kept] == ["v1", "prose"]


def test_dedupe_keeps_different_texts_and_order():
    rng = random.Random(0)
    words = PROSE.split() + LICENCE.split()
    docs = [doc(i, " ".join(rng.choice(words) for _ in range(80))) for i in range(50)]
    docs += [doc("short-a", "hello world"), doc("short-b", "hello there"), doc("empty", "")]
    assert dedupe(docs) == docs


def test_dedupe_threshold_controls_how_similar_is_too_similar():
    base = " ".join(f"w{i}" for i in range(200))
    half_changed = " ".join(f"w{i}" if i < 100 else f"x{i}" for i in range(200))
    docs = [doc(1, base), doc(2, half_changed)]
    assert len(dedupe(docs, threshold=0.8)) == 2
    assert len(dedupe(docs, threshold=0.2)) == 1
    with pytest.raises(ValueError):
        dedupe(docs, threshold=0)


def test_dedupe_on_5000_documents_keeps_exactly_the_originals():
    """At corpus scale (its speed is the `dedupe` benchmark's business): 5000 distinct documents,
    each followed somewhere later by copies (re-cased and re-spaced) or near copies (one word of
    250 changed); exactly the 5000 originals survive, in their order."""
    rng = random.Random(1)
    vocab = [f"word{i}" for i in range(5000)]
    originals = [doc(i, " ".join(rng.choices(vocab, k=250))) for i in range(5000)]
    docs = list(originals)
    for i in rng.sample(range(5000), 200):
        words = originals[i].text.split()
        if i % 2:
            copy = "  ".join(words).upper()
        else:
            words[rng.randrange(len(words))] = "changed"
            copy = " ".join(words)
        docs.insert(rng.randrange(docs.index(originals[i]) + 1, len(docs) + 1), doc(f"copy-{i}", copy))
    assert len(docs) == 5200
    assert [d.id for d in dedupe(docs)] == [d.id for d in originals]


# --- splits -----------------------------------------------------------------------------------


def grouped_docs(n_groups: int, per_group: int = 3) -> list[Document]:
    return [
        doc(f"{g}-{k}", f"text {g} {k}", group=f"g{g}")
        for g in range(n_groups)
        for k in range(per_group)
    ]


def groups_of(docs: list[Document]) -> set[str]:
    return {d.group for d in docs}


def test_split_keeps_every_group_in_one_split():
    docs = grouped_docs(40) + [doc(f"big-{k}", "big", group="big") for k in range(25)]
    s = split_documents(docs, seed=3)
    train, val, test = groups_of(s.train), groups_of(s.val), groups_of(s.test)
    assert not train & val and not train & test and not val & test
    assert train | val | test == groups_of(docs)
    assert sorted(s.train + s.val + s.test, key=lambda d: d.id) == sorted(docs, key=lambda d: d.id)


def test_split_is_deterministic_and_independent_of_input_order():
    docs = grouped_docs(30)
    a = split_documents(docs, seed=7)
    b = split_documents(list(reversed(docs)), seed=7)
    assert isinstance(a, Splits)
    for part in ("train", "val", "test"):
        assert groups_of(getattr(a, part)) == groups_of(getattr(b, part))
    assert split_documents(docs, seed=7) == a
    assert any(split_documents(docs, seed=s).test != a.test for s in range(8, 12))


def test_split_sizes_follow_fractions():
    docs = [doc(i, f"text {i}") for i in range(200)]
    s = split_documents(docs, seed=0, val_frac=0.1, test_frac=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (140, 20, 40)


def test_split_with_three_groups_gives_each_split_one():
    s = split_documents(grouped_docs(3), seed=0)
    assert len(groups_of(s.train)) == len(groups_of(s.val)) == len(groups_of(s.test)) == 1


def test_split_refuses_too_few_groups():
    with pytest.raises(CorpusError, match="needs at least 3 documents/groups"):
        split_documents(grouped_docs(2, per_group=10), seed=0)
    with pytest.raises(CorpusError, match="needs at least 3 documents/groups"):
        split_documents([], seed=0)


# --- chunking ---------------------------------------------------------------------------------


class WordTokenizer:
    """Stands in for an HF tokenizer: one id per whitespace-separated word."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls: list[int] = []  # length of each text it was asked to tokenize

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        self.calls.append(len(text))
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    def words(self, ids: list[int]) -> list[str]:
        inverse = {i: w for w, i in self.vocab.items()}
        return [inverse[i] for i in ids]


def numbered_doc(d: int, n_words: int) -> Document:
    return doc(d, " ".join(f"d{d}w{k}" for k in range(n_words)))


def test_chunks_are_consecutive_windows_of_exact_size():
    tok = WordTokenizer()
    docs = [numbered_doc(0, 35), numbered_doc(1, 9), numbered_doc(2, 20)]
    chunks = chunk_documents(docs, tok, block_size=10, max_chunks=100, seed=0)
    assert all(len(c) == 10 for c in chunks)
    windows = sorted(tuple(tok.words(c)) for c in chunks)
    expected = sorted(
        tuple(f"d{d}w{k}" for k in range(start, start + 10))
        for d, n in ((0, 35), (2, 20))  # doc 1 is shorter than a block: nothing
        for start in range(0, n - 9, 10)
    )
    assert windows == expected


def test_chunks_spread_over_documents_round_robin():
    tok = WordTokenizer()
    docs = [numbered_doc(0, 10_000)] + [numbered_doc(d, 40) for d in range(1, 6)]
    chunks = chunk_documents(docs, tok, block_size=8, max_chunks=12, seed=1)
    per_doc = [tok.words(c)[0].split("w")[0] for c in chunks]
    assert len(chunks) == 12
    assert sorted(set(per_doc)) == [f"d{d}" for d in range(6)]
    assert max(per_doc.count(d) for d in set(per_doc)) == 2  # the huge doc does not dominate


def test_chunking_is_deterministic_given_seed():
    docs = [numbered_doc(d, 50) for d in range(20)]
    a = chunk_documents(docs, WordTokenizer(), block_size=16, max_chunks=7, seed=5)
    b = chunk_documents(docs, WordTokenizer(), block_size=16, max_chunks=7, seed=5)
    c = chunk_documents(docs, WordTokenizer(), block_size=16, max_chunks=7, seed=6)
    assert a == b
    assert a != c


def test_chunking_tokenizes_only_visited_documents():
    tok = WordTokenizer()
    docs = [numbered_doc(d, 30) for d in range(1000)]
    chunks = chunk_documents(docs, tok, block_size=16, max_chunks=5, seed=0)
    assert len(chunks) == 5
    assert len(tok.calls) == 5  # documents are tokenized when first visited, not up front


def test_chunk_windows_are_aligned_windows_of_the_full_tokenization():
    tok = WordTokenizer()
    long_doc = numbered_doc(0, 5000)
    chunks = chunk_documents([long_doc], tok, block_size=64, max_chunks=40, seed=0)
    full = tok(long_doc.text, add_special_tokens=False)["input_ids"]
    aligned = [full[i * 64 : (i + 1) * 64] for i in range(len(full) // 64)]
    assert len(chunks) == 40 and all(c in aligned for c in chunks)
    assert chunks != aligned[:40]  # random positions, not the document's head


def test_chunking_with_nothing_long_enough():
    docs = [numbered_doc(d, 5) for d in range(3)]
    assert chunk_documents(docs, WordTokenizer(), block_size=8, max_chunks=10, seed=0) == []
    assert chunk_documents([], WordTokenizer(), block_size=8, max_chunks=10, seed=0) == []
