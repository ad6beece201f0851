"""Wall-clock and memory: routed generation against the adapter chosen in advance, a mixed-domain
batch against PEFT's own mixed-batch path, the LoRA layers alone, and what the adapters occupy."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch

from benchmarks.common import BenchBudget, interleaved
from temporal_lora.mixing import one_hot
from temporal_lora.text import pad_batch


def prompts(tl, test_sets, b: BenchBudget) -> tuple[list[str], list[str]]:
    """8 prompts, 2 from each of 4 domains (first `prompt_tokens` tokens of test chunks), and
    their domains."""
    doms = tl.domains[:4]
    texts, labels = [], []
    for d in doms:
        for row in test_sets[d][:2].tolist():
            texts.append(tl.tokenizer.decode(row[: b.prompt_tokens]))
            labels.append(d)
    while len(texts) < 8:  # fewer than 4 domains: repeat
        texts.append(texts[len(texts) % 2])
        labels.append(labels[len(labels) % 2])
    return texts, labels


def measure_speed(tl, test_sets, b: BenchBudget, log=None) -> dict:
    """Median wall-clock of routed generation against the same generation with the adapter
    chosen in advance, and of a mixed-domain batch against PEFT's own mixed-batch path."""
    texts, labels = prompts(tl, test_sets, b)
    n_new = b.new_tokens
    gen_kw = {"max_new_tokens": n_new, "do_sample": False, "pad_token_id": tl.tokenizer.pad_token_id,
              "temperature": None, "top_p": None, "top_k": None}

    def forced(ps, weights):
        ids, mask = pad_batch(tl.encode(ps), tl.tokenizer.pad_token_id, left=True)
        with torch.no_grad(), tl.mixer.weights(weights):
            return tl.model.generate(input_ids=ids, attention_mask=mask, **gen_kw)

    def routed(ps, mode="hard"):
        return tl.generate(ps, mode=mode, max_new_tokens=n_new)  # the public path, routing included

    gen_config = tl.model.generation_config
    previous_min = gen_config.min_new_tokens
    gen_config.min_new_tokens = n_new  # no variant may stop early at EOS: equal work for all
    try:
        return _speed_runs(tl, texts, labels, forced, routed, gen_kw, b, log)
    finally:
        gen_config.min_new_tokens = previous_min


def _speed_runs(tl, texts, labels, forced, routed, gen_kw, b: BenchBudget, log=None) -> dict:
    n_new = b.new_tokens
    one, one_dom = texts[0], labels[0]
    w_one = tl.domain_weights(one_dom, 1)
    t_overhead = interleaved({
        "routed": lambda: routed([one]),
        "chosen_in_advance": lambda: forced([one], w_one),
    }, b.repeats, log)

    adapter_names = list(labels)
    ids, mask = pad_batch(tl.encode(texts), tl.tokenizer.pad_token_id, left=True)

    def peft_mixed():
        with torch.no_grad(), tl.mixer.peft_native():
            return tl.peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapter_names, **gen_kw)

    def peft_groups():
        with torch.no_grad(), tl.mixer.peft_native():
            for d in dict.fromkeys(labels):
                rows = [i for i, x in enumerate(labels) if x == d]
                tl.peft_model.set_adapter(d)
                g_ids, g_mask = pad_batch([tl.encode([texts[i]])[0] for i in rows], tl.tokenizer.pad_token_id,
                                          left=True)
                tl.peft_model.generate(input_ids=g_ids, attention_mask=g_mask, **gen_kw)

    w_mixed = one_hot([tl.domains.index(x) for x in labels], len(tl.domains))
    t_batch = interleaved({
        "ours_routed": lambda: routed(texts),
        "ours_chosen_in_advance": lambda: forced(texts, w_mixed),
        "peft_mixed_batch": peft_mixed,
        "peft_per_domain_groups": peft_groups,
        "base_model": lambda: forced(texts, None),
        "ours_soft": lambda: routed(texts, "soft"),
    }, b.repeats, log)
    route_correct = [r.domain == x for r, x in zip(tl.route(texts), labels, strict=True)]
    tokens = len(texts) * n_new
    return {
        "new_tokens": n_new, "prompt_tokens": b.prompt_tokens, "batch": len(texts), "repeats": b.repeats,
        "batch1_seconds": {k: round(v, 4) for k, v in t_overhead.items()},
        "batch8_seconds": {k: round(v, 4) for k, v in t_batch.items()},
        "batch8_tokens_per_second": {k: round(tokens / v, 1) for k, v in t_batch.items()},
        "routing_overhead_ratio": round(t_overhead["routed"] / t_overhead["chosen_in_advance"], 4),
        "mixed_batch_speedup_vs_peft": round(t_batch["peft_mixed_batch"] / t_batch["ours_routed"], 4),
        "mixed_batch_speedup_vs_groups": round(t_batch["peft_per_domain_groups"] / t_batch["ours_routed"], 4),
        "soft_vs_hard_ratio": round(t_batch["ours_soft"] / t_batch["ours_routed"], 4),
        "lora_overhead_vs_base": round(t_batch["ours_chosen_in_advance"] / t_batch["base_model"], 4),
        "peft_overhead_vs_base": round(t_batch["peft_mixed_batch"] / t_batch["base_model"], 4),
        "prompts_routed_correctly": f"{sum(route_correct)}/{len(route_correct)}",
    }


