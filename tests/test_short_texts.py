"""Short texts as data (issue 25): a plain list of requests trains a domain, every text is a router
row, adapters train on packed windows, and the router's lexical head is fitted, stored and refit."""

import json
import random
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from support.tiny import tiny_config
from transformers import AutoTokenizer

from temporal_lora.config import router_prefix_lengths
from temporal_lora.corpora import Document, load_builtin, load_user_corpus
from temporal_lora.data import chunk_documents, pack
from temporal_lora.errors import BundleError, CorpusError
from temporal_lora.evolve.common import rechoose_abstain
from temporal_lora.evolve.domains import add_domain, remove_domain
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.lexical import (
    fit_lexical,
    hash_texts,
    load_lexical,
    no_surer_than,
    save_lexical,
)
from temporal_lora.train import train_bundle


def short_lines(name: str, n: int) -> list[str]:
    """Real one-line texts of a built-in corpus (4-9 words), shuffled with a fixed seed."""
    out = set()
    for doc in load_builtin(name, progress=False)[:300]:
        for line in doc.text.splitlines():
            words = line.split()
            if 4 <= len(words) <= 9 and len(line) <= 60 and line.isascii() and re.search("[a-z]", line):
                out.add(" ".join(words))
    lines = sorted(out)
    random.Random(0).shuffle(lines)
    return lines[:n]


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lists")
    paths = {}
    for name in ("literature", "legal", "code"):
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(short_lines(name, 260)) + "\n\n", encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def short_bundle(tmp_path_factory, tiny_llama, lists):
    out = tmp_path_factory.mktemp("short") / "bundle"
    tl = train_bundle(["literature", "legal"], out, base=str(tiny_llama),
                      data={d: lists[d] for d in ("literature", "legal")}, config=tiny_config(),
                      progress=False, log=lambda *a: None)
    return tl, out


def test_a_text_file_is_one_short_document_per_line(tmp_path):
    file = tmp_path / "questions.txt"
    file.write_text("How do I reset my password?\n\n  Where is the VPN host?  \n", encoding="utf-8")
    docs = load_user_corpus(file)
    assert [(d.id, d.text, d.group) for d in docs] == [
        ("line-1", "How do I reset my password?", "line-1"), ("line-3", "Where is the VPN host?", "line-3")]
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no non-blank lines"):
        load_user_corpus(tmp_path / "blank.txt")


