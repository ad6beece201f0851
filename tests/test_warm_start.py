"""Warm starts for a new domain's adapter: nearest and blend, on hand-made PEFT adapter folders."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from temporal_lora.errors import InputError
from temporal_lora.evolve.warm_start import blend_adapter, router_affinity, warm_start
from temporal_lora.routing.gating import GatingNetwork

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"
A, B = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight"


def adapter(folder, seed, r=2, alpha=4, dim=6):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({A: torch.randn(r, dim, generator=g), B: torch.randn(dim, r, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA"}))
    return folder


def delta(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    w = load_file(str(folder / "adapter_model.safetensors"))
    return cfg["lora_alpha"] / cfg["r"] * (w[B].double() @ w[A].double())


def test_blend_of_one_adapter_is_that_adapter(tmp_path):
    one = adapter(tmp_path / "legal", 0)
    out = blend_adapter({"legal": one, "code": adapter(tmp_path / "code", 1)}, {"legal": 1.0, "code": 0.0},
                        tmp_path / "out")
    assert torch.allclose(delta(out), delta(one), atol=1e-5)


def test_blend_is_the_best_rank_r_approximation_of_the_weighted_delta(tmp_path):
    folders = {"a": adapter(tmp_path / "a", 0), "b": adapter(tmp_path / "b", 1, alpha=8)}
    out = blend_adapter(folders, {"a": 0.75, "b": 0.25}, tmp_path / "out")
    want = 0.75 * delta(folders["a"]) + 0.25 * delta(folders["b"])
    u, s, vh = torch.linalg.svd(want)
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: no rank-2 matrix is closer
    assert torch.allclose(delta(out), best, atol=1e-5)
    assert load_file(str(out / "adapter_model.safetensors"))[A].shape == (2, 6)  # the first adapter's rank


def test_nearest_takes_the_domain_the_router_prefers(tmp_path):
    router = GatingNetwork(4, 2, hidden_dim=0)
    with torch.no_grad():
        router.net[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        router.net[0].bias.zero_()
    feats = torch.tensor([[[0.0, 5.0, 0, 0], [0.0, 4.0, 1, 0]]])  # [lengths, n, dim]: all like domain 1
    affinity = router_affinity(router, feats, ["legal", "code"])
    assert affinity["code"] > 0.9 > affinity["legal"]
    folders = {"legal": adapter(tmp_path / "legal", 0), "code": adapter(tmp_path / "code", 1)}
    start, info = warm_start("nearest", affinity, folders, tmp_path)
    assert start == folders["code"] and info["init_from"] == "code"
    assert warm_start("base", affinity, folders, tmp_path) == (None, {"init": "base"})
    start, info = warm_start("blend", affinity, folders, tmp_path)
    assert info["init"] == "blend" and (start / "adapter_model.safetensors").is_file()
    with pytest.raises(InputError, match="unknown init"):
        warm_start("random", affinity, folders, tmp_path)


@pytest.mark.parametrize("init", ["nearest", pytest.param("blend", marks=pytest.mark.slow)])
def test_add_domain_with_a_warm_start(tiny_bundle, tmp_path, init):
    """The new adapter starts from old adapters; they stay byte-identical and the manifest says how."""
    import shutil

    from support.tiny import TINY_DOMAINS, tiny_config

    from temporal_lora.bundle import read_manifest
    from temporal_lora.evolve import add_domain

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    before = read_manifest(dst)["files"]
    add_domain(dst, "medical", config=tiny_config(), init=init, progress=False, log=lambda *a: None)
    manifest = read_manifest(dst)
    for rel, digest in before.items():
        if rel.startswith("adapters/") and "/medical/" not in rel and rel != "adapters/README.md":
            assert manifest["files"][rel] == digest
    training = manifest["adapters"]["medical"]["training"]
    assert training["init"] == init and set(training["affinity"]) == set(TINY_DOMAINS)
    assert abs(sum(training["affinity"].values()) - 1) < 1e-4
    if init == "nearest":
        assert training["init_from"] == max(training["affinity"], key=training["affinity"].get)
    with pytest.raises(InputError, match="unknown init"):
        add_domain(dst, "technical", config=tiny_config(), init="random", progress=False, log=lambda *a: None)
    assert read_manifest(dst)["version"] == manifest["version"]  # a bad init changes nothing


@pytest.mark.slow
def test_train_with_a_shared_seed_phase(tiny_llama, tiny_bundle, tmp_path, capsys):
    """`tlora train --init shared`: every adapter starts from one adapter trained on the union."""
    from support.tiny import TINY_DOMAINS, tiny_config

    from temporal_lora.bundle import read_manifest
    from temporal_lora.cli import main
    from temporal_lora.train import train_bundle

    out = tmp_path / "shared"
    train_bundle(TINY_DOMAINS, out, base=str(tiny_llama), config=tiny_config(), init="shared", progress=False,
                 log=lambda *a: None)
    manifest, plain = read_manifest(out), read_manifest(tiny_bundle)
    for d in TINY_DOMAINS:
        assert manifest["adapters"][d]["training"]["init"] == "shared"
        rel = f"adapters/{d}/adapter_model.safetensors"
        assert manifest["files"][rel] != plain["files"][rel]  # same data and seed, another start
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        main(["train", "--domains", "code", "--out", str(tmp_path / "x"), "--init", "random"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_refuses_an_unknown_init(tmp_path):
    from temporal_lora.train import train_bundle

    with pytest.raises(InputError, match="unknown init"):
        train_bundle(["code"], tmp_path / "x", init="random")
    assert not (tmp_path / "x").exists()