@torch.no_grad()
def measure_lora_layers(tl, labels: list[str], repeats: int = 20) -> dict:
    """Milliseconds that all LoRA layers of the model add to one decode step of a mixed batch
    (one token per prompt), ours vs PEFT's per-adapter loop, over the bare projections.
    Isolates the LoRA cost from the rest of the model, whose matmuls dominate a step on CPU."""
    layers = tl.mixer.layers
    batch = len(labels)
    w = one_hot([tl.domains.index(x) for x in labels], len(tl.domains))
    xs = [torch.randn(batch, 1, m.in_features) for m in layers]

    def bare():
        for m, x in zip(layers, xs, strict=True):
            m.base_layer(x)

    def ours():
        with tl.mixer.weights(w):
            for m, x in zip(layers, xs, strict=True):
                m(x)

    def peft():
        with tl.mixer.peft_native():
            for m, x in zip(layers, xs, strict=True):
                m(x, adapter_names=labels)

    t = interleaved({"bare": bare, "ours": ours, "peft": peft}, repeats)
    return {"layers": len(layers), "batch": batch,
            "ours_ms": round(1000 * (t["ours"] - t["bare"]), 3), "peft_ms": round(1000 * (t["peft"] - t["bare"]), 3),
            "bare_projections_ms": round(1000 * t["bare"], 3)}


def measure_memory(tl, bundle: Path) -> dict:
    def nbytes(params):
        return sum(p.numel() * p.element_size() for p in params)

    base = nbytes(p for n, p in tl.model.named_parameters() if "lora_" not in n)
    per_adapter = {d: nbytes(p for n, p in tl.model.named_parameters() if "lora_" in n and f".{d}." in n)
                   for d in tl.domains}
    mixer = tl.mixer.stacked_bytes()
    disk = {d: (bundle / "adapters" / d / "adapter_model.safetensors").stat().st_size for d in tl.domains}
    adapters = sum(per_adapter.values()) + mixer
    return {
        "base_weights_mb": round(base / 1e6, 2),
        "adapter_disk_mb": {d: round(v / 1e6, 3) for d, v in disk.items()},
        "adapter_resident_mb": {d: round(v / 1e6, 3) for d, v in per_adapter.items()},
        "mixer_stacked_copy_mb": round(mixer / 1e6, 3),
        "all_adapters_resident_mb": round(adapters / 1e6, 3),
        "all_adapters_vs_base_ratio": round((base + adapters) / base, 4),
        "process_rss_mb": round(psutil.Process().memory_info().rss / 1e6, 1),
    }
