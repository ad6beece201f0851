"""Hierarchical routing on a tiny random Llama: subdomains under a domain, fallback, disk round trip."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from support.tiny import TINY_DOMAINS, tiny_config

from temporal_lora.bundle import read_manifest
from temporal_lora.cli import main
from temporal_lora.errors import InputError
from temporal_lora.evolve import add_subdomain, remove_domain
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.decisions import plan_routes, route_texts
from temporal_lora.storage import read_hierarchy

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Two real, clearly different slices of Python's standard library as subdomains of `code`: a
# random 64-dim embedding router cannot tell close ones apart (email vs asyncio: ~65%).
CHILDREN = {"net": ("email", "http"), "codecs": ("encodings",)}


def _quiet(*_args):
    pass


def _corpus(root: Path, packages: tuple[str, ...]) -> Path:
    for pkg in packages:
        for file in sorted((STDLIB / pkg).glob("*.py")):
            dst = root / f"{pkg}-{file.stem}.txt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(file.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("sub-corpora")
    return {name: _corpus(root / name, pkgs) for name, pkgs in CHILDREN.items()}


@pytest.fixture(scope="module")
def hier(tiny_bundle, corpora, tmp_path_factory):
    """The tiny bundle with code/net and code/codecs (versions 2 and 3), and the original manifest."""
    dst = tmp_path_factory.mktemp("hier") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    original = read_manifest(dst)
    reports = [add_subdomain(dst, "code", name, data=path, config=tiny_config(), progress=False, log=_quiet)
               for name, path in corpora.items()]
    return dst, original, reports


def _held_out_texts(bundle: Path, corpora: dict, tl, tokens: int = 64, train: bool = False) -> dict[str, list[str]]:
    """Windows of `tokens` tokens of each child's test and validation documents (or its training ones)."""
    splits = json.loads((bundle / "subrouters" / "code" / "splits.json").read_text())
    out = {}
    for child, path in corpora.items():
        ids = set(splits[child]["test_ids"]) | set(splits[child]["val_ids"])
        if train:
            ids = {p.name for p in path.iterdir()} - ids
        texts = []
        for doc_id in sorted(ids):
            toks = tl.tokenizer((path / doc_id).read_text(), add_special_tokens=False)["input_ids"]
            texts += [tl.tokenizer.decode(toks[k : k + tokens]) for k in range(0, len(toks) - tokens, 4 * tokens)]
        out[child] = texts
    return out


def test_add_subdomain_changes_nothing_else(hier):
    bundle, original, (first, second) = hier
    manifest = read_manifest(bundle)
    assert manifest["version"] == 3
    assert [e["change"] for e in manifest["history"]] == ["train", "add-subdomain", "add-subdomain"]
    assert manifest["history"][-1]["domain"] == "code/codecs"
    # every file of the original bundle is still there, byte for byte
    assert {r: manifest["files"][r] for r in original["files"]} == original["files"]
    entry = manifest["subdomains"]["code"]
    assert entry["children"] == ["net", "codecs"]
    assert entry["adapters"]["net"]["path"] == "subadapters/code/net"
    assert (bundle / "subadapters/code/net/adapter_model.safetensors").is_file()
    assert json.loads((bundle / "subadapters/code/net/adapter_config.json").read_text())["peft_type"] == "LORA"
    # one child: no sub-router yet (texts keep the parent adapter); two: a calibrated one
    assert first["children"] == ["net"] and first["router_training"] == {}
    assert second["children"] == ["net", "codecs"] and second["router_training"]["temperature"] > 0
    assert set(second["router_training"]["calibration_accuracy_by_child"]) == {"net", "codecs"}
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


def _two_level_accuracy(tl, texts: dict[str, list[str]]) -> tuple[int, float]:
    """(inputs the top level sent to `code`, share of those routed to the right child)."""
    right = total = n = 0
    for child, items in texts.items():
        assert items, child
        for row in route_texts(tl, items, fallback_threshold=0.0):
            n += 1
            if row["domain"] == "code":
                assert not row["fallback"]
                total += 1
                right += row["subdomain"] == child and row["route"] == f"code/{child}"
    return total, right / total


def test_two_level_routing_picks_the_subdomain(hier, corpora):
    bundle = hier[0]
    tl = TemporalLoRA.from_pretrained(bundle)
    # of the texts the top level sends to `code`, the second level picks the right child, for
    # windows of the children's training documents and of their held-out ones (the real model's
    # accuracy is measured in benchmarks/time_hierarchy.py; here the features are random embeddings)
    for train, wanted in ((True, 0.85), (False, 0.8)):
        n, sub = _two_level_accuracy(tl, _held_out_texts(bundle, corpora, tl, train=train))
        assert n >= 20 and sub >= wanted


