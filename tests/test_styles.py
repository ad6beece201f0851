"""Style adapters (DPO, TRL) under a domain, on a tiny random Llama: storage, selection, bad input."""

import json
import shutil

import httpx
import pytest
import torch
from support.serving import load_served, running

from temporal_lora.bundle import read_manifest
from temporal_lora.cli import main
from temporal_lora.errors import CorpusError, InputError
from temporal_lora.evolve import add_style
from temporal_lora.evolve.styles import StyleConfig, implicit_margins, read_preferences
from temporal_lora.model import TemporalLoRA
from temporal_lora.rewards import FLOOR, distinct_n, register, repetition_rate, score
from temporal_lora.routing.decisions import plan_routes
from temporal_lora.server import ServerSettings, create_app

TOY = StyleConfig(budget="test", steps=4, batch_size=2, lr=2e-2, beta=0.1, sft_weight=0.0, max_length=64,
                  prompts=6, samples=3, prompt_tokens=16, max_new_tokens=16, min_gap=0.0)
PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for line in text:", "def parse(argv):", "x = [1, 2]"]


def _pairs(chosen=" return a + b\n", rejected=" the the the the\n"):
    return [{"prompt": p, "chosen": chosen, "rejected": rejected} for p in PROMPTS]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _quiet(*_a):
    pass


@pytest.fixture(scope="module")
def styled(tiny_bundle, tmp_path_factory):
    """The tiny bundle plus code/plain (user preferences, default style of code) and legal/formal."""
    dst = tmp_path_factory.mktemp("styled") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    original = read_manifest(dst)
    prefs = _write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", _pairs())
    first = add_style(dst, "code", "plain", preferences=prefs, config=TOY, make_default=True, progress=False,
                      log=_quiet)
    legal = [{"prompt": p, "chosen": " The court held so.", "rejected": " lol ok"} for p in PROMPTS]
    prefs2 = _write_jsonl(prefs.parent / "legal.jsonl", legal)
    second = add_style(dst, "legal", "formal", preferences=prefs2, config=TOY, progress=False, log=_quiet)
    return dst, original, (first, second)


@pytest.fixture(scope="module")
def tl(styled):
    return TemporalLoRA.from_pretrained(styled[0])


