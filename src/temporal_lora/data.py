"""Corpus preparation: duplicate removal, group-aware splits and fixed-size token chunks."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from temporal_lora.corpora import Document
from temporal_lora.errors import CorpusError

# --- near-duplicate removal -------------------------------------------------------------------

SHINGLE_WORDS = 5
NUM_PERM = 128
_ROWS_BLOCK = 4096  # shingles hashed at once; bounds memory on a 30k-word play

_rng = np.random.default_rng(0x7E1F)  # fixed: signatures must not change between runs
# Odd multipliers are invertible mod 2**64, so no input bits are thrown away.
_SHINGLE_MULT = _rng.integers(0, 2**63, size=SHINGLE_WORDS, dtype=np.uint64) * 2 + 1
_PERM_A = _rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64) * 2 + 1
_PERM_B = _rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)


def dedupe(docs: Sequence[Document], threshold: float = 0.8) -> list[Document]:
    """Drop exact duplicates (ignoring case and whitespace) and near-duplicates, keeping the first.

    Near-duplicates are pairs whose word 5-gram sets have an estimated Jaccard similarity of at
    least `threshold` (MinHash, 128 permutations, with LSH banding to find candidate pairs).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    index = _LshIndex(threshold)
    vocab: dict[str, int] = {}
    exact: set[bytes] = set()
    kept = []
    for doc in docs:
        words = doc.text.lower().split()
        digest = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
        if digest in exact:
            continue
        exact.add(digest)
        if words:
            signature = _minhash(_word_ids(words, vocab))
            if index.has_near_duplicate(signature):
                continue
            index.add(signature)
        kept.append(doc)
    return kept


def _word_ids(words: list[str], vocab: dict[str, int]) -> np.ndarray:
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.uint64, len(words))
    return ids + np.uint64(1)  # no word maps to 0, so short-text padding never collides


def _minhash(ids: np.ndarray) -> np.ndarray:
    """MinHash signature (NUM_PERM uint32 values) of the set of word 5-gram shingles."""
    if len(ids) < SHINGLE_WORDS:  # a very short text is one shingle of all its words
        ids = np.concatenate([ids, np.zeros(SHINGLE_WORDS - len(ids), np.uint64)])
    n = len(ids) - SHINGLE_WORDS + 1
    shingles = np.zeros(n, np.uint64)
    for k in range(SHINGLE_WORDS):  # order-sensitive combination; wraps mod 2**64 on purpose
        shingles += ids[k : k + n] * _SHINGLE_MULT[k]
    shingles = _mix64(shingles)
    signature = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, n, _ROWS_BLOCK):
        block = shingles[start : start + _ROWS_BLOCK, None] * _PERM_A + _PERM_B
        np.minimum(signature, block.min(axis=0), out=signature)
    # Multiply-shift hashing: the high 32 bits are the well-mixed ones.
    return (signature >> np.uint64(32)).astype(np.uint32)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, so that similar shingle sums get unrelated hashes."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _band_rows(threshold: float) -> int:
    """Rows per LSH band: the largest whose candidate threshold (1/b)**(1/r) lies safely below
    `threshold`, so true near-duplicates almost always share a band."""
    for rows in (16, 8, 4, 2):
        if (rows / NUM_PERM) ** (1 / rows) <= threshold - 0.05:
            return rows
    return 1


