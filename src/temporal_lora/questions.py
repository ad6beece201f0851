"""Questions the embedded instruct model writes about documents, kept only where they are on-topic.

Users ask short questions; the corpora hold few. The base model (SmolLM2-Instruct) reads an excerpt
of a document and writes one question about it (greedy, at most `max_new_tokens`). A question is
kept only if `keep_generated_question` (corpora/views.py) accepts it: one question of 5-30 words,
no chat boilerplate, at least two content words shared with the excerpt (it is about the document)
and no run of eight words copied from it (it is a question, not a quoted passage).
"""

from __future__ import annotations

import torch

from temporal_lora.corpora import Document
from temporal_lora.corpora.views import keep_generated_question
from temporal_lora.text import pad_batch

PROMPT = ("Here is an excerpt:\n\n{excerpt}\n\nWrite one short question that someone could ask and that this "
          "excerpt answers. Reply with the question only.")
EXCERPT_WORDS = 120


def excerpt(text: str, words: int = EXCERPT_WORDS) -> str:
    return " ".join(text.split()[:words])


@torch.no_grad()
def generate_questions(model, tokenizer, docs: list[Document], *, max_new_tokens: int = 30,
                       batch_size: int = 8) -> list[dict]:
    """One generated question per document: [{"id", "question", "kept"}] (greedy, batched)."""
    out = []
    for start in range(0, len(docs), batch_size):
        batch = docs[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT.format(excerpt=excerpt(d.text))}], tokenize=False,
            add_generation_prompt=True) for d in batch]
        seqs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids, mask = pad_batch(seqs, pad, left=True)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for doc, row in zip(batch, gen[:, ids.shape[1]:], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            question = text.splitlines()[0].strip().strip('"') if text else ""
            out.append({"id": doc.id, "question": question,
                        "kept": keep_generated_question(question, excerpt(doc.text))})
    return out