def test_add_style_keeps_every_other_file_byte_identical(styled):
    bundle, original, (first, second) = styled
    manifest = read_manifest(bundle)
    assert manifest["version"] == original.get("version", 1) + 2
    assert [e["change"] for e in manifest["history"]][-2:] == ["add-style", "add-style"]
    assert {r: manifest["files"][r] for r in original["files"]} == original["files"]
    new = set(manifest["files"]) - set(original["files"])
    assert new == {f"styles/{d}/{s}/{f}" for d, s in (("code", "plain"), ("legal", "formal"))
                   for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert manifest["styles"]["code"]["default"] == "plain" and manifest["styles"]["legal"]["default"] is None
    entry = manifest["styles"]["code"]["adapters"]["plain"]
    assert entry["training"]["reference"].startswith("parent adapter") and entry["training"]["pairs"] == len(PROMPTS)
    assert first["route"] == "code/plain" and second["version"] == manifest["version"]


def test_dpo_moves_the_preference_margin_and_keeps_the_reference(styled, tl):
    pairs = _pairs()
    with tl.mixer.peft_native():  # PEFT's own LoRA path, so set_adapter picks policy / reference
        margins = implicit_margins(tl.peft_model, tl.tokenizer, pairs, "code~plain", "code", beta=0.1)
        unrelated = implicit_margins(tl.peft_model, tl.tokenizer, pairs, "code", "code", beta=0.1)
    assert unrelated == [0.0] * len(pairs)
    assert sum(margins) / len(margins) > 0  # policy started as a copy of the reference: margin 0 before
    tl.peft_model.set_adapter("code")
    # The reference (parent adapter) on disk is unchanged, so the parent's outputs are too.
    fresh = TemporalLoRA.from_pretrained(styled[0])
    for name in ("lora_A", "lora_B"):
        a = {n: p for n, p in tl.peft_model.named_parameters() if f"{name}.code." in n}
        b = {n: p for n, p in fresh.peft_model.named_parameters() if f"{name}.code." in n}
        assert a and all(torch.equal(a[n], b[n]) for n in a)
    diff = [n for n, p in tl.peft_model.named_parameters() if ".code~plain." in n
            and not torch.equal(p, dict(tl.peft_model.named_parameters())[n.replace(".code~plain.", ".code.")])]
    assert diff, "the style adapter should differ from its parent"


def test_style_selection_and_default_and_notes(tl):
    ids = tl.encode(["def f(x):\n    return x", "def g():"])
    plan = plan_routes(tl, ids, domain="code")  # no style asked: code's default (plain)
    assert [c.style for c in plan.styles] == ["plain", "plain"] and plan.named[0]["code/plain"] == 1.0
    plan = plan_routes(tl, ids, domain="code", style="none")
    assert plan.named[0]["code"] == 1.0 and plan.styles[0].style is None
    plan = plan_routes(tl, ids, domain="literature", style="plain")
    assert plan.named[0]["literature"] == 1.0 and "no style adapters" in plan.styles[0].note
    plan = plan_routes(tl, ids, domain="legal", style="plain")  # legal has formal only, no default
    assert plan.named[0]["legal"] == 1.0 and "does not have" in plan.styles[0].note
    plan = plan_routes(tl, ids, domain="legal/formal")
    assert plan.named[0]["legal/formal"] == 1.0 and plan.styles[0].style == "formal"
    plan = plan_routes(tl, tl.encode(["You can go home now. It is fine."]), domain="legal", style="auto")
    assert plan.styles[0].style is None and "auto chose 'plain'" in plan.styles[0].note
    plan = plan_routes(tl, tl.encode(["Notwithstanding the aforementioned jurisdictional considerations, the "
                                      "appellate tribunal determined the constitutionality."]),
                       domain="legal", style="auto")
    assert plan.styles[0].style == "formal" and plan.named[0]["legal/formal"] == 1.0
    g = tl.generate(["def f(x):"], domain="code", max_new_tokens=2)[0]
    assert g.style["style"] == "plain" and g.to_dict()["style"]["requested"] is None


def test_mixed_batch_of_domains_and_styles_equals_one_by_one(tl):
    prompts = ["def f(x):", "The court held", "Once upon a time", "def g(y):"]
    forced = ["code", "legal", "literature", "code"]
    styles = ["plain", "formal", "plain", "none"]
    together = []
    for d, s in zip(forced, styles, strict=True):  # per-row forced domains via routing of a forced row each
        together.append(plan_routes(tl, tl.encode(["x"]), domain=d, style=s).weights[0])
    weights = torch.stack(together)
    ids = tl.encode(prompts)
    batch = tl.generate_ids(ids, weights, 6)
    alone = [tl.generate([p], domain=d, style=s, max_new_tokens=6)[0].text
             for p, d, s in zip(prompts, forced, styles, strict=True)]
    assert batch == alone
    # and the routed path: one generate call with per-row styles equals each prompt alone
    mixed = tl.generate(prompts, style=styles, max_new_tokens=6)
    for p, s, g in zip(prompts, styles, mixed, strict=True):
        assert g.text == tl.generate([p], style=s, max_new_tokens=6)[0].text


def test_cli_generate_style_and_add_style_errors(styled, capsys, tmp_path):
    bundle = styled[0]
    assert main(["generate", "--bundle", str(bundle), "--domain", "code", "--style", "plain", "--json",
                 "--max-new-tokens", "2", "def f(x):"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["style"]["style"] == "plain" and row["weights"]["code/plain"] == 1.0
    assert main(["generate", "--bundle", str(bundle), "--domain", "legal/formal", "--max-new-tokens", "2",
                 "The court"]) == 0
    assert "style: formal" in capsys.readouterr().out


BAD = [
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "field 'chosen' is empty"),
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}', "identical"),
    ('{"prompt": 3, "chosen": "b", "rejected": "c"}', "must be a string"),
    ('not json', "not valid JSON"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_preference_lines(tmp_path, line, message):
    with pytest.raises(InputError, match=message):
        read_preferences(_write_jsonl(tmp_path / "p.jsonl", [line]))


def test_every_bad_add_style_exits_2_and_leaves_the_bundle_unchanged(styled, tmp_path, capsys):
    bundle = styled[0]
    before = read_manifest(bundle)
    good = _write_jsonl(tmp_path / "good.jsonl", _pairs())
    long = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 400, "chosen": "a", "rejected": "b"}])
    empty = _write_jsonl(tmp_path / "empty.jsonl", ['{"prompt": "a", "chosen": " ", "rejected": "b"}'])
    cases = [
        (["--domain", "code", "--name", "terse", "--preferences", str(long)], "style training reads at most"),
        (["--domain", "code", "--name", "terse", "--preferences", str(empty)], "is empty"),
        (["--domain", "code", "--name", "legal", "--preferences", str(good)], "clashes with the domain"),
        (["--domain", "code", "--name", "plain", "--preferences", str(good)], "already a style"),
        (["--domain", "code", "--name", "terse", "--reward", "funny"], "unknown reward"),
        (["--domain", "nope", "--name", "terse", "--reward", "plain"], "has no domain 'nope'"),
        (["--domain", "code", "--name", "auto", "--reward", "plain"], "reserved"),
        (["--domain", "code", "--name", "terse", "--preferences", str(tmp_path / "missing.jsonl")], "does not exist"),
    ]
    for args, message in cases:
        assert main(["add-style", "--bundle", str(bundle), *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert read_manifest(bundle) == before


def test_style_name_clashing_with_a_subdomain(styled, tmp_path):
    from support.tiny import tiny_config

    from temporal_lora.evolve import add_subdomain

    dst = tmp_path / "b"
    shutil.copytree(styled[0], dst)
    corpus = tmp_path / "net"
    corpus.mkdir()
    import sysconfig
    from pathlib import Path

    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "email").glob("*.py"))[:12]:
        (corpus / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    add_subdomain(dst, "code", "net", data=corpus, config=tiny_config(), progress=False, log=_quiet)
    before = read_manifest(dst)
    with pytest.raises(InputError, match="clashes with the subdomain 'code/net'"):
        add_style(dst, "code", "net", reward="plain", config=TOY, progress=False, log=_quiet)
    assert read_manifest(dst) == before
    # Subdomains and styles together: a route to code/net with style plain uses code/plain.
    tl = TemporalLoRA.from_pretrained(dst)
    assert tl.mixer.adapter_names[-2:] == ["code~plain", "legal~formal"]
    plan = plan_routes(tl, tl.encode(["x"]), domain="code/net", style="plain")
    assert plan.named[0]["code/plain"] == 1.0


def test_builtin_reward_builds_pairs_on_policy(styled, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(styled[0], dst)
    try:
        report = add_style(dst, "literature", "concise", reward="concise", config=TOY, progress=False, log=_quiet)
    except CorpusError as exc:  # a random tiny model rarely finishes a sentence: too few usable pairs
        assert "usable pairs" in str(exc)
        assert read_manifest(dst) == read_manifest(styled[0])
        return
    assert report["source"]["reward"] == "concise" and report["source"]["pairs"] >= 2
    pairs = (dst / "styles/literature/concise/pairs.jsonl").read_text().splitlines()
    assert len(pairs) == report["source"]["pairs"]


def test_server_style_selection(styled):
    tl = load_served(styled[0])
    app = create_app(tl, ServerSettings(max_prompt_tokens=200, max_new_tokens=20, default_max_tokens=4))
    with running(app) as url:
        page = httpx.get(url + "/").text  # the playground's style menu (browser test: test_playground.py)
        assert '<select id="style">' in page and "body.style" in page
        models = httpx.get(url + "/v1/models").json()["data"]
        assert {"code/plain", "legal/formal"} <= {m["id"] for m in models}
        body = {"model": "code", "prompt": "def f(x):", "max_tokens": 3, "temperature": 0, "style": "none"}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert r["routing"]["style"]["style"] is None and r["routing"]["weights"]["code"] == 1.0
        r = httpx.post(url + "/v1/completions", json=body | {"style": "plain"}, timeout=60).json()
        assert r["routing"]["style"]["style"] == "plain" and r["routing"]["weights"]["code/plain"] == 1.0
        expected = tl.generate(["def f(x):"], domain="code", style="plain", max_new_tokens=3)[0].text
        assert r["choices"][0]["text"] == expected
        r = httpx.post(url + "/v1/completions", json=body | {"model": "legal/formal", "style": None},
                       timeout=60).json()
        assert r["routing"]["weights"]["legal/formal"] == 1.0 and r["routing"]["style"]["style"] == "formal"
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "auto", "messages": [{"role": "user", "content": "def f(x):\n    return x"}],
            "max_tokens": 3, "temperature": 0, "style": "auto"}).json()
        assert "style" in r["routing"]
        r = httpx.post(url + "/v1/completions", json=body | {"model": "literature", "style": "plain"}, timeout=60)
        assert r.status_code == 200 and "no style adapters" in r.json()["routing"]["style"]["note"]


