"""Conversational JSONL: assistant-only loss with the chat template, and one clear error per bad line."""

import json
import re

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


# --- conversations as training data: train, add-domain, add-subdomain ------------------------------

FOODS = ["bread", "pizza", "salmon", "carrots", "lasagna", "brownies", "chicken", "potatoes", "muffins",
         "cookies", "pumpkin pie", "tofu", "meatloaf", "cornbread", "apple crumble", "focaccia"]


def _cooking(i: int, food: str) -> dict:
    return {"messages": [
        {"role": "user", "content": f"How long should I bake the {food} in the oven, and at what temperature?"},
        {"role": "assistant", "content": f"Bake the {food} at {170 + 5 * (i % 6)} degrees for about {20 + i} minutes, "
                                         f"until golden; let the {food} rest on a rack before serving."}]}


def _code_docs(n: int = 8) -> list[dict]:
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "calendar.py", "glob.py", "bisect.py",
             "colorsys.py", "heapq.py", "keyword.py", "quopri.py", "sched.py"]
    return [{"id": n_, "text": (stdlib / n_).read_text(encoding="utf-8")} for n_ in names if (stdlib / n_).exists()][:n]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv-data")
    return {"code": _write(root / "code.jsonl", _code_docs()),
            "cooking": _write(root / "cooking.jsonl", [_cooking(i, f) for i, f in enumerate(FOODS)]),
            # documents and conversations in one file, one domain
            "mixed": _write(root / "mixed.jsonl", _code_docs(6) + [_cooking(i, f) for i, f in enumerate(FOODS[:9])])}


@pytest.fixture(scope="module")
def conv_bundle(chat_llama, corpus_files, tmp_path_factory):
    from support.tiny import tiny_config

    from temporal_lora.train import train_bundle

    out = tmp_path_factory.mktemp("conv-bundles") / "b"
    tl = train_bundle(["code", "cooking"], out, base=str(chat_llama), config=tiny_config(),
                      data={"code": corpus_files["code"], "cooking": corpus_files["cooking"]},
                      progress=False, log=lambda *a: None)
    return tl, out


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_loss_is_the_assistant_only_loss(chat_llama, tmp_path):
    """The adapter's first training loss (LoRA's B starts at zero, so it is the base model's) equals the
    masked SFT loss; and changing a user turn's tokens that no assistant token reads changes nothing."""
    from dataclasses import replace

    from support.tiny import tiny_config

    from temporal_lora.adapters import train_adapter
    from temporal_lora.conversations import conversation_rows

    model, tok, _ = load_backbone(str(chat_llama))
    convs = read_conversations(_write(tmp_path / "c.jsonl", [CONV, _cooking(1, "bread"), _cooking(2, "tofu")]))
    cfg = replace(tiny_config(), steps=1, batch_size=len(convs))
    summary = train_adapter(model, [], tmp_path / "a", cfg, progress=False, conversations=conversation_rows(tok, convs, 256))
    assert summary["train_conversations"] == 3 and summary["train_chunks"] == 0
    assert summary["first_loss"] == pytest.approx(float(assistant_loss(model, tok, convs)), abs=2e-4)

    def first_loss(last_user: str) -> float:
        conv = json.loads(json.dumps(_cooking(3, "salmon")))
        conv["messages"].append({"role": "user", "content": last_user})
        c = read_conversations(_write(tmp_path / "one.jsonl", [conv]))
        rows = conversation_rows(tok, c, 256)
        return train_adapter(model, [], tmp_path / "b", replace(cfg, batch_size=1), progress=False,
                             conversations=rows)["first_loss"]

    assert first_loss("Thanks!") == first_loss("And what if my oven has no fan and the recipe is for a fan oven?")


def test_conversation_only_domain_trains_and_routes_its_user_turns(conv_bundle):
    tl, out = conv_bundle
    splits = json.loads((out / "data" / "splits.json").read_text())
    conv = splits["cooking"]["conversations"]
    assert splits["cooking"]["documents"] == 0 and conv["conversations"] == len(FOODS)
    assert conv["test_ids"] and conv["val_ids"] and conv["train_conversations"] >= 10
    steps_rows = tl.info["train_config"]["steps"] * tl.info["train_config"]["batch_size"]  # rows one adapter sees
    assert tl.info["training"]["cooking"]["train_conversations"] == min(steps_rows, conv["train_conversations"])
    assert "conversations" not in splits["code"]
    # the held-out conversations' user turns go to the conversation domain, code to code
    held_out = [_cooking(int(i.removeprefix("line-")) - 1, FOODS[int(i.removeprefix("line-")) - 1])
                for i in conv["test_ids"] + conv["val_ids"]]
    turns = [c["messages"][0]["content"] for c in held_out]
    assert all(r.domain == "cooking" for r in tl.route(turns))
    assert tl.route(["def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)"])[0].domain == "code"


