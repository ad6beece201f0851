"""Conversational JSONL: assistant-only loss with the chat template, and one clear error per bad line."""

import json

import pytest
import torch
from support.serving import TINY_CHAT_TEMPLATE

from temporal_lora.backbone import load_backbone
from temporal_lora.conversations import (
    IGNORE,
    assistant_loss,
    conversation_example,
    read_conversations,
)
from temporal_lora.errors import CorpusError

CONV = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "How do I open a file?"},
                     {"role": "assistant", "content": "Use open(path)."},
                     {"role": "user", "content": "And close it?"},
                     {"role": "assistant", "content": "Call f.close()."}]}


@pytest.fixture(scope="module")
def model_tok(tiny_llama):
    model, tok, _ = load_backbone(str(tiny_llama))
    tok.chat_template = TINY_CHAT_TEMPLATE
    return model, tok


def _file(tmp_path, rows):
    path = tmp_path / "c.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_labels_cover_assistant_turns_only(model_tok, tmp_path):
    _, tok = model_tok
    conv = read_conversations(_file(tmp_path, [CONV]))[0]
    ids, labels = conversation_example(tok, conv, 512)
    learned = tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE])
    assert "Use open(path)." in learned and "Call f.close()." in learned
    assert "How do I open" not in learned and "Be brief" not in learned and "close it?" not in learned
    assert conv.user_text() == "How do I open a file?\nAnd close it?"


def test_changing_a_user_turn_does_not_change_the_targets(model_tok, tmp_path):
    """The loss is on assistant tokens only: a user turn's own next-token targets never count.
    Changing the *last* user turn's words changes only tokens whose targets are masked, and the
    assistant turns before it (whose context is unchanged) - so only the last answer's loss moves.
    With a model that ignores context (the same logits everywhere) the loss is exactly unchanged."""
    model, tok = model_tok
    other = json.loads(json.dumps(CONV))
    other["messages"][3]["content"] = "And then shut it down entirely?"
    a, b = read_conversations(_file(tmp_path, [CONV, other]))
    # A context-free "model": fixed logits per position-independent token, so only targets matter.
    table = torch.randn(tok.vocab_size + 8, tok.vocab_size + 8)

    class Unigram(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": table[input_ids]})()

    la, lb = assistant_loss(Unigram(), tok, [a]), assistant_loss(Unigram(), tok, [b])
    assert torch.allclose(la, lb)
    # and with the real model, the loss reads only assistant targets: masking them all gives no loss
    ids, labels = conversation_example(tok, a, 512)
    assert sum(y != IGNORE for y in labels) < len(labels) / 2
    assert torch.isfinite(assistant_loss(model, tok, [a]))


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty content"),
    ({"messages": []}, "non-empty list"),
    ({"text": "a document"}, "'messages' list"),
    ("{broken", "not valid JSON"),
]


@pytest.mark.parametrize(("row", "message"), BAD)
def test_bad_conversation_lines_get_one_clear_error(tmp_path, row, message):
    with pytest.raises(CorpusError, match=message) as info:
        read_conversations(_file(tmp_path, [CONV, row]))
    assert ":2:" in str(info.value)
