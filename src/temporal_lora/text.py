"""Turning text into token ids the way training saw it, and padding batches of ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from temporal_lora.errors import InputError, TemporalLoRAError


def tokenize(tokenizer, text: str, what: str) -> list[int]:
    """Token ids of `text` as training saw it (no special tokens); text the tokenizer cannot take
    (lone surrogates, e.g. from invalid UTF-8 on a command line or in JSON) is a clear InputError."""
    return encode_text(tokenizer, text, what)["input_ids"]


def encode_text(tokenizer, text: str, what: str, **kwargs):
    """The tokenizer's whole encoding of `text` (ids, and offsets if asked), errors as in `tokenize`."""
    try:
        return tokenizer(text, add_special_tokens=False, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not valid Unicode text") from exc


def pad_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else 0 (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def separator_id(tokenizer) -> int | None:
    """The token that marks where one packed short document ends and the next begins: the
    tokenizer's end-of-sequence token (None if it has none: documents are then packed back to back)."""
    return getattr(tokenizer, "eos_token_id", None)


def pad_batch(seqs: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [n, width] and attention mask of sequences padded to the longest. Generation pads on the
    left (every row's next token is at the end); router features on the right (positions kept)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if left:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        else:
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
    return ids, mask


def read_jsonl(path: str | Path, error: type[TemporalLoRAError], what: str) -> list[tuple[str, object]]:
    """(`file:line`, parsed object) for every non-blank line of a JSONL file; an unreadable file or a
    line that is not JSON raises `error` with one clear message naming `what` the file should hold."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not JSON
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} from {file}: {exc}") from exc
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg})") from exc
    return records
