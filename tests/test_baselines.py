"""The comparison baselines on tiny random models: their behaviour, not their timings."""

from dataclasses import replace

import pytest
import torch
from support.tiny import tiny_config

from benchmarks.baselines import (
    merge_adapters,
    prefix_texts,
    train_multitask,
    train_sequential,
)
from temporal_lora.backbone import fingerprint, load_backbone
from temporal_lora.model import TemporalLoRA


def _delta(layer, name):
    return layer.get_delta_weight(name)


@pytest.fixture(scope="module")
def tl(tiny_bundle, tiny_llama):
    return TemporalLoRA.from_pretrained(tiny_bundle, base=str(tiny_llama))


def test_merged_cat_is_the_weighted_sum_of_deltas(tl):
    names = tl.domains
    weights = [0.5, 0.3, 0.2]
    merge_adapters(tl.peft_model, names, "cat", "m_cat", weights=weights)
    for layer in tl.mixer.layers[:4]:
        expected = sum(w * _delta(layer, n) for w, n in zip(weights, names, strict=True))
        torch.testing.assert_close(_delta(layer, "m_cat"), expected, rtol=1e-5, atol=1e-6)


def test_merged_linear_is_peft_sqrt_weighted_factors(tl):
    # PEFT's "linear" merges the A's and the B's separately, each weighted by sqrt(w * scaling):
    # B' A' = (sum_i sqrt(w_i s_i) B_i)(sum_j sqrt(w_j s_j) A_j), cross terms included.
    names = tl.domains
    merge_adapters(tl.peft_model, names, "linear", "m_lin")  # default weights: 1/K each
    k = len(names)
    for layer in tl.mixer.layers[:4]:
        c = [(1 / k * layer.scaling[n]) ** 0.5 for n in names]
        a = sum(ci * layer.lora_A[n].weight for ci, n in zip(c, names, strict=True))
        b = sum(ci * layer.lora_B[n].weight for ci, n in zip(c, names, strict=True))
        expected = b @ a
        if layer.fan_in_fan_out:
            expected = expected.T
        torch.testing.assert_close(_delta(layer, "m_lin"), expected * layer.scaling["m_lin"], rtol=1e-5, atol=1e-6)


def test_sequential_and_multitask(tiny_llama, tmp_path):
    model, tok, _ = load_backbone(str(tiny_llama))
    before = fingerprint(model)
    cfg = replace(tiny_config(), steps=2)
    chunks = {"a": torch.randint(2, 500, (4, 32)).tolist(), "b": torch.randint(2, 500, (4, 32)).tolist()}
    steps = train_sequential(model, chunks, tmp_path / "seq", cfg, progress=False, log=lambda *a: None)
    assert list(steps) == ["a", "b"]
    assert fingerprint(model) == before  # the base never changes
    from safetensors.torch import load_file

    a0 = load_file(str(steps["a"] / "adapter_model.safetensors"))
    a1 = load_file(str(steps["b"] / "adapter_model.safetensors"))
    assert a0.keys() == a1.keys()  # one adapter, continued: same tensors, changed values
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)
    # continuing really starts from the saved weights: with lr 0 nothing moves away from them
    from temporal_lora.adapters import train_adapter

    train_adapter(model, chunks["b"], tmp_path / "cont", replace(cfg, lr=0.0), progress=False, init_from=steps["a"])
    cont = load_file(str(tmp_path / "cont" / "adapter_model.safetensors"))
    assert all(torch.equal(cont[k], a0[k]) for k in a0)
    mtime = steps["a"].joinpath("adapter_model.safetensors").stat().st_mtime_ns
    again = train_sequential(model, chunks, tmp_path / "seq", cfg, progress=False, log=lambda *a: None)
    assert again == steps and steps["a"].joinpath("adapter_model.safetensors").stat().st_mtime_ns == mtime  # resumed
    mt = train_multitask(model, chunks, tmp_path / "mt", cfg, progress=False, log=lambda *a: None)
    import json

    summary = json.loads((mt / "training.json").read_text())
    assert summary["steps"] == cfg.steps * 2 and summary["train_chunks"] == 8
    assert fingerprint(model) == before


def test_prefix_texts_decode_the_same_prompt(tiny_llama):
    _, tok, _ = load_backbone(str(tiny_llama))
    ids = tok("def main(argv):\n    return 0\n", add_special_tokens=False)["input_ids"]
    chunks = torch.tensor([ids[:8]])
    (short, full) = prefix_texts(tok, chunks, [4, 8])
    assert full[0].startswith(short[0]) and tok(full[0], add_special_tokens=False)["input_ids"] == ids[:8]
