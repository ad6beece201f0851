"""End to end on the real embedded SmolLM2-135M-Instruct with a very small budget (marked `real`)."""

import pytest
import torch

from temporal_lora.evaluate import held_out_chunks
from temporal_lora.model import TemporalLoRA

pytestmark = pytest.mark.real


def test_real_model_routes_held_out_documents(real_bundle):
    tl, _ = real_bundle
    assert tl.feature_spec == "hidden:8,12"  # the default routing layers of SmolLM2's 30
    sets = held_out_chunks(tl, 8, block_size=64, seed=5)
    ids, truth = [], []
    for d, chunks in sets.items():
        ids += chunks.tolist()
        truth += [d] * len(chunks)
    routes = tl.decisions(tl.route_probs(ids))
    accuracy = sum(r.domain == t for r, t in zip(routes, truth, strict=True)) / len(truth)
    assert accuracy >= 0.9, accuracy


def test_real_model_generate_save_load_same_outputs(real_bundle, tmp_path):
    tl, out = real_bundle
    prompts = ["Patients with type 2 diabetes were randomised to", "def __init__(self, path):\n"]
    first = tl.generate(prompts, max_new_tokens=8)
    assert [g.route.domain for g in first] == ["medical", "code"]
    assert all(g.text.strip() for g in first)
    loaded = TemporalLoRA.from_pretrained(out)
    second = loaded.generate(prompts, max_new_tokens=8)
    assert [g.to_dict() for g in first] == [g.to_dict() for g in second]
    # the adapter really changes the model: its logits differ from the base model's
    x = torch.tensor(tl.encode([prompts[0]]))
    with loaded.mixer.weights(torch.zeros(1, 3)):
        base = loaded.model(input_ids=x).logits
    with loaded.mixer.weights(torch.tensor([[1.0, 0, 0]])):
        medical = loaded.model(input_ids=x).logits
    assert (base - medical).abs().max() > 1e-4


def test_real_model_chat_template_keeps_the_route(real_bundle):
    tl, _ = real_bundle
    question = "What is the first-line treatment for hypertension in adults with diabetes?"
    plain, chat = tl.generate([question], max_new_tokens=12), tl.generate([question], max_new_tokens=12, chat=True)
    assert chat[0].route == plain[0].route  # the router reads the bare message
    assert chat[0].route.domain == "medical"
    assert chat[0].text.strip() and chat[0].text != plain[0].text