def test_eval_measures_conversation_domains_on_their_held_out_conversations(conv_bundle, tmp_path):
    """`tlora eval` on a bundle with a conversation-only domain: documents for `code` as before, and
    the held-out conversations of `cooking`: assistant-token perplexity and routing of the user turns."""
    from temporal_lora.evaluate import evaluate_bundle

    tl, out = conv_bundle
    report = evaluate_bundle(tl, tmp_path / "eval", ppl_chunks=2, router_chunks=4, progress=False)
    assert set(report["perplexity"]["base"]) == {"code"} and set(report["router"]["test_chunks"]) == {"code"}
    conv = report["conversations"]
    test_ids = json.loads((out / "data" / "splits.json").read_text())["cooking"]["conversations"]["test_ids"]
    assert set(conv) == {"cooking"} and conv["cooking"]["test_conversations"] == len(test_ids)
    ppl = conv["cooking"]["assistant_ppl"]
    assert conv["cooking"]["routing_user_turns"] == 1.0 and ppl["routed"] == ppl["oracle"]  # every turn routed right
    assert ppl["oracle"] < ppl["base"]  # the adapter learned the domain's answers
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "Held-out conversations" in md and "| cooking |" in md


def test_documents_and_conversations_mix_in_one_domain(chat_llama, corpus_files, tmp_path, capsys):
    from temporal_lora.cli import main

    out = tmp_path / "mixed"
    code = main(["train", "--domains", "code,mixed", "--data", f"code={corpus_files['code']}",
                 "--data", f"mixed={corpus_files['mixed']}", "--base", str(chat_llama), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["adapters"]["mixed"]["training"]
    assert info["train_chunks"] > 0 and info["train_conversations"] > 0
    splits = json.loads((out / "data" / "splits.json").read_text())["mixed"]
    assert splits["documents"] == 6 and splits["conversations"]["conversations"] == 9


def test_add_domain_and_add_subdomain_take_conversations(conv_bundle, corpus_files, tmp_path):
    import shutil

    from support.tiny import tiny_config

    from temporal_lora import TemporalLoRA
    from temporal_lora.evolve import add_domain, add_subdomain

    _, src = conv_bundle
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    rows = [{"messages": [{"role": "user", "content": f"Which verse of the psalm mentions {w}?"},
                          {"role": "assistant", "content": f"The psalm speaks of {w} in its third verse, singing praise."}]}
            for w in ("shepherds", "mountains", "rivers", "lambs", "cedars", "doves", "stars", "valleys", "harps")]
    report = add_domain(bundle, "psalms", data=_write(tmp_path / "p.jsonl", rows), config=tiny_config(),
                        progress=False, log=lambda *a: None)
    assert report["adapter_training"]["train_conversations"] > 0
    sub = add_subdomain(bundle, "cooking", "baking", data=corpus_files["cooking"], config=tiny_config(),
                        progress=False, log=lambda *a: None)
    assert sub["adapter_training"]["train_conversations"] > 0
    tl = TemporalLoRA.from_pretrained(bundle)
    assert tl.route(["Which verse of the psalm mentions the sea?"])[0].domain == "psalms"
    assert tl.info["data"]["psalms"]["conversations"]["test_ids"]


BAD_LINES = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "empty content"),
    ("{broken", "not valid JSON"),
    ({"mesages": []}, "needs a string 'text' field"),
]


@pytest.mark.parametrize(("row", "message"), BAD_LINES)
def test_bad_conversation_lines_exit_2_and_change_nothing(conv_bundle, chat_llama, tmp_path, capsys, row, message):
    from temporal_lora.cli import main

    _, bundle = conv_bundle
    bad = _write(tmp_path / "bad.jsonl", [_cooking(0, "bread"), row, _cooking(1, "tofu")])
    before = _tree(bundle)
    runs = [["train", "--domains", "code,cooking", "--data", f"cooking={bad}", "--base", str(chat_llama),
             "--out", str(tmp_path / "new")],
            ["add-domain", "--bundle", str(bundle), "--name", "baking", "--data", str(bad)],
            ["add-subdomain", "--bundle", str(bundle), "--parent", "cooking", "--name", "baking", "--data", str(bad)]]
    for argv in runs:
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tlora: error:")]
        assert len(err) == 1 and message in err[0] and "bad.jsonl" in err[0], err
        assert re.search(r"bad\.jsonl(:2:|, line 2:) ", err[0]), err  # the file and line of the bad row
    assert _tree(bundle) == before
    assert not (tmp_path / "new").exists()


