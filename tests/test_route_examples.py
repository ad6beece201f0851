"""Route examples from the user (`tlora examples`), short views, question filtering, multi-layer features."""

import hashlib
import json
import shutil

import pytest
import torch

from temporal_lora.cli import main
from temporal_lora.corpora.views import (
    code_lines,
    first_sentences,
    headings,
    keep_generated_question,
    questions_in,
    short_views,
)
from temporal_lora.routing.features import feature_layers, resolve_feature_spec

RST = """Managing files
==============

This document describes Django's file access APIs. It also covers storage.

Using files in models
---------------------

When you use a FileField, Django provides an API.

FAQ: Can I store files outside MEDIA_ROOT?
"""

CODE = '''import os


class Loader:
    """Load configuration files from disk."""

    def load(self, path: str) -> dict:
        # Read the whole file before parsing it below.
        return {}
'''


def test_short_views_cut_headings_sentences_and_code_lines():
    assert headings(RST)[:2] == ["Managing files", "Using files in models"]
    assert first_sentences(RST)[0] == "This document describes Django's file access APIs."
    lines = code_lines(CODE)
    assert "class Loader:" in lines and "def load(self, path: str) -> dict:" in lines
    assert "Load configuration files from disk." in lines
    assert "Read the whole file before parsing it below." in lines
    views = short_views(RST + "\n" + CODE, limit=5, seed=0)
    assert len(views) == 5 and len({v.lower() for v in views}) == 5
    assert views == short_views(RST + "\n" + CODE, limit=5, seed=0)  # deterministic
    assert short_views("", limit=3) == []


def test_questions_in_finds_the_texts_own_questions():
    assert any(q.endswith("Can I store files outside MEDIA_ROOT?") for q in questions_in(RST))
    assert questions_in("x = a if b else c?") == []


def test_generated_question_filter():
    doc = "Metformin lowers blood glucose in adults with type 2 diabetes by reducing hepatic glucose output."
    assert keep_generated_question("Does metformin lower glucose in adults with diabetes?", doc)
    assert not keep_generated_question("What is the capital of France?", doc)  # off-topic
    assert not keep_generated_question("Metformin lowers glucose.", doc)  # not a question
    assert not keep_generated_question("Here is a question: does metformin lower glucose in diabetes?", doc)
    copied = "Does metformin lower blood glucose in adults with type 2 diabetes by reducing hepatic glucose output?"
    assert not keep_generated_question(copied, doc)  # a quoted passage, not a question


