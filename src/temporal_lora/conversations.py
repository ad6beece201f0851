"""Conversations as training data: OpenAI / TRL conversational JSONL, one
{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} per line.

An adapter learns from them with the base model's chat template and the loss on assistant turns
only (our own masking, not TRL's SFTTrainer: the adapter trains in the same accelerate loop as
document chunks, so documents and conversations mix in one domain). Each assistant turn's span is
found by rendering the conversation up to that turn with and without it; its tokens (including the
template's end-of-turn marker, so the adapter learns to stop) get labels, everything else -100.
The router learns from the user turns, which is what it sees at serving time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from temporal_lora.cache import atomic_write_text
from temporal_lora.corpora import (
    BUILTIN_DOMAINS,
    Document,
    corpus_files,
    django_faq,
    load_builtin,
    load_domain,
    load_user_corpus,
)
from temporal_lora.data import Splits, split_documents
from temporal_lora.errors import CorpusError, InputError
from temporal_lora.text import pad_id, read_jsonl, tokenize

ROLES = ("system", "user", "assistant")
IGNORE = -100
# A conversation is cut after this many tokens (the model's context, if shorter). Document chunks
# are `block_size` tokens; whole question/answer pairs need more, and a batch is padded to its longest row.
MAX_TOKENS = 512
# Built-in conversation sets: {name: (description, loader of JSONL-style records)}.
BUILTIN_CONVERSATIONS = {
    django_faq.NAME: ("Django FAQ (docs/faq/*.txt of Django 5.2.19): question headings and their answers; "
                      "held out of the technical documents", django_faq.load_records),
}


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]]
    group: str = field(default="")  # conversations of one group share a split (default: the id)

    def user_text(self) -> str:
        """The user turns, joined: the text the router reads for this conversation."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


def is_conversational(record: object) -> bool:
    """A `messages` record, or an answered question (`{"question", "answer"}`: an FAQ entry)."""
    return isinstance(record, dict) and ("messages" in record or ("question" in record and "answer" in record))


def parse_conversation(record: object, where: str, default_id: str | None = None) -> Conversation:
    """One JSONL record as a Conversation, or one clear CorpusError naming `where` (file:line).
    Optional `id` and `group` fields as for documents (default id: `default_id`, else `where`)."""
    if not is_conversational(record):
        raise CorpusError(f"{where}: expected an object with a 'messages' list")
    if "messages" not in record:  # an answered question: one user turn, one assistant turn
        if not isinstance(record["question"], str) or not isinstance(record["answer"], str):
            raise CorpusError(f"{where}: 'question' and 'answer' must be strings")
        record = {**record, "messages": [{"role": "user", "content": record["question"]},
                                         {"role": "assistant", "content": record["answer"]}]}
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise CorpusError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CorpusError(f"{where}: message {i} needs a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise CorpusError(f"{where}: message {i} has unknown role {m['role']!r} (use {', '.join(ROLES)})")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise CorpusError(f"{where}: message {i} ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise CorpusError(f"{where}: the conversation has no assistant turn to learn from")
    if not any(m["role"] == "user" for m in out):
        raise CorpusError(f"{where}: the conversation has no user turn")
    for key in ("id", "group"):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            raise CorpusError(f"{where}: '{key}' must be a string or an integer")
    conv_id = str(record.get("id") or default_id or where)
    return Conversation(conv_id, out, str(record.get("group") or conv_id))


def read_conversations(path: str | Path, *, documents_too: bool = False) -> list[Conversation]:
    """Every conversation of a JSONL file (blank lines skipped); one clear error on a bad line.
    With `documents_too`, lines that are documents (no 'messages') are skipped, not errors, and a
    file without conversations gives []."""
    file = Path(path)
    out = []
    for where, record in read_jsonl(file, CorpusError, "conversations"):
        if documents_too and not is_conversational(record):
            continue
        out.append(parse_conversation(record, where, default_id=f"line-{where.rsplit(':', 1)[1]}"))
    if not out and not documents_too:
        raise CorpusError(f"{file} holds no conversations")
    return out


def builtin_conversations(name: str) -> list[Conversation]:
    """A built-in conversation set (BUILTIN_CONVERSATIONS), e.g. `django-faq`."""
    if name not in BUILTIN_CONVERSATIONS:
        raise CorpusError(f"unknown built-in conversations {name!r}; choose from {', '.join(BUILTIN_CONVERSATIONS)}")
    return [parse_conversation(r, f"{name}:{i + 1}") for i, r in enumerate(BUILTIN_CONVERSATIONS[name][1]())]


def conversation_record(conv: Conversation) -> dict:
    """A Conversation as one line of conversational JSONL (what `read_conversations` reads back)."""
    return {"id": conv.id, "group": conv.group, "messages": conv.messages}


def write_corpus_jsonl(name: str, out: str | Path) -> tuple[str, int]:
    """Write a built-in corpus as JSONL that `--data` reads: a built-in domain's documents
    ({"id", "text", "group"}) or a built-in conversation set ({"id", "group", "messages"}).
    Returns (kind, count); the file appears whole or not at all."""
    if name in BUILTIN_CONVERSATIONS:
        kind, rows = "conversations", [conversation_record(c) for c in builtin_conversations(name)]
    elif name in BUILTIN_DOMAINS:
        kind, rows = "documents", [{"id": d.id, "text": d.text, "group": d.group} for d in load_builtin(name)]
    else:
        raise CorpusError(f"unknown built-in corpus {name!r}; choose from "
                          f"{', '.join([*BUILTIN_DOMAINS, *BUILTIN_CONVERSATIONS])}")
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out} is a directory; give a .jsonl file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return kind, len(rows)


