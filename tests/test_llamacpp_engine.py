"""The llama.cpp engine (optional `cpu-engine` extra): GGUF export is exact, routing and sampling stay
ours, and a request's output in a mixed batch equals its output alone.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_llamacpp_engine.py  (add -m real for SmolLM2)
"""

import threading

import numpy as np
import pytest
import torch
from support.serving import load_served

from temporal_lora.llamacpp import missing_reason

REASON = missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"llama.cpp unavailable: {REASON}")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    """The tiny bundle with every LoRA B made large and random: q/k row order and scaling mistakes
    would show in the logits (freshly trained B's are almost zero)."""
    from temporal_lora.mixing import AdapterMixer

    tl = load_served(tiny_bundle)
    gen = torch.Generator().manual_seed(0)
    for layer in tl.mixer.layers:
        for name in tl.mixer.adapter_names:
            w = layer.lora_B[name].weight
            w.data = torch.randn(w.shape, generator=gen) * 0.5
    names = tl.mixer.adapter_names
    tl.mixer.remove()
    tl.mixer = AdapterMixer(tl.peft_model, names)
    return tl


@pytest.fixture(scope="module")
def runtime(tl):
    from temporal_lora.server.llamacpp_engine import LlamaCppRuntime

    rt = LlamaCppRuntime(tl, n_seq=2, n_ctx_seq=128, n_threads=1)
    yield rt
    rt.close()


def test_logits_match_torch_base_one_adapter_and_a_mix(tl, runtime):
    ids = tl.tokenizer("def parse(text):\n    return text.split()", add_special_tokens=False)["input_ids"]
    n = len(tl.mixer.adapter_names)
    mixes = [[0.0] * n, [1.0] + [0.0] * (n - 1), [0.0, 1.0] + [0.0] * (n - 2), [0.7, 0.3] + [0.0] * (n - 2)]
    base = None
    for mix in mixes:
        w = torch.tensor([mix])
        with torch.no_grad(), tl.mixer.weights(w):
            ref = tl.model(torch.tensor([ids])).logits[0].float().numpy()
        runtime.ctx.set_adapters(runtime.adapter_set(w[0]))
        runtime.ctx.clear()
        got = runtime.ctx.decode([(0, ids, 0)], all_logits=True)[0]
        assert np.abs(log_softmax(got) - log_softmax(ref)).max() < 1e-3, mix
        assert (got.argmax(-1) == ref.argmax(-1)).all(), mix
        if base is None:
            base = got
        else:  # the adapters really change the output (else this test would prove nothing)
            assert np.abs(got - base).max() > 0.1, mix


def test_no_adapter_request_after_an_adapter_request_is_the_base(tl, runtime):
    ids = tl.tokenizer("class Parser:", add_special_tokens=False)["input_ids"]
    ctx = runtime.ctx
    ctx.set_adapters(())
    ctx.clear()
    base = ctx.decode([(0, ids, 0)])[0]
    ctx.set_adapters(runtime.adapter_set(torch.tensor([1.0] + [0.0] * (len(runtime.adapter_files) - 1))))
    ctx.clear(1)
    other = ctx.decode([(1, ids, 0)])[0]
    ctx.set_adapters(())
    ctx.clear(0)
    again = ctx.decode([(0, ids, 0)])[0]
    assert np.abs(other - base).max() > 0.1
    np.testing.assert_array_equal(again, base)


def _run(engine, jobs):
    """Submit (ids, route, sampling) jobs at once; returns each one's (text, finish reason)."""
    from temporal_lora.server.engine import Job

    out = [{"text": "", "done": threading.Event()} for _ in jobs]

    def emitter(slot):
        def emit(kind, *args):
            if kind == "text":
                slot["text"] += args[0]
            elif kind in ("done", "error"):
                slot["reason"] = args[0] if kind == "done" else f"error: {args[0]}"
                slot["done"].set()
        return emit

    for (ids, route, sampling), slot in zip(jobs, out, strict=True):
        engine.submit(Job(ids, route, sampling, emitter(slot)))
    for slot in out:
        assert slot["done"].wait(120)
    return [(slot["text"], slot["reason"]) for slot in out]