def test_rewards_resist_degenerate_text():
    plain = "You can ask the judge to end the case early. The judge said no."
    formal = ("The court held that the defendant's motion for summary judgment must be denied because genuine "
              "issues of material fact remain.")
    assert score("plain", plain).reward > score("plain", formal).reward
    assert score("formal", formal).reward > score("formal", plain).reward
    for reward in ("plain", "formal", "concise"):
        assert score(reward, "").reward == FLOOR and score(reward, "   ").degenerate == "empty"
        assert score(reward, "the court held that the motion").degenerate == "truncated"
        assert score(reward, "the the the the the the the the the the the.").reward < score(reward, plain).reward
        # gibberish with long "formal" words loses to real prose in every reward
        gib = "Xqzvtrplk mnbvcxzasd qwertyuiopl. Zxcvbnmlkj hgfdsapoiu ytrewqlkj."
        assert score(reward, gib).reward < max(score(reward, plain).reward, score(reward, formal).reward)
    assert score("concise", "Yes. The judge said no to it.").reward > score("concise", formal).reward
    assert repetition_rate("a b c a b c a b c") > 0.5 and distinct_n(["a b", "a b"]) == 0.5
    assert register("Can I get my money back?") == "plain"
    assert register("Notwithstanding the aforementioned jurisdictional considerations, the appellate "
                    "tribunal determined the constitutionality of the legislation.") == "formal"