# --- a domain's text: documents and conversations ---------------------------------------------


def load_domain_texts(name: str, data_paths: Mapping[str, Path]) -> tuple[list[Document], list[Conversation]]:
    """The documents and conversations of a domain: a user's folder or JSONL file (documents and
    conversation lines may mix in one file), else the built-in corpus (documents only)."""
    path = data_paths.get(name)
    if path is None:
        return load_domain(name, data_paths), []
    return load_user_texts(path)


def load_user_texts(path: str | Path) -> tuple[list[Document], list[Conversation]]:
    """Documents and conversations of a user's corpus: a JSONL file, or a folder whose .jsonl files
    hold them (corpora/user.py `load_folder`; a conversation's id is prefixed with its file's path)."""
    docs = load_user_corpus(path)  # skips conversation lines; checks the path and every document line
    file = Path(path).expanduser()
    if file.is_dir():
        convs = [replace(c, id=f"{f.relative_to(file).as_posix()}:{c.id}", group=f"{f.relative_to(file).as_posix()}:"
                         f"{c.group}") for f in sorted(corpus_files(file, (".jsonl",)))
                 for c in read_conversations(f, documents_too=True)]
    else:
        convs = read_conversations(file, documents_too=True) if file.suffix.lower() == ".jsonl" else []
    if not docs and not convs:
        raise CorpusError(f"{file} has no documents and no conversations")
    return docs, dedupe_conversations(convs)


