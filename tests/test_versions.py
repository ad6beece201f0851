"""Domains over time on a tiny random Llama: add/remove a domain, history, rollback, old bundles."""

import json
import shutil

import pytest
from support.tiny import TINY_DOMAINS, tiny_config

from temporal_lora.bundle import MANIFEST, read_manifest
from temporal_lora.cli import main
from temporal_lora.errors import CorpusError, InputError
from temporal_lora.evolve import add_domain, remove_domain
from temporal_lora.model import TemporalLoRA
from temporal_lora.versions import list_versions, rollback


def _quiet(*_args):
    pass


@pytest.fixture(scope="module")
def grown(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle with one domain added (version 2), and the original manifest."""
    dst = tmp_path_factory.mktemp("grown") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    original = read_manifest(dst)
    report = add_domain(dst, "medical", config=tiny_config(), progress=False, log=_quiet)
    return dst, original, report


def _adapter_files(manifest, domains):
    return {rel: h for rel, h in manifest["files"].items() if any(rel.startswith(f"adapters/{d}/") for d in domains)}


def test_add_domain_keeps_old_adapters_byte_identical(grown):
    bundle, original, report = grown
    manifest = read_manifest(bundle)
    assert manifest["domains"] == [*TINY_DOMAINS, "medical"]
    assert report["version"] == manifest["version"] == 2
    assert _adapter_files(manifest, TINY_DOMAINS) == _adapter_files(original, TINY_DOMAINS)
    assert "adapters/medical/adapter_model.safetensors" in manifest["files"]
    assert manifest["router"]["replay"] == "router/replay.safetensors"
    # the router was refit from the stored features: old domains' validation accuracy is reported
    assert set(report["old_domain_accuracy_before"]) == set(TINY_DOMAINS)
    assert set(report["old_domain_accuracy_after"]) == set(TINY_DOMAINS)
    assert not report["replay_rebuilt"]
    assert report["timing"]["adapter"] > 0 and report["timing"]["router_total"] > 0
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_grown_bundle_loads_and_routes_to_the_new_domain(grown):
    tl = TemporalLoRA.from_pretrained(grown[0])
    assert tl.domains == [*TINY_DOMAINS, "medical"]
    assert set(tl.replay) == set(tl.domains)
    assert len(tl.route(["The patient was treated with metformin."])[0].probs) == 4


def test_history_and_rollback_restore_exact_files(grown, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(grown[0], bundle)
    original, v2 = grown[1], read_manifest(bundle)
    rows = list_versions(bundle)
    assert [(r["version"], r["change"], r["current"]) for r in rows] == [(1, "train", False), (2, "add-domain", True)]
    restored = rollback(bundle, 1)
    assert restored["version"] == 3 and restored["domains"] == TINY_DOMAINS
    assert restored["files"] == original["files"]  # every file of version 1, byte for byte
    assert list_versions(bundle)[-1] | {"time": None} == {"version": 3, "time": None, "change": "rollback", "to": 1,
                                                          "domains": TINY_DOMAINS, "current": True, "stored": True}
    again = rollback(bundle, 2)
    assert again["version"] == 4 and again["files"] == v2["files"]
    TemporalLoRA.from_pretrained(bundle)  # checksums verified on load
    with pytest.raises(InputError, match="no version 9"):
        rollback(bundle, 9)


def test_remove_domain(grown, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(grown[0], bundle)
    before = read_manifest(bundle)
    report = remove_domain(bundle, "literature", log=_quiet)
    manifest = read_manifest(bundle)
    kept = ["code", "legal", "medical"]
    assert manifest["domains"] == kept and report["version"] == 3
    assert _adapter_files(manifest, kept) == _adapter_files(before, kept)
    assert not (bundle / "adapters" / "literature").exists()
    assert "literature" not in json.loads((bundle / "data" / "splits.json").read_text())
    assert TemporalLoRA.from_pretrained(bundle).domains == kept
    with pytest.raises(InputError, match="no domain 'nope'"):
        remove_domain(bundle, "nope")


@pytest.mark.slow
def test_old_bundle_without_replay_or_history(tiny_bundle, tmp_path):
    """Bundles written before replay/history existed: v1 is implied, the replay is recomputed."""
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / "router" / "replay.safetensors").unlink()
    del manifest["files"]["router/replay.safetensors"]
    for key in ("version",):
        manifest.pop(key, None)
    manifest["router"].pop("replay")
    manifest["history"] = []
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    TemporalLoRA.from_pretrained(bundle)  # still loads
    assert [r["version"] for r in list_versions(bundle)] == [1]
    report = add_domain(bundle, "technical", config=tiny_config(), progress=False, log=_quiet)
    assert report["replay_rebuilt"] and report["version"] == 2
    assert rollback(bundle, 1)["files"] == manifest["files"]


def test_bad_input_changes_nothing(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    snapshot = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="already in bundle"):
        add_domain(bundle, "code", config=tiny_config(), log=_quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError):
        add_domain(bundle, "hr", data=tmp_path / "empty", config=tiny_config(), log=_quiet)
    assert main(["rollback", "--bundle", str(bundle), "--to", "5"]) == 2
    assert main(["remove-domain", "--bundle", str(bundle), "--name", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("tlora: error:") for line in err)
    assert {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "empty"]


def test_history_cli(grown, capsys):
    assert main(["history", "--bundle", str(grown[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "add-domain medical" in lines[1] and "(current)" in lines[1]


def test_replay_memory_file_is_byte_identical_when_rewritten(tmp_path):
    """The file's bytes depend only on its content (checksums and round trips rely on it)."""
    import hashlib

    import torch

    from temporal_lora.routing.replay import load_replay, save_replay

    features = {d: {"train": torch.randn(6, 4), "calib": torch.randn(2, 4)} for d in ("code", "legal")}
    digests = set()
    for i in range(8):
        save_replay(tmp_path / f"r{i}.safetensors", features, [8, 16])
        digests.add(hashlib.sha256((tmp_path / f"r{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded, lengths = load_replay(tmp_path / "r0.safetensors")
    assert lengths == [8, 16] and list(loaded) == ["code", "legal"]
    assert torch.equal(loaded["legal"]["calib"], features["legal"]["calib"].half())