@pytest.mark.real
def test_real_model_style_on_a_tiny_budget(real_bundle, tmp_path):
    """SmolLM2: a plain style from two on-policy rounds (tiny budget), then chosen per request."""
    _, path = real_bundle
    dst = tmp_path / "bundle"
    shutil.copytree(path, dst)
    cfg = StyleConfig(budget="test", prompts=4, samples=3, prompt_tokens=32, max_new_tokens=24, rounds=2, steps=1,
                      batch_size=2, max_length=96, min_gap=0.0)
    try:
        report = add_style(dst, "medical", "plain", reward="plain", config=cfg, progress=False, log=_quiet)
    except CorpusError as exc:  # four prompts may all yield degenerate samples; the bundle is unchanged then
        assert "usable pairs" in str(exc)
        return
    assert report["training"]["steps"] == 2 and report["source"]["pairs"] >= 4
    rounds = report["source"]["rounds"]
    assert len(rounds) == 2 and sum(r["pairs"] for r in rounds) == report["source"]["pairs"]
    assert [r["steps"] for r in report["training"]["rounds"]] == [1, 1]
    tl = TemporalLoRA.from_pretrained(dst)
    g = tl.generate(["The patient was admitted with chest pain."], domain="medical", style="plain",
                    max_new_tokens=4)[0]
    assert g.style["style"] == "plain" and g.weights["medical/plain"] == 1.0
