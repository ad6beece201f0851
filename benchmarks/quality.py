"""Perplexity of every strategy on the same held-out chunks, and forgetting along the domain
sequence (sequential LoRA against Temporal LoRA's frozen adapters behind a refreshed router)."""

from __future__ import annotations

import time

import torch

from benchmarks.common import BenchBudget
from temporal_lora.config import TrainConfig
from temporal_lora.mixing import one_hot
from temporal_lora.routing.features import prefix_features
from temporal_lora.scoring import adapter_nll, perplexity, routed_nll
from temporal_lora.train import train_router


def measure_quality(tl, ppl_sets: dict[str, torch.Tensor], b: BenchBudget) -> dict:
    """Perplexity per strategy and domain, all on the same test chunks."""
    k = len(tl.domains)
    singles = ["multitask", f"seq{k - 1}"] + [f"merged_{m}" for m in b.merge_methods]
    ppl: dict[str, dict[str, float]] = {}
    oracle_nll, probs_all = {}, {}
    for label, d in enumerate(tl.domains):
        chunks = ppl_sets[d]
        n = len(chunks)
        probs = tl.route_probs(chunks.tolist())
        probs_all[d] = probs.tolist()
        nll = {"base": tl.token_nll(chunks, torch.zeros(n, k)),
               "oracle": tl.token_nll(chunks, one_hot([label] * n, k))}
        oracle_nll[d] = nll["oracle"].tolist()
        hard = tl.mix_weights(probs, "hard")
        nll["hard"] = routed_nll(tl, chunks, label, nll["oracle"],
                                 [int(r.argmax()) if r.any() else None for r in hard])
        nll["soft"] = tl.token_nll(chunks, tl.mix_weights(probs, "soft"))
        nll["top2"] = tl.token_nll(chunks, tl.mix_weights(probs, "topk", top_k=2))
        for s, v in nll.items():
            ppl.setdefault(s, {})[d] = perplexity(v, chunks)
    for name in singles:
        key = "sequential" if name.startswith("seq") else name
        ppl[key] = {d: perplexity(adapter_nll(tl, name, c), c) for d, c in ppl_sets.items()}
    return {"ppl": ppl, "oracle_nll": oracle_nll, "route_probs": probs_all}


def measure_forgetting(tl, ppl_sets, router_data, cfg: TrainConfig, quality: dict) -> dict:
    """R[t][d]: perplexity on domain d after step t of the domain sequence (d <= t).

    Sequential: the one adapter after training on domains 0..t. Temporal LoRA: adapters 0..t
    (frozen once trained) behind a router refreshed on those t+1 domains at step t; the router
    refresh is timed (what adding a domain costs besides training its adapter)."""
    domains = tl.domains
    k = len(domains)
    seq = [[None] * k for _ in range(k)]
    temporal = [[None] * k for _ in range(k)]
    refresh, step_acc = [], []
    test_feats = {}
    with tl.mixer.weights(None):
        for d in domains:
            test_feats[d] = prefix_features(tl.model, tl.feature_spec, ppl_sets[d], [tl.router_config.max_tokens])[0]
    for t in range(k):
        for d in domains[: t + 1]:
            seq[t][domains.index(d)] = perplexity(adapter_nll(tl, f"seq{t}", ppl_sets[d]), ppl_sets[d])
        known = {d: router_data[d] for d in domains[: t + 1]}
        t0 = time.perf_counter()
        if t == 0:
            router = None  # one domain: nothing to route between
        else:
            with tl.mixer.weights(None):
                router, _ = train_router(tl.model, tl.tokenizer, tl.feature_spec, known, cfg)
        refresh.append(round(time.perf_counter() - t0, 2))
        correct = total = 0
        for label, d in enumerate(domains[: t + 1]):
            chunks = ppl_sets[d]
            oracle = torch.tensor(quality["oracle_nll"][d])
            if router is None:
                picked = [0] * len(chunks)
            else:
                with torch.no_grad():
                    picked = router(test_feats[d]).argmax(-1).tolist()
            correct += sum(p == label for p in picked)
            total += len(picked)
            temporal[t][label] = perplexity(routed_nll(tl, chunks, label, oracle, picked), chunks)
        step_acc.append(round(correct / total, 4))
    return {"order": domains, "sequential": seq, "temporal": temporal, "router_refresh_seconds": refresh,
            "temporal_router_accuracy": step_acc,
            "bwt": {"sequential": backward_transfer(seq), "temporal": backward_transfer(temporal)}}


def backward_transfer(r: list[list[float | None]]) -> float:
    """Mean relative perplexity change on earlier domains between learning them and the end,
    signed like the usual accuracy BWT: negative = forgetting (final perplexity is higher)."""
    k = len(r)
    if k < 2:
        return 0.0
    vals = [(r[d][d] - r[k - 1][d]) / r[d][d] for d in range(k - 1)]
    return round(sum(vals) / len(vals), 4)
