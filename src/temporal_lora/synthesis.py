"""More supervised signal from a department's own data, written by the frozen base model.

- **Synthesised questions.** Each handbook sentence that states a fact (a number, a name, an address)
  is shown to the base model with two fixed examples (few-shot completion, greedy), which writes the
  question that sentence answers. The sentence itself is the answer, so the fact is kept word for word.
- **Paraphrased questions.** Each training conversation's question is reworded the same way; the
  conversation's answer stays.

A written question is kept only when it is one well-formed question (a single line ending in '?', 4
to 25 words, sharing a content word with its source and none of the examples' own words) and when the
department's passage index finds for it what it finds for its source: the sentence's passage among
the top passages (synthesised), the same best passage as the original question (paraphrased). So a
kept question is answerable from the passages its grounded prompt will carry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from temporal_lora.conversations import Conversation
from temporal_lora.grounding import CONVERSATION_TITLE, STOPWORDS, PassageIndex
from temporal_lora.text import pad_id

QUESTION_SHOTS = ("Sentence: The library opens at 8:00 on weekdays.\n"
                  "Question: When does the library open on weekdays?\n\n"
                  "Sentence: Visitors must register at the front desk with a photo ID.\n"
                  "Question: What do visitors need to register?\n\n")
PARAPHRASE_SHOTS = ("Question: When does the library open?\n"
                    "Same question in other words: At what time can I get into the library?\n\n"
                    "Question: Do visitors need an ID?\n"
                    "Same question in other words: Is a photo ID required for guests?\n\n")
SHOT_WORDS = frozenset("library opens weekdays visitors register front desk photo guests required".split())
_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
_FACT = re.compile(r"\d|@|\b[A-Z][a-z]+[A-Z]|\b[A-Z]{2,}|\.[a-z]{2,}\b")  # numbers, emails, CamelCase, acronyms, hosts
MAX_NEW_TOKENS = 32


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 2}


def well_formed(question: str, source: str) -> bool:
    """One question of 4-25 words that shares a content word with its source and does not borrow the
    few-shot examples' words."""
    words = content_words(question)
    return (question.endswith("?") and question.count("?") == 1 and 4 <= len(question.split()) <= 25
            and bool(words & content_words(source)) and not (words & SHOT_WORDS) - content_words(source))


def fact_sentences(index: PassageIndex, limit: int) -> list[tuple[str, str]]:
    """(passage text, sentence) for up to `limit` sentences of the documents' passages that state a
    fact, in the index's order, spread over the passages (each passage's first fact first)."""
    per_passage = []
    for p in index.passages():
        if p.title == CONVERSATION_TITLE:
            continue
        found = [s for s in _SENTENCE.split(p.text) if _FACT.search(s) and 5 <= len(s.split()) <= 60]
        per_passage.append([(p.text, s) for s in found])
    out = []
    for depth in range(max((len(s) for s in per_passage), default=0)):
        out += [s[depth] for s in per_passage if depth < len(s)]
    return out[:limit]


@torch.no_grad()
def complete(model, tokenizer, prompts: Sequence[str], batch_size: int = 16) -> list[str]:
    """The first line each prompt is continued with (greedy, the base model as it is)."""
    out = []
    pad = pad_id(tokenizer)
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding: all rows end together
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=pad)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip().split("\n")[0].strip() for g in gen]
    return out


def synthesised_conversations(model, tokenizer, index: PassageIndex, name: str, limit: int,
                              k: int) -> list[Conversation]:
    """Question-and-answer conversations written from the handbook's fact sentences, each kept when its
    sentence's passage is among the `k` its grounded prompt will carry (see the module doc)."""
    pairs = fact_sentences(index, limit)
    questions = complete(model, tokenizer, [f"{QUESTION_SHOTS}Sentence: {s}\nQuestion:" for _, s in pairs])
    out = []
    for i, ((passage, sentence), q) in enumerate(zip(pairs, questions, strict=True)):
        if well_formed(q, sentence) and passage in {h.passage.text for h in index.search(q, k)}:
            out.append(Conversation(f"synthesised:{name}:{i}", [{"role": "user", "content": q},
                                                                {"role": "assistant", "content": sentence}],
                                    group=f"synthesised:{name}:{i}"))
    return out


def paraphrased_conversations(model, tokenizer, convs: Sequence[Conversation], index: PassageIndex) -> list[Conversation]:
    """Each conversation once more with its first question reworded (see the module doc)."""
    firsts = [next(i for i, m in enumerate(c.messages) if m["role"] == "user") for c in convs]
    originals = [c.messages[i]["content"] for c, i in zip(convs, firsts, strict=True)]
    written = complete(model, tokenizer, [f"{PARAPHRASE_SHOTS}Question: {' '.join(q.split())}\n"
                                          "Same question in other words:" for q in originals])
    out = []
    for conv, i, q, p in zip(convs, firsts, originals, written, strict=True):
        if content_words(p) == content_words(q) or not well_formed(p, q):
            continue
        own = f"conversation:{conv.id}"
        best = [h.passage for h in index.search(q, 1, exclude=own)]
        if best and best == [h.passage for h in index.search(p, 1, exclude=own)]:
            messages = [*conv.messages[:i], {"role": "user", "content": p}, *conv.messages[i + 1:]]
            out.append(Conversation(f"{conv.id}~paraphrase", messages, group=conv.group))
    return out