def test_mixed_batch_of_adapter_sets_equals_each_alone(tl):
    from temporal_lora.server.engine import Route, Sampling
    from temporal_lora.server.llamacpp_engine import LlamaCppEngine

    texts = ["def main():\n", "The court held that", "It was a dark and", "import os\n", "Section 2. The"]
    routes = [Route(domain=tl.domains[0]), Route(domain=tl.domains[1]), Route(domain="base"),
              Route(mode="soft"), Route(mode="hard")]
    samplings = [Sampling(max_new_tokens=12, temperature=0), Sampling(max_new_tokens=7, temperature=0.9, seed=3),
                 Sampling(max_new_tokens=10, temperature=1.1, top_p=0.8, seed=1, repetition_penalty=1.2),
                 Sampling(max_new_tokens=9, temperature=0.7, seed=4, presence_penalty=0.5),
                 Sampling(max_new_tokens=5, temperature=0)]
    jobs = []
    for text, route, sampling in zip(texts, routes, samplings, strict=True):
        ids = tl.tokenizer(text, add_special_tokens=False)["input_ids"]
        if route.domain is None:
            route.route_ids = ids
        jobs.append((ids, route, sampling))
    engine = LlamaCppEngine(tl, max_batch=4, n_threads=1, n_ctx_seq=128, batch_wait_s=0.2)
    try:
        alone = [_run(engine, [job])[0] for job in jobs]
        engine.decode_calls = 0
        together = _run(engine, jobs)  # 5 jobs, 4 sequences: one waits and joins a running batch
        assert engine.decode_calls > 0
        again = _run(engine, jobs[::-1])[::-1]
    finally:
        engine.close()
    assert all(reason in ("stop", "length") for _, reason in alone), alone
    assert together == alone
    assert again == alone


def test_too_long_request_fails_alone(tl):
    from temporal_lora.server.engine import Route, Sampling
    from temporal_lora.server.llamacpp_engine import LlamaCppEngine

    ids = tl.tokenizer("def f(x):", add_special_tokens=False)["input_ids"]
    engine = LlamaCppEngine(tl, max_batch=2, n_threads=1, n_ctx_seq=32, batch_wait_s=0.2)
    try:
        ok, too_long = _run(engine, [(ids, Route(domain="base"), Sampling(max_new_tokens=4, temperature=0)),
                                     (ids, Route(domain="base"), Sampling(max_new_tokens=40, temperature=0))])
    finally:
        engine.close()
    assert ok[1] == "length"
    assert too_long[1].startswith("error:") and "32" in too_long[1]


def test_peft_folder_export_round_trips(tiny_bundle, tl):
    import json

    from gguf import GGUFReader
    from safetensors.torch import load_file

    from temporal_lora import gguf_files

    domain = tl.domains[0]
    folder = tiny_bundle / "adapters" / domain
    settings = json.loads((folder / "adapter_config.json").read_text())
    modules = gguf_files.folder_lora(folder)
    path = gguf_files.lora_gguf(modules, tl.model.config)
    assert gguf_files.lora_gguf(gguf_files.folder_lora(folder), tl.model.config) == path  # cached by content
    loaded = load_served(tiny_bundle)  # the same adapter as the library loads it: the same file
    assert gguf_files.lora_gguf(gguf_files.model_lora(loaded.peft_model, domain), loaded.model.config) == path
    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * len(modules)
    raw = load_file(str(folder / "adapter_model.safetensors"))
    scaling = float(settings["lora_alpha"]) / settings["r"]
    cfg = tl.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    checked = 0
    for key, b in raw.items():
        if ".lora_B." not in key:
            continue
        module = key.split(".lora_B.")[0].replace("base_model.model.", "")
        layer, kind = module.split(".")[2], kinds[module.rsplit(".", 1)[-1]]
        a = raw[key.replace(".lora_B.", ".lora_A.")].numpy()
        np.testing.assert_array_equal(tensors[f"blk.{layer}.{kind}.weight.lora_a"], a)
        expect_b = (b.float() * scaling).numpy()
        if kind in ("attn_q", "attn_k"):  # the same rows in llama.cpp's rotary order
            heads = expect_b.shape[0] // head_dim
            expect_b = expect_b.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(expect_b.shape)
        np.testing.assert_array_equal(tensors[f"blk.{layer}.{kind}.weight.lora_b"], expect_b)
        checked += 1
    assert checked == len(modules)


def test_unsupported_bases_get_one_clear_error(tiny_gpt2):
    from transformers import AutoConfig

    from temporal_lora import gguf_files
    from temporal_lora.errors import InputError

    cfg = AutoConfig.from_pretrained(tiny_gpt2)
    assert "Llama" in gguf_files.supports(cfg)
    with pytest.raises(InputError, match="Llama"):
        gguf_files.lora_gguf({}, cfg)


@pytest.mark.real
def test_real_model_greedy_first_32_tokens_match_the_torch_engine(real_bundle):
    from temporal_lora.server.engine import Engine, Route, Sampling
    from temporal_lora.server.llamacpp_engine import LlamaCppEngine

    tl, _ = real_bundle
    prompts = ["Explain what a hash table is.", "def fibonacci(n):", "The patient presented with",
               "Write a short poem about the sea."]
    jobs = []
    for p in prompts:
        ids = tl.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        jobs.append((list(ids), Route(route_ids=list(ids)), Sampling(max_new_tokens=32, temperature=0)))
    torch_engine = Engine(tl)
    fast = LlamaCppEngine(tl, max_batch=4, n_threads=1, n_ctx_seq=256)
    try:
        expected = _run(torch_engine, jobs)
        got = _run(fast, jobs)
    finally:
        torch_engine.close()
        fast.close()
    assert got == expected