def test_conversations_need_a_chat_template(tiny_llama, corpus_files, tmp_path, capsys):
    from temporal_lora.cli import main

    code = main(["train", "--domains", "code,cooking", "--data", f"code={corpus_files['code']}",
                 "--data", f"cooking={corpus_files['cooking']}", "--base", str(tiny_llama), "--out", str(tmp_path / "o")])
    assert code == 2 and "chat template" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_django_faq_pages_become_conversations():
    from temporal_lora.corpora.django_faq import page_records

    page = """=========
FAQ: Demo
=========

.. _faq-x:

How can I see the raw SQL queries Django is running?
====================================================

Make sure your Django :setting:`DEBUG` setting is ``True``. See
:doc:`multiple databases</topics/db/multi-db>`, then do this::

    >>> connection.queries

Miscellaneous
=============

A topic heading, not a question.
"""
    records = page_records("demo", page)
    assert len(records) == 1
    user, assistant = records[0]["messages"]
    assert user == {"role": "user", "content": "How can I see the raw SQL queries Django is running?"}
    assert assistant["content"].startswith("Make sure your Django DEBUG setting is `True`. See\nmultiple databases, then")
    assert ">>> connection.queries" in assistant["content"] and ":doc:" not in assistant["content"]


@pytest.mark.slow
def test_conversations_bench_runs_and_merges_into_styles_json(chat_llama, tmp_path):
    """The benchmark's whole path on the tiny model (real FAQ, real technical documents): three adapters,
    routing with a bundle's replay memory, and a merge that keeps every other key of styles.json."""
    from dataclasses import replace

    from support.tiny import tiny_config

    from benchmarks.conversations import run_conversations_bench
    from temporal_lora.train import train_bundle

    cfg = tiny_config()
    cfg = replace(cfg, router=replace(cfg.router, extra_sources=False, short_texts=0))
    bundle = tmp_path / "bundle"
    train_bundle(["technical", "code"], bundle, base=str(chat_llama), config=cfg, progress=False, log=lambda *a: None)
    out = tmp_path / "results"
    out.mkdir()
    (out / "styles.json").write_text(json.dumps({"legal": {"plain": {"reward": "plain"}}, "meta": {"budget": "quick"}}))
    entry = run_conversations_bench(bundle, tmp_path / "work", out=out, base=str(chat_llama), config=cfg,
                                    progress=False, log=lambda *a: None)
    data = json.loads((out / "styles.json").read_text())
    assert data["legal"] == {"plain": {"reward": "plain"}} and data["meta"] == {"budget": "quick"}
    conv = data["conversations"]
    assert set(conv["assistant_ppl"]) == {"base", "documents", "conversations", "mixed"}
    assert all(v > 1 for v in conv["assistant_ppl"].values())
    assert 0 <= conv["routing_user_turns"] <= 1 and conv == json.loads(json.dumps(entry))
    assert conv["data"]["test"] >= 15 and not set(conv["data"]["test_ids"]) & set(
        conv["training"]) and conv["training"]["conversations"]["train_conversations"] > 0
    assert "| adapter trained on FAQ conversations |" in (out / "conversations.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_corpus_command_writes_the_faq_and_the_faq_is_held_out_of_technical(tmp_path, capsys):
    from temporal_lora.cli import main
    from temporal_lora.corpora import load_builtin

    out = tmp_path / "faq.jsonl"
    assert main(["corpus", "django-faq", "--out", str(out)]) == 0
    convs = read_conversations(out)
    assert len(convs) >= 40 and all(c.messages[0]["role"] == "user" for c in convs)
    assert capsys.readouterr().out == f"{len(convs)} conversations written to {out}\n"
    technical = load_builtin("technical", progress=False)
    assert technical and not [d for d in technical if d.id.startswith("faq/")]
    assert main(["corpus", "no-such-corpus", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown built-in corpus" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


@pytest.mark.real
def test_smollm2_chat_template_masks_everything_but_the_answer_and_its_end_marker():
    """The real base model's template (with its default system prompt): the labels are exactly the
    assistant's answer and `<|im_end|>`, and the user turn is what the router reads."""
    from transformers import AutoTokenizer

    from temporal_lora.backbone import default_model_dir
    from temporal_lora.conversations import builtin_conversations

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    conv = builtin_conversations("django-faq")[0]
    ids, labels = conversation_example(tok, conv, 512)
    learned = tok.decode([y for y in labels if y != IGNORE])
    assert learned.strip() == conv.messages[1]["content"] + "<|im_end|>"
    assert conv.user_text() not in learned and "SmolLM" in tok.decode(ids)  # template's system prompt, masked