def dedupe_conversations(convs: list[Conversation]) -> list[Conversation]:
    """Exact duplicates (same messages) dropped, the first kept."""
    seen, out = set(), []
    for conv in convs:
        key = json.dumps(conv.messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(conv)
    return out


@dataclass
class ConversationSplits:
    train: list[Conversation]
    val: list[Conversation]
    test: list[Conversation]

    def summary(self, dropped_duplicates: int = 0) -> dict:
        """What the bundle records (data/splits.json, under the domain's "conversations")."""
        return {"conversations": len(self.train) + len(self.val) + len(self.test),
                "dropped_duplicates": dropped_duplicates, "train_conversations": len(self.train),
                "val_ids": [c.id for c in self.val], "test_ids": [c.id for c in self.test]}


def split_conversations(convs: list[Conversation], seed: int, what: str = "conversations",
                        **fractions: float) -> ConversationSplits:
    """Train/val/test by group, with the same rule and seed as documents (data.split_documents;
    `fractions`: its val_frac / test_frac)."""
    proxies = [Document(id=str(i), text=c.user_text(), group=c.group) for i, c in enumerate(convs)]
    try:
        sp: Splits = split_documents(proxies, seed=seed, **fractions)
    except CorpusError as exc:
        raise CorpusError(f"{what}: {exc}") from None
    return ConversationSplits(*([convs[int(d.id)] for d in part] for part in (sp.train, sp.val, sp.test)))


# --- training rows ----------------------------------------------------------------------------


def conversation_rows(tokenizer, convs: list[Conversation], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per conversation, cut at `max_tokens`; a conversation with no assistant
    token left after the cut is dropped (it would carry no loss)."""
    rows = [conversation_example(tokenizer, c, max_tokens) for c in convs]
    return [(ids, labels) for ids, labels in rows if any(y != IGNORE for y in labels[1:])]


def mix_rows(chunks: list[list[int]], convs: list, n: int, seed: int) -> tuple[list[list[int]], list]:
    """At most `n` training rows of one domain: conversations and document chunks share them in
    proportion to what there is, each kind keeping at least half when it has that many."""
    k = min(len(convs), max(n - len(chunks), n // 2)) if chunks else min(len(convs), n)
    picked = sorted(random.Random(seed).sample(range(len(convs)), k)) if k < len(convs) else range(len(convs))
    return chunks[: n - k], [convs[i] for i in picked]


def user_turn_ids(tokenizer, convs: list[Conversation], max_tokens: int) -> list[list[int]]:
    """Token ids of each conversation's user turns (what the router reads at serving time)."""
    return [ids for ids in (tokenize(tokenizer, c.user_text(), "user turn")[:max_tokens] for c in convs) if ids]


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("conversations need a base model with a chat template")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise InputError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(upto)))
    return full, spans


def conversation_example(tokenizer, conv: Conversation, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation: labels are the ids on assistant tokens, -100 elsewhere.
    Conversations longer than `max_tokens` are cut at the end."""
    text, spans = assistant_spans(tokenizer, conv.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [], []
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        ids.append(tok)
        inside = any(start < b and end > a for a, b in spans)
        labels.append(tok if inside else IGNORE)
    return ids[:max_tokens], labels[:max_tokens]


def pad_examples(examples: list[tuple[list[int], list[int]]], pad_id: int, width: int):
    """Right-padded ids, labels (-100 on padding) and attention mask tensors [n, width]."""
    import torch

    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        n = min(len(x), width)
        ids[row, :n] = torch.tensor(x[:n])
        labels[row, :n] = torch.tensor(y[:n])
        mask[row, :n] = 1
    return ids, labels, mask


def assistant_nll(model, tokenizer, convs: list[Conversation], max_tokens: int = MAX_TOKENS,
                  batch_size: int = 4) -> tuple[float, int]:
    """(summed next-token NLL, count) over the assistant tokens of `convs`: exp(sum / count) is the
    assistant-token perplexity."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(convs), batch_size):
            nll, n = _assistant_nll_sum(model, tokenizer, convs[start:start + batch_size], max_tokens)
            total, count = total + float(nll), count + n
    return total, count


def assistant_loss(model, tokenizer, convs: list[Conversation], max_tokens: int = 512):
    """Mean next-token loss over assistant tokens only (the SFT objective), as a tensor."""
    nll, n = _assistant_nll_sum(model, tokenizer, convs, max_tokens)
    return nll / n


def _assistant_nll_sum(model, tokenizer, convs: list[Conversation], max_tokens: int):
    """(summed next-token NLL as a tensor, count) over the assistant tokens of one batch of `convs`."""
    import torch

    examples = [conversation_example(tokenizer, c, max_tokens) for c in convs]
    pad = pad_id(tokenizer)
    ids, labels, mask = pad_examples(examples, pad, max(len(x) for x, _ in examples))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
    return nll, int((target != IGNORE).sum())