def test_fallback_to_the_parent_below_the_threshold(hier, corpora):
    bundle = hier[0]
    tl = TemporalLoRA.from_pretrained(bundle)
    items = sum(_held_out_texts(bundle, corpora, tl).values(), [])
    free = [r for r in route_texts(tl, items, fallback_threshold=0.0) if r["domain"] == "code"]
    # confidences are reported rounded to 6 decimals, so cut between two distinct ones, clear of rounding
    confs = sorted(set(r["subdomain_confidence"] for r in free))
    assert len(confs) >= 2
    mid = len(confs) // 2
    cut = (confs[mid - 1] + confs[mid]) / 2
    assert confs[0] < cut < confs[-1]  # the threshold splits the inputs
    routed = route_texts(tl, items, fallback_threshold=cut)
    rows = [r for r in routed if r["domain"] == "code"]
    for r in rows:
        if r["subdomain_confidence"] < cut:
            assert r["fallback"] and r["subdomain"] is None and r["route"] == "code"
        else:
            assert not r["fallback"] and r["route"] == f"code/{r['subdomain']}"
    # the adapter generation applies follows the decision: the parent's on a fallback
    tl.hierarchy.set_threshold(cut)
    w = plan_routes(tl, tl.encode([t for t, r in zip(items, routed, strict=True) if r["domain"] == "code"])).weights
    names = tl.mixer.adapter_names
    for r, row in zip(rows, w, strict=True):
        assert names[int(row.argmax())] == ("code" if r["fallback"] else f"code~{r['subdomain']}")
        assert float(row.sum()) == 1.0


def test_sub_router_reads_short_texts_of_every_child(hier):
    bundle = hier[0]
    replay = read_hierarchy(bundle, read_manifest(bundle)).replay["code"]
    for child in CHILDREN:  # headings, first lines, signatures of the child's training documents
        assert "short" in replay[child] and len(replay[child]["short"]) > 0, child


def test_round_trip_save_and_load(hier, corpora, tmp_path):
    bundle = hier[0]
    tl = TemporalLoRA.from_pretrained(bundle)
    items = sum(_held_out_texts(bundle, corpora, tl).values(), [])[:12]
    out = tl.save_pretrained(tmp_path / "copy")
    again = TemporalLoRA.from_pretrained(out)
    assert read_manifest(out)["subdomains"]["code"]["children"] == ["net", "codecs"]
    assert route_texts(again, items) == route_texts(tl, items)
    chunks = torch.tensor([tl.encode([items[0]])[0][:32]] * 2)
    for name in ("code/net", "code/codecs", "code"):
        before = tl.token_nll(chunks, tl.domain_weights(name, 2))
        assert torch.equal(again.token_nll(chunks, again.domain_weights(name, 2)), before)
    # a subdomain adapter really differs from its parent
    assert not torch.equal(tl.token_nll(chunks, tl.domain_weights("code/net", 2)),
                           tl.token_nll(chunks, tl.domain_weights("code", 2)))


def test_bundles_without_subdomains_are_unchanged(tiny_bundle, hier, corpora):
    plain = TemporalLoRA.from_pretrained(tiny_bundle)
    assert plain.hierarchy is None and plain.mixer.adapter_names == TINY_DOMAINS
    assert "subdomains" not in read_manifest(tiny_bundle)
    assert set(route_texts(plain, ["def f(x):\n    return x"])[0]) == {
        "domain", "probs", "confidence", "abstained"}
    tl = TemporalLoRA.from_pretrained(hier[0])
    items = sum(_held_out_texts(hier[0], corpora, tl).values(), [])[:8]
    # the top level of a bundle with subdomains routes and scores exactly as before
    assert [d.to_dict() for d in tl.route(items)] == [d.to_dict() for d in plain.route(items)]
    chunks = torch.tensor([tl.encode([t])[0][:24] for t in items[:3]])
    for d in TINY_DOMAINS:
        w = plain.domain_weights(d, len(chunks))
        assert torch.equal(tl.token_nll(chunks, w), plain.token_nll(chunks, w))


def test_remove_domain_keeps_or_drops_subdomains(hier, tmp_path):
    keep, drop = tmp_path / "keep", tmp_path / "drop"
    shutil.copytree(hier[0], keep)
    shutil.copytree(hier[0], drop)
    remove_domain(keep, "legal", log=_quiet)
    assert TemporalLoRA.from_pretrained(keep).hierarchy.subs["code"].children == ["net", "codecs"]
    remove_domain(drop, "code", log=_quiet)
    manifest = read_manifest(drop)
    assert not manifest.get("subdomains") and not any(r.startswith("sub") for r in manifest["files"])
    assert TemporalLoRA.from_pretrained(drop).hierarchy is None


