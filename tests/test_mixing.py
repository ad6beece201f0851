"""Per-sample adapter mixing: hard routing equals PEFT's adapters; soft mixing is the weighted delta sum."""

from pathlib import Path

import pytest
import torch
from support.tiny import tiny_config

from temporal_lora.adapters import train_adapter
from temporal_lora.backbone import fingerprint, load_backbone
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.gating import GatingNetwork

NAMES = ["alpha", "beta", "gamma"]


def _assembled(model_dir: Path, tmp_path: Path) -> TemporalLoRA:
    model, tok, base_id = load_backbone(str(model_dir))
    cfg = tiny_config()
    cfg.lr = 2e-2  # large steps so that the three adapters clearly differ
    gen = torch.Generator().manual_seed(1)
    dirs = {}
    for i, name in enumerate(NAMES):
        # Each adapter sees a different slice of the vocabulary, so they learn different deltas.
        chunks = torch.randint(100 * i + 10, 100 * i + 100, (8, 32), generator=gen).tolist()
        train_adapter(model, chunks, tmp_path / name, cfg, progress=False)
        dirs[name] = tmp_path / name
    hidden = model.config.hidden_size
    return TemporalLoRA.assemble(model, tok, base_id=base_id, adapter_dirs=dirs, router=GatingNetwork(hidden, 3, 8),
                                 router_config=cfg.router, feature_spec="hidden:2")


@pytest.fixture(params=["llama", "gpt2"])
def assembled(request, tiny_llama, tiny_gpt2, tmp_path):
    return _assembled(tiny_llama if request.param == "llama" else tiny_gpt2, tmp_path)


def test_training_leaves_base_untouched(tiny_llama, tmp_path):
    model, _, _ = load_backbone(str(tiny_llama))
    before = fingerprint(model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    train_adapter(model, torch.randint(0, 400, (8, 32)).tolist(), tmp_path / "a", tiny_config(), progress=False)
    assert fingerprint(model) == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_hard_mixed_batch_matches_peft_per_adapter(assembled):
    tl = assembled
    x = torch.randint(0, 400, (3, 24), generator=torch.Generator().manual_seed(0))
    with tl.mixer.weights(torch.eye(3)):
        ours = tl.model(input_ids=x).logits
    with tl.mixer.weights(None):
        base = tl.model(input_ids=x).logits
    tl.mixer.remove()  # hand the LoRA computation back to PEFT for the reference
    peft_mixed = tl.peft_model(input_ids=x, adapter_names=NAMES).logits
    for i, name in enumerate(NAMES):
        tl.peft_model.set_adapter(name)
        ref = tl.peft_model(input_ids=x[i : i + 1]).logits[0]
        torch.testing.assert_close(ours[i], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_mixed[i], ref, rtol=1e-5, atol=1e-5)
        assert (ours[i] - base[i]).abs().max() > 1e-3, "adapter had no effect"
    with tl.peft_model.disable_adapter():
        torch.testing.assert_close(base, tl.peft_model(input_ids=x).logits)


def test_soft_mixing_is_weighted_sum_of_lora_deltas(assembled):
    tl = assembled
    layer = tl.mixer.layers[0]
    x = torch.randn(2, 5, layer.in_features)
    w = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    with tl.mixer.weights(w):
        out = layer(x)
    expected = layer.base_layer(x)
    for b in range(2):
        for k, name in enumerate(NAMES):
            delta = layer.lora_B[name](layer.lora_A[name](x[b])) * layer.scaling[name]
            expected[b] = expected[b] + w[b, k] * delta
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_zero_weights_give_the_base_model(assembled):
    tl = assembled
    x = torch.randint(0, 400, (2, 16))
    with tl.mixer.weights(torch.zeros(2, 3)):
        zero = tl.model(input_ids=x).logits
    with tl.peft_model.disable_adapter():
        base = tl.model(input_ids=x).logits
    torch.testing.assert_close(zero, base)


def test_mixed_domain_generation_matches_each_prompt_alone(assembled):
    tl = assembled
    prompts = ["def read(path):\n    with open(", "Thou art a villain, and", "Permission is hereby granted"]
    together = tl.generate(prompts, mode="hard", max_new_tokens=8)
    for i, prompt in enumerate(prompts):
        alone = tl.generate([prompt], mode="hard", max_new_tokens=8)[0]
        assert alone.text == together[i].text
        assert alone.weights == together[i].weights
    # forcing different adapters inside one batch (left padding + per-sample weights)
    forced = [tl.generate_ids(tl.encode(prompts), torch.eye(3), 8)]
    for i, prompt in enumerate(prompts):
        single = tl.generate_ids(tl.encode([prompt]), torch.eye(3)[i : i + 1], 8)
        assert forced[0][i] == single[0]


def test_weights_shape_is_checked(assembled):
    with pytest.raises(ValueError):
        with assembled.mixer.weights(torch.ones(2, 5)):
            pass