def test_short_documents_are_packed_after_the_long_ones_with_the_separator(tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    long = Document("long", " ".join(["the quick brown fox jumps over the lazy dog"] * 12), "long")
    shorts = [Document(f"s{i}", text, f"s{i}") for i, text in enumerate(
        ["How do I reset my password?", "Where is the VPN host?", "Who approves a claim?", "When is payday?"])]
    short_ids = [tok(d.text, add_special_tokens=False)["input_ids"] for d in shorts]
    block = max(len(s) for s in short_ids) + 1  # every short document is shorter than one block
    without = chunk_documents([long, *shorts], tok, block_size=block, max_chunks=100, seed=3)
    with_sep = chunk_documents([long, *shorts], tok, block_size=block, max_chunks=100, seed=3, separator=1)
    assert without and with_sep[: len(without)] == without  # the long document's windows come first, unchanged
    packed = with_sep[len(without):]
    total = sum(len(s) + 1 for s in short_ids)
    assert len(packed) == total // block >= 2 and all(len(w) == block for w in packed)
    stream = [t for w in packed for t in w]
    # The stream is the short documents, each followed by the separator, in some seeded order.
    pieces = " ".join(map(str, stream)).split(" 1")
    for piece in pieces[:-1]:
        assert [int(t) for t in piece.split()] in short_ids
    assert pack([[5, 6], [7]], 2, 0) == [[5, 6], [0, 7]]
    assert pack([[5, 6], [7]], 2, None) == [[5, 6]]


def test_every_short_text_is_a_router_row_and_the_adapters_train(short_bundle, lists):
    tl, _ = short_bundle
    lengths = router_prefix_lengths(tiny_config().router, tiny_config().block_size)
    data = tl.info["data"]
    train_texts = {d: data[d]["train_documents"] for d in tl.domains}
    longest = max(len(ids) for d in tl.domains for ids in tl.encode(lists[d].read_text().split("\n")[:-2]))
    assert longest < tiny_config().block_size  # every line is a short text (no training window of its own)
    assert all(n > tiny_config().router.short_texts for n in train_texts.values())  # beyond the old cap
    # Each training text: one row per prefix length, and once more read whole.
    assert tl.info["router_training"]["examples"] == sum(n * (len(lengths) + 1) for n in train_texts.values())
    for d in tl.domains:
        assert tl.info["training"][d]["steps"] == tiny_config().steps


def test_the_lexical_head_routes_held_out_short_texts(short_bundle, lists):
    tl, _ = short_bundle
    assert tl.lexical is not None and tl.lexical.weight > 0
    lex = tl.info["router_training"]["lexical"]
    assert lex["calibration_accuracy"]["joint"] >= lex["calibration_accuracy"]["hidden"]
    texts, labels = [], []
    for i, d in enumerate(tl.domains):
        lines = [line for line in lists[d].read_text().splitlines() if line.strip()]
        held = {int(x.removeprefix("line-")) for x in tl.info["data"][d]["test_ids"]}
        texts += [lines[n - 1] for n in sorted(held)]
        labels += [i] * len(held)
    probs = tl.route_probs(tl.encode(texts))
    assert float((probs.argmax(-1) == torch.tensor(labels)).float().mean()) >= 0.9


def test_the_lexical_head_survives_save_load_add_and_remove(short_bundle, lists, tmp_path):
    tl, path = short_bundle
    copy = tmp_path / "bundle"
    tl.save_pretrained(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["router"]["lexical"]["path"] == "router/lexical.safetensors"
    assert {p.name for p in (copy / "router").iterdir()} >= {"lexical.safetensors", "lexical_replay.safetensors"}
    ids = tl.encode(["Thou art a villain, sir", "Permission is hereby granted, free of charge"])
    loaded = TemporalLoRA.from_pretrained(copy)
    assert torch.equal(loaded.route_probs(ids), tl.route_probs(ids))

    add_domain(copy, "code", data=lists["code"], config=tiny_config(), progress=False, log=lambda *a: None)
    grown = TemporalLoRA.from_pretrained(copy)
    assert grown.domains == ["literature", "legal", "code"] and grown.lexical.n_classes == 3
    assert json.loads((copy / "manifest.json").read_text())["router"]["training"]["lexical"]["rows"] > 0
    remove_domain(copy, "legal", log=lambda *a: None)
    shrunk = TemporalLoRA.from_pretrained(copy)
    assert shrunk.domains == ["literature", "code"] and shrunk.lexical.n_classes == 2


def test_fit_lexical_weighs_the_heads_on_calibration_and_stores_safely(tmp_path):
    words = {0: ["refund", "card", "charge", "balance"], 1: ["flight", "hotel", "luggage", "visa"]}
    rng = random.Random(0)

    def texts(n):
        out, y = [], []
        for i in range(n):
            label = i % 2
            out.append(" ".join(rng.choices(words[label], k=3) + rng.choices(["my", "the", "please"], k=2)))
            y.append(label)
        return out, np.array(y)

    x, y = texts(200)
    cx, cy = texts(60)
    uninformative = torch.log(torch.full((60, 2), 0.5))  # a hidden head that knows nothing
    head, summary = fit_lexical(hash_texts(x), y, hash_texts(cx), cy, uninformative, 2)
    assert summary["calibration_accuracy"] == {"hidden": 0.5, "lexical": 1.0, "joint": 1.0}
    assert head.weight > 0
    assert head.scores(hash_texts(["refund my card", "lost luggage on the flight"])).argmax(-1).tolist() == [0, 1]
    save_lexical(head, tmp_path / "lexical.safetensors")
    again = load_lexical(tmp_path / "lexical.safetensors", 2)
    counts = hash_texts(["refund my card"])
    assert torch.equal(again.scores(counts), head.scores(counts))
    with pytest.raises(BundleError, match="does not match"):
        load_lexical(tmp_path / "lexical.safetensors", 3)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BundleError, match="unreadable"):
        load_lexical(tmp_path / "bad.safetensors", 2)
    assert sp.issparse(counts)


def test_the_lexical_head_never_makes_the_router_surer_than_the_hidden_states():
    joint = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]], dtype=torch.float64)
    hidden = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], dtype=torch.float64)
    out = no_surer_than(joint, hidden)
    assert torch.allclose(out[0], torch.tensor([0.6, (1 - 0.6) / 2, (1 - 0.6) / 2], dtype=torch.float64))
    assert torch.equal(out[1], joint[1])  # the hidden head is surer (0.7 > 0.5): unchanged
    assert torch.allclose(out.sum(-1), torch.ones(2, dtype=torch.float64))
    assert out.argmax(-1).tolist() == joint.argmax(-1).tolist()


def test_abstain_auto_keeps_the_out_of_scope_texts_and_a_refit_chooses_the_same_threshold(tiny_llama, lists,
                                                                                          tmp_path):
    oos = [line for line in lists["code"].read_text().splitlines() if line.strip()][:40]
    tl = train_bundle(["literature", "legal"], tmp_path / "b", base=str(tiny_llama),
                      data={d: lists[d] for d in ("literature", "legal")}, config=tiny_config(),
                      abstain_threshold="auto", out_of_scope=oos, progress=False, log=lambda *a: None)
    chosen = tl.info["router_training"]["abstain"]
    assert chosen["rule"] == "in-scope + out-of-scope" and chosen["out_of_scope"] == len(set(oos))
    loaded = TemporalLoRA.from_pretrained(tmp_path / "b")
    assert loaded.router_config.abstain_auto and loaded.router_config.abstain_threshold == chosen["threshold"]
    items, feats, _ = loaded.examples
    assert {i["domain"] for i in items} == {"none"} and len(items) == len(set(oos))
    lengths = loaded.info["router_training"]["prefix_lengths"]
    change, again = rechoose_abstain({"abstain_auto": True}, loaded.router, loaded.replay, lengths,
                                     (loaded.lexical, loaded.lexical_replay), items, feats)
    assert change["abstain_threshold"] == chosen["threshold"]
