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

from dataclasses import dataclass
from pathlib import Path

from temporal_lora.errors import CorpusError, InputError
from temporal_lora.text import read_jsonl

ROLES = ("system", "user", "assistant")
IGNORE = -100


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]]

    def user_text(self) -> str:
        """The user turns, joined: the text the router reads for this conversation."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


def is_conversational(record: object) -> bool:
    return isinstance(record, dict) and "messages" in record


def parse_conversation(record: object, where: str) -> Conversation:
    """One JSONL record as a Conversation, or one clear CorpusError naming `where` (file:line)."""
    if not is_conversational(record):
        raise CorpusError(f"{where}: expected an object with a 'messages' list")
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
    return Conversation(str(record.get("id") or where), out)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a JSONL file (blank lines skipped); one clear error on a bad line."""
    file = Path(path)
    out = [parse_conversation(record, where) for where, record in read_jsonl(file, CorpusError, "conversations")]
    if not out:
        raise CorpusError(f"{file} holds no conversations")
    return out


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


def assistant_loss(model, tokenizer, convs: list[Conversation], max_tokens: int = 512):
    """Mean next-token loss over assistant tokens only (the SFT objective), as a tensor."""
    import torch

    examples = [conversation_example(tokenizer, c, max_tokens) for c in convs]
    ids, labels, mask = pad_examples(examples, tokenizer.pad_token_id, max(len(x) for x, _ in examples))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE)