def test_cli_route_shows_the_subdomain_and_errors_change_nothing(hier, corpora, capsys):
    bundle = hier[0]
    # a child's text that the top level sends to `code` (the tiny router does not send every one there)
    tl = TemporalLoRA.from_pretrained(bundle)
    texts = [f.read_text()[:600] for path in corpora.values() for f in sorted(path.glob("*.txt"))]
    text = next(t for t, d in zip(texts, tl.route(texts), strict=True) if d.domain == "code")
    assert main(["route", "--bundle", str(bundle), "--fallback-threshold", "0", text]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["domain"] == "code" and row["subdomain"] in CHILDREN and not row["fallback"]
    assert row["route"] == f"code/{row['subdomain']}" and set(row["subdomain_probs"]) == set(CHILDREN)
    before = read_manifest(bundle)["files"]
    assert main(["add-subdomain", "--bundle", str(bundle), "--parent", "nope", "--name", "x",
                 "--data", str(corpora["net"])]) == 2
    assert main(["add-subdomain", "--bundle", str(bundle), "--parent", "code", "--name", "net",
                 "--data", str(corpora["net"])]) == 2
    assert "already" in capsys.readouterr().err
    assert read_manifest(bundle)["files"] == before
    with pytest.raises(InputError, match="exactly one"):
        add_subdomain(bundle, "code", "y", progress=False, log=_quiet)


def test_server_route_shows_the_subdomain(hier, corpora):
    import httpx
    from support.serving import load_served, running

    from temporal_lora.server import ServerSettings, create_app

    tl = load_served(hier[0])
    items = _held_out_texts(hier[0], corpora, tl)["codecs"][:3]
    with running(create_app(tl, ServerSettings())) as url:
        rows = httpx.post(f"{url}/v1/route", json={"input": items}, timeout=60).json()["data"]
    expected = route_texts(tl, items)
    for row, want in zip(rows, expected, strict=True):
        assert row["domain"] == want["domain"] and row["route"] == want["route"]
        assert row["subdomain"] == want["subdomain"] and row["fallback"] == want["fallback"]


def test_generation_uses_the_subdomain_adapter(hier, corpora):
    tl = TemporalLoRA.from_pretrained(hier[0])
    items = _held_out_texts(hier[0], corpora, tl)["codecs"][:4]
    routes = route_texts(tl, items)
    for g, r in zip(tl.generate(items, max_new_tokens=4), routes, strict=True):
        used = [k for k, v in g.weights.items() if v == 1.0]
        assert used == ([r["route"]] if r["domain"] else [])
        assert sum(g.weights.values()) == (1.0 if r["domain"] else 0.0)
    # forcing a top-level domain, or soft mode, works as in a bundle without subdomains
    forced = tl.generate(items[:1], domain="code", max_new_tokens=2)[0].weights
    assert {k for k, v in forced.items() if v} == {"code"}
    soft = tl.generate(items[:1], mode="soft", max_new_tokens=2)[0].weights
    assert {k for k, v in soft.items() if v} <= set(tl.domains)
    # and a subdomain can be forced by name
    assert {k for k, v in tl.generate(items[:1], domain="code/net", max_new_tokens=2)[0].weights.items() if v} == {
        "code/net"}


def test_library_cli_and_server_generate_the_same_text(hier, corpora, capsys):
    """One routing decision for every path: the same prompt and seed give the same text and the
    same adapters (subdomains included) from TemporalLoRA.generate, `tlora generate` and `tlora serve`."""
    import httpx
    from support.serving import load_served, running

    from temporal_lora.server import ServerSettings, create_app

    tl = load_served(hier[0])
    texts = _held_out_texts(hier[0], corpora, tl)
    prompts = [" ".join(t.split()[:24]) for t in texts["codecs"][:2] + texts["net"][:1]]
    library = [tl.generate([p], max_new_tokens=8, seed=3)[0] for p in prompts]
    assert any(k.startswith("code/") for g in library for k, v in g.weights.items() if v)  # a subdomain is used
    cli = []
    for p in prompts:
        assert main(["generate", "--bundle", str(hier[0]), p, "--max-new-tokens", "8", "--seed", "3", "--json"]) == 0
        cli.append(json.loads(capsys.readouterr().out))
    with running(create_app(tl, ServerSettings())) as url:
        served = [httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": p, "max_tokens": 8,
                                                             "temperature": 0, "seed": 3}, timeout=120).json()
                  for p in prompts]
    for g, c, s in zip(library, cli, served, strict=True):
        assert g.text == c["text"] == s["choices"][0]["text"]
        assert g.weights == c["weights"] == s["choices"][0]["routing"]["weights"]
