"""The bundle on disk: checksums, format version, path safety, base-model fingerprint, no pickles."""

import json
import pickle
import shutil

import pytest
from support.tiny import build_tiny_model

from temporal_lora.bundle import MANIFEST, read_manifest
from temporal_lora.errors import BaseModelMismatchError, BundleError
from temporal_lora.model import TemporalLoRA


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_manifest(bundle, change):
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_missing_manifest_or_directory(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest.json is missing"):
        read_manifest(tmp_path)


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle_copy)


def test_altered_weight_file_is_detected(bundle_copy):
    weights = bundle_copy / "adapters" / "code" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt or was modified"):
        TemporalLoRA.from_pretrained(bundle_copy)


def test_truncated_and_missing_files_are_detected(bundle_copy):
    router = bundle_copy / "router" / "router.safetensors"
    router.write_bytes(router.read_bytes()[:100])
    with pytest.raises(BundleError, match="router/router.safetensors"):
        read_manifest(bundle_copy)
    (bundle_copy / "adapters" / "legal" / "adapter_config.json").unlink()
    with pytest.raises(BundleError, match="missing adapters/legal/adapter_config.json"):
        read_manifest(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        read_manifest(bundle_copy)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "adapters/../../x"])
def test_paths_outside_the_bundle_are_refused(bundle_copy, bad):
    _edit_manifest(bundle_copy, lambda m: m["files"].update({bad: "sha256:0"}))
    with pytest.raises(BundleError, match="outside the bundle"):
        read_manifest(bundle_copy)


def test_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    link = bundle_copy / "router" / "router.safetensors"
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        read_manifest(bundle_copy)


def test_other_base_model_is_refused(tiny_bundle, tmp_path):
    other = build_tiny_model(tmp_path / "other", "llama", seed=123)
    with pytest.raises(BaseModelMismatchError, match="different weights"):
        TemporalLoRA.from_pretrained(tiny_bundle, base=str(other))


class _Bomb:
    def __reduce__(self):
        return (open, ("/tmp/tlora-pickle-was-loaded", "w"))


def test_a_planted_pickle_is_never_loaded(bundle_copy, tmp_path):
    marker = tmp_path / "never"
    for name in ("adapter_model.bin", "pytorch_model.bin"):
        (bundle_copy / "adapters" / "code" / name).write_bytes(pickle.dumps(_Bomb()))
    (bundle_copy / "router" / "router.pt").write_bytes(pickle.dumps(_Bomb()))
    shutil.rmtree("/tmp/tlora-pickle-was-loaded", ignore_errors=True)
    tl = TemporalLoRA.from_pretrained(bundle_copy)
    assert tl.route(["import os"])[0].domain in tl.domains
    from pathlib import Path

    assert not Path("/tmp/tlora-pickle-was-loaded").exists() and not marker.exists()


def test_adapter_without_safetensors_is_refused(bundle_copy):
    folder = bundle_copy / "adapters" / "code"
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    _edit_manifest(bundle_copy, lambda m: m["files"].pop("adapters/code/adapter_model.safetensors"))
    with pytest.raises(BundleError, match="safetensors"):
        TemporalLoRA.from_pretrained(bundle_copy)


def test_save_is_atomic_and_refuses_foreign_directories(tiny_bundle, tmp_path):
    tl = TemporalLoRA.from_pretrained(tiny_bundle)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        tl.save_pretrained(foreign)
    assert (foreign / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temp dirs left behind
    out = tl.save_pretrained(tmp_path / "b")
    tl.save_pretrained(out)  # replacing an existing bundle works
    assert read_manifest(out)["domains"] == tl.domains
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "notes"]


def test_saved_bundle_is_readable_by_others(tiny_bundle, tmp_path):
    import os

    out = TemporalLoRA.from_pretrained(tiny_bundle).save_pretrained(tmp_path / "shared")
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    weights = out / "adapters" / "code" / "adapter_model.safetensors"
    assert (weights.stat().st_mode & 0o777) == 0o666 & ~umask
