"""Near-duplicate removal (`temporal_lora.data.dedupe`: exact hashes + MinHash/LSH on word 5-grams)
on synthetic documents: seconds by corpus size, against exact-duplicate removal alone (the simple
baseline: one hash per normalised text), and whether it keeps exactly the distinct documents.

Each corpus: N random documents of `--words` words from a vocabulary of `--vocab` words, plus
`--exact` exact copies and `--near` copies with one word changed (both of the first documents).
The goal (once a test's wall-clock assert) is 5000 documents in under 5 seconds.

    OMP_NUM_THREADS=1 python -m benchmarks dedupe --sizes 1000 5000 20000
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import hardware, write_results
from benchmarks.flags import flag
from temporal_lora.corpora import Document
from temporal_lora.data import dedupe

GOAL_SECONDS = {5000: 5.0}  # documents -> seconds


@dataclass
class DedupeSettings:
    """The flags of `python -m benchmarks dedupe`."""

    sizes: tuple[int, ...] = flag((5000,), "distinct documents per corpus (one measurement each)")
    words: int = flag(250, "words per document")
    vocab: int = flag(5000, "vocabulary size")
    exact: int = flag(100, "exact copies added to each corpus")
    near: int = flag(100, "copies with one word changed added to each corpus")
    repeats: int = flag(3, "timed runs per corpus (median reported)")
    seed: int = flag(1, "seed of the synthetic corpus")
    out: Path = flag(Path("runs/bench/dedupe"), "dedupe.json, dedupe.md")


def corpus(n: int, s: DedupeSettings) -> list[Document]:
    """`n` distinct random documents, then `s.exact` exact and `s.near` one-word-changed copies."""
    rng = random.Random(s.seed)
    vocab = [f"word{i}" for i in range(s.vocab)]
    docs = [Document(id=str(i), text=" ".join(rng.choices(vocab, k=s.words)), group=str(i)) for i in range(n)]
    copies = [Document(id=f"{d.id}-copy", text=d.text, group=d.group) for d in docs[: s.exact]]
    near = []
    for d in docs[: s.near]:
        words = d.text.split()
        words[len(words) // 2] = "changed"
        near.append(Document(id=f"{d.id}-near", text=" ".join(words), group=d.group))
    return docs + copies + near


def exact_only(docs: list[Document]) -> list[Document]:
    """The baseline: drop documents whose normalised text was seen before."""
    seen: set[bytes] = set()
    kept = []
    for d in docs:
        digest = hashlib.blake2b(" ".join(d.text.lower().split()).encode(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(d)
    return kept


def timed(fn, docs: list[Document], repeats: int) -> tuple[float, int]:
    """Median seconds over `repeats` runs, and how many documents the last run kept."""
    times, kept = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kept = fn(docs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(kept)


def markdown(result: dict) -> str:
    lines = [f"Synthetic documents of {result['settings']['words']} words; each corpus adds "
             f"{result['settings']['exact']} exact and {result['settings']['near']} near copies "
             f"({result['hardware']}).", "",
             "| distinct docs | input docs | dedupe s (median) | kept (expected) | exact-only s | exact-only kept | goal |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        goal = "-" if r["goal_seconds"] is None else f"< {r['goal_seconds']} s: {'met' if r['meets_goal'] else 'MISSED'}"
        lines.append(f"| {r['documents']} | {r['input_documents']} | {r['seconds']:.3f} | {r['kept']} "
                     f"({r['expected_kept']}) | {r['exact_only_seconds']:.3f} | {r['exact_only_kept']} | {goal} |")
    return "\n".join(lines) + "\n"


def run(settings: DedupeSettings) -> dict:
    """Time dedupe and the exact-only baseline on each corpus size, write dedupe.json and
    dedupe.md, print the table; returns what dedupe.json holds."""
    rows = []
    for n in settings.sizes:
        docs = corpus(n, settings)
        seconds, kept = timed(dedupe, docs, settings.repeats)
        base_seconds, base_kept = timed(exact_only, docs, settings.repeats)
        goal = GOAL_SECONDS.get(n)
        rows.append({"documents": n, "input_documents": len(docs), "seconds": round(seconds, 4), "kept": kept,
                     "expected_kept": n, "exact_only_seconds": round(base_seconds, 4),
                     "exact_only_kept": base_kept, "goal_seconds": goal,
                     "meets_goal": None if goal is None else seconds < goal})
    result = {"settings": asdict(settings) | {"out": str(settings.out)}, "hardware": hardware(), "rows": rows}
    md = markdown(result)
    write_results(settings.out, "dedupe", result, md)
    print(md)
    return result