class _LshIndex:
    """Signatures of the kept documents, bucketed by band so candidates are found in O(bands)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.rows = _band_rows(threshold)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(NUM_PERM // self.rows)]
        self.signatures: list[np.ndarray] = []

    def _keys(self, signature: np.ndarray) -> list[bytes]:
        return [signature[i : i + self.rows].tobytes() for i in range(0, NUM_PERM, self.rows)]

    def has_near_duplicate(self, signature: np.ndarray) -> bool:
        candidates = set()
        for bucket, key in zip(self.buckets, self._keys(signature), strict=True):
            candidates.update(bucket.get(key, ()))
        if not candidates:
            return False
        others = np.stack([self.signatures[i] for i in candidates])
        return bool(((others == signature).mean(axis=1) >= self.threshold).any())

    def add(self, signature: np.ndarray) -> None:
        for bucket, key in zip(self.buckets, self._keys(signature), strict=True):
            bucket.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(signature)


# --- splits -----------------------------------------------------------------------------------


@dataclass
class Splits:
    """Documents of one corpus divided into train, validation and test; no group spans two."""

    train: list[Document]
    val: list[Document]
    test: list[Document]


def split_documents(
    docs: Sequence[Document],
    *,
    seed: int,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    min_each: int = 1,
) -> Splits:
    """Split into train/val/test by `group`: all documents of a group land in the same split.

    Groups are shuffled with `seed`; each split first gets `min_each` groups, then each further
    group goes to test, else val, if it still fits in that split's fraction of the documents,
    else to train. The result depends only on the documents and the seed, not on their order.
    """
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise ValueError("val_frac and test_frac must be >= 0 and sum to less than 1")
    if min_each < 1:
        raise ValueError(f"min_each must be >= 1, got {min_each}")
    by_group: dict[str, list[Document]] = defaultdict(list)
    for doc in docs:
        by_group[doc.group].append(doc)
    if len(by_group) < 3 * min_each:
        raise CorpusError(
            f"splitting into train/val/test needs at least {3 * min_each} documents/groups, "
            f"got {len(by_group)} group(s) in {len(docs)} document(s)"
        )
    groups = sorted(by_group)
    random.Random(seed).shuffle(groups)

    seeded = 3 * min_each
    split_of = {g: ("test", "val", "train")[i // min_each] for i, g in enumerate(groups[:seeded])}
    sizes = {"test": 0, "val": 0, "train": 0}
    for group, split in split_of.items():
        sizes[split] += len(by_group[group])
    targets = {"test": test_frac * len(docs), "val": val_frac * len(docs)}
    for group in groups[seeded:]:
        # A group that would overshoot its split's share goes to train instead, so one big
        # group (all of distutils, all release notes) cannot double the size of val or test.
        size = len(by_group[group])
        split = next((s for s in ("test", "val") if sizes[s] + size <= targets[s]), "train")
        split_of[group] = split
        sizes[split] += size

    def pick(split: str) -> list[Document]:
        return [doc for doc in docs if split_of[doc.group] == split]

    return Splits(train=pick("train"), val=pick("val"), test=pick("test"))


SHORT_CHARS = 400  # a text shorter than this is a short text (a question, a request), not a document


def split_by_kind(docs: Sequence[Document], *, seed: int, validated_elsewhere: bool = False) -> Splits:
    """`split_documents`, each kind on its own where a folder mixes documents (a handbook) and short
    texts (a question list): a kind of fewer than three groups goes to train whole, so a department's
    one handbook is never held out, as long as another kind (or, `validated_elsewhere`, the domain's
    conversations) gives the validation and test splits. One kind alone splits exactly as before."""
    long = [d for d in docs if len(d.text) >= SHORT_CHARS]
    short = [d for d in docs if len(d.text) < SHORT_CHARS]
    kinds = [k for k in (long, short) if k]
    if len(kinds) < 2 and not validated_elsewhere:
        return split_documents(docs, seed=seed)
    parts = [split_documents(k, seed=seed) if len({d.group for d in k}) >= 3 else Splits(list(k), [], [])
             for k in kinds]
    return Splits(*([d for p in parts for d in getattr(p, name)] for name in ("train", "val", "test")))


# --- chunking ---------------------------------------------------------------------------------

def split_like_parent(docs: list[Document], parent_split: dict | None, seed: int) -> tuple[Splits, bool]:
    """Train/val/test splits of a subdomain that respect the parent's held-out documents.

    A subdomain's documents usually come from the parent's corpus (PubMed by publication type,
    plays by genre). Documents the parent held out stay held out (parent test -> child test,
    parent val -> child val), so neither level is measured on text the other trained on. When
    that leaves the child without a test or validation document (few plays per genre), the
    child's documents are split on their own; the flag says whether the split is aligned.
    """
    docs = dedupe(docs)
    test_ids = set((parent_split or {}).get("test_ids", []))
    val_ids = set((parent_split or {}).get("val_ids", []))
    test = [d for d in docs if d.id in test_ids]
    val = [d for d in docs if d.id in val_ids]
    if test and val:
        train = [d for d in docs if d.id not in test_ids and d.id not in val_ids]
        if train:
            return Splits(train=train, val=val, test=test), True
    return split_documents(docs, seed=seed), False


def chunk_documents(
    docs: Sequence[Document],
    tokenizer: Any,
    *,
    block_size: int,
    max_chunks: int,
    seed: int,
    separator: int | None = None,
) -> list[list[int]]:
    """Up to `max_chunks` windows of exactly `block_size` token ids, spread over the documents.

    Each document is cut into consecutive non-overlapping windows (the short tail is dropped).
    Documents are shuffled with `seed` and visited round-robin, taking one window of each per
    round, so one long document cannot dominate. Within a document the windows are taken in a
    seeded random order: taking them from the start would fill training and evaluation with
    title pages, licence headers and module docstrings. A document is tokenized only when first
    visited, and only its first `MAX_DOC_CHARS` characters, which bounds the cost of huge files.

    With a `separator` token id, documents shorter than one block (questions, requests, FAQ
    headings) are not dropped: once the long documents' windows are used up, the short ones are
    packed, in the seeded visiting order, into further windows with the separator between them (the
    usual causal-LM concatenation, with the document boundary marked). Without it, as before, they
    are skipped; a corpus of long documents gives the same windows either way while its windows last.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    pending: dict[int, list[list[int]] | None] = dict.fromkeys(order)
    chunks: list[list[int]] = []
    short: list[list[int]] = []
    while pending and len(chunks) < max_chunks:
        for i in list(pending):
            windows = pending[i]
            if windows is None:
                windows = pending[i] = _windows(docs[i].text, tokenizer, block_size, rng,
                                                short if separator is not None else None)
            if not windows:
                del pending[i]  # exhausted (or shorter than one block)
                continue
            chunks.append(windows.pop())
            if len(chunks) == max_chunks:
                break
    if short and len(chunks) < max_chunks:
        chunks += pack(short, block_size, separator)[: max_chunks - len(chunks)]
    return chunks


def pack(seqs: Sequence[list[int]], block_size: int, separator: int | None) -> list[list[int]]:
    """Concatenate token sequences, `separator` after each, and cut into full windows of
    `block_size` (the short tail is dropped)."""
    stream = [t for seq in seqs for t in (*seq, *([] if separator is None else [separator]))]
    return [stream[k : k + block_size] for k in range(0, len(stream) - block_size + 1, block_size)]


MAX_DOC_CHARS = 400_000


def _windows(text: str, tokenizer: Any, size: int, rng: random.Random,
             short: list[list[int]] | None = None) -> list[list[int]]:
    """A document's windows in seeded order; a document shorter than one window goes to `short`."""
    if len(text) > MAX_DOC_CHARS:
        cut = text.rfind(" ", 0, MAX_DOC_CHARS)
        text = text[: cut if cut > 0 else MAX_DOC_CHARS]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if short is not None and 0 < len(ids) < size:
        short.append(ids)
    windows = [ids[k : k + size] for k in range(0, len(ids) - size + 1, size)]
    rng.shuffle(windows)
    return windows