def test_multi_layer_feature_spec():
    assert resolve_feature_spec("hidden:8,12", 30) == "hidden:8,12"
    assert resolve_feature_spec("hidden:-1,8", 30) == "hidden:12,8"
    assert resolve_feature_spec("hidden:-1", 4) == "hidden:2"  # the tiny test models keep layer 2
    assert resolve_feature_spec("hidden:default", 30) == "hidden:8,12"
    assert resolve_feature_spec("hidden:default", 4) == "hidden:2"
    assert feature_layers("hidden:8,12") == [8, 12] and feature_layers("embeddings") == []


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_examples_add_list_remove(tmp_path, capsys, tiny_bundle):
    from temporal_lora.bundle import read_manifest
    from temporal_lora.model import TemporalLoRA

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    v0 = read_manifest(bundle)["version"]
    text = "Can I use GPL code in a closed product?"
    assert main(["examples", "add", "--bundle", str(bundle), "--domain", "legal", text, "Is MIT permissive?"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = read_manifest(bundle)
    assert report["changed"] and manifest["version"] == v0 + 1 == report["version"]
    assert manifest["router"]["examples"]["count"] == 2
    assert manifest["router"]["training"]["user_examples"] == 2
    assert manifest["history"][-1]["change"] == "examples-add"
    # Adapters untouched; the router was refit.
    old = read_manifest(tiny_bundle)["files"]
    for rel, digest in old.items():
        if rel.startswith("adapters/"):
            assert manifest["files"][rel] == digest
    assert manifest["files"]["router/router.safetensors"] != old["router/router.safetensors"]
    tl = TemporalLoRA.from_pretrained(bundle)
    assert tl.route([text])[0].domain in tl.domains

    jsonl = tmp_path / "ex.jsonl"
    jsonl.write_text(json.dumps({"text": "def f():\n    return 1"}) + "\n")
    assert main(["examples", "add", "--bundle", str(bundle), "--domain", "code", "--jsonl", str(jsonl)]) == 0
    capsys.readouterr()
    assert main(["examples", "list", "--bundle", str(bundle)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["domain"] for r in rows) == ["code", "legal", "legal"]
    # Adding the same text again changes nothing.
    assert main(["examples", "add", "--bundle", str(bundle), "--domain", "legal", text]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False

    assert main(["examples", "remove", "--bundle", str(bundle), "--domain", "legal"]) == 0
    capsys.readouterr()
    assert [r["domain"] for r in json.loads("[" + ",".join(
        json.dumps(x) for x in __import__("temporal_lora.evolve.examples", fromlist=["x"]).list_examples(bundle)) + "]")] \
        == ["code"]
    assert main(["examples", "remove", "--bundle", str(bundle), rows[0]["id"] if rows[0]["domain"] == "code"
                 else next(r["id"] for r in rows if r["domain"] == "code")]) == 0
    capsys.readouterr()
    assert "examples" not in read_manifest(bundle)["router"]

    # Bad input: one error line, exit 2, bundle unchanged.
    before = _digest(bundle)
    for argv, msg in ((["--domain", "finance", "text"], "no domain 'finance'"),
                      (["--domain", "legal", "   "], "empty"),
                      (["--domain", "legal"], "no example texts")):
        assert main(["examples", "add", "--bundle", str(bundle), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("tlora: error:") == 1
    assert main(["examples", "remove", "--bundle", str(bundle), "ex-nope"]) == 2
    capsys.readouterr()
    assert _digest(bundle) == before


def test_fit_router_weighs_examples():
    from temporal_lora.config import RouterConfig
    from temporal_lora.routing.gating import fit_router

    torch.manual_seed(0)
    feats = {d: {"train": torch.randn(1, 20, 4) + k * 3, "calib": torch.randn(1, 5, 4) + k * 3}
             for k, d in enumerate(("a", "b"))}
    cfg = RouterConfig(epochs=50)
    odd = torch.full((3, 4), 0.0)  # sits at class a's centre but is labelled b
    net, summary = fit_router(feats, cfg, examples={"b": odd}, example_weight=50.0)
    assert summary["user_examples"] == 3 and summary["examples"] == 40
    assert int(net(odd).argmax(-1)[0]) == 1


def test_fit_router_does_not_depend_on_earlier_random_draws():
    """The same rows and seed give the same router whatever drew random numbers before (in training,
    the adapters do: a router must not change with them)."""
    from temporal_lora.config import RouterConfig
    from temporal_lora.routing.gating import fit_router

    gen = torch.Generator().manual_seed(0)
    feats = {d: {"train": torch.randn(1, 20, 4, generator=gen) + k, "calib": torch.randn(1, 5, 4, generator=gen) + k}
             for k, d in enumerate(("a", "b"))}
    cfg = RouterConfig(epochs=20)
    torch.manual_seed(1)
    first = fit_router(feats, cfg, seed=3)[0].state_dict()
    torch.rand(1000)  # another recipe's draws
    second = fit_router(feats, cfg, seed=3)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_records_router_sources_and_short_texts(tiny_bundle):
    from safetensors import safe_open

    from temporal_lora.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    splits = json.loads((tiny_bundle / "data" / "splits.json").read_text())
    code = splits["code"]["router_sources"]["pallets-code"]
    assert code["train_documents"] > 0 and all(i.startswith(("flask/", "click/")) for i in code["test_ids"])
    assert splits["code"]["source"] == "builtin:code"
    with safe_open(str(tiny_bundle / manifest["router"]["replay"]), framework="pt") as fh:
        keys = set(fh.keys())
        assert {"code.short", "code.short_calib", "legal.short"} <= keys
        assert fh.get_tensor("code.short").dim() == 2
    assert manifest["router"]["config"]["short_texts"] > 0


@pytest.mark.slow
def test_router_text_skips_a_source_it_cannot_fetch(monkeypatch, tiny_llama):
    from support.tiny import tiny_config

    import temporal_lora.train as train_mod
    from temporal_lora.backbone import load_backbone
    from temporal_lora.errors import FetchError

    _, tokenizer, _ = load_backbone(str(tiny_llama))
    cfg = tiny_config()
    dd = train_mod.load_domain_data("literature", {}, cfg.seed)

    def failing(name):
        raise FetchError(f"no apt-get for {name}")

    monkeypatch.setattr(train_mod, "load_source", failing)
    logged = []
    rt = train_mod.router_text(dd, tokenizer, cfg, builtin=True, log=logged.append)
    assert rt.sources == {"fortunes-poems": {"skipped": "no apt-get for fortunes-poems"}}
    assert logged and len(rt.train) == cfg.router_chunks and rt.short
    assert all(len(ids) <= cfg.router.max_tokens for ids in rt.short)
    # A user corpus (builtin=False) reads no other source, and short_texts=0 turns short texts off.
    from dataclasses import replace
    off = replace(cfg, router=replace(cfg.router, short_texts=0))
    rt = train_mod.router_text(dd, tokenizer, off, builtin=False)
    assert rt.sources == {} and rt.short == [] and rt.short_calib == []
