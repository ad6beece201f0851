"""The scaling benchmark's measurements: the router refit at each N, perplexity per strategy,
isolation (one domain's adapter retrained, the others compared bit for bit) and a real
`add_domain` on a bundle whose old corpora are deleted."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.common import ScalingBudget
from temporal_lora.backbone import load_backbone
from temporal_lora.cache import atomic_write_text
from temporal_lora.config import EVAL_LENGTHS, TrainConfig, router_prefix_lengths
from temporal_lora.corpora import source_of
from temporal_lora.evolve import add_domain
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.gating import GatingNetwork, fit_router, load_gating, save_gating
from temporal_lora.scoring import adapter_nll, perplexity, routed_nll

# ---------------------------------------------------------------- routing


def _router_path(work: Path, n: int) -> Path:
    return work / "routers" / f"N{n}.safetensors"


def load_router(work: Path, n: int, in_dim: int, cfg: TrainConfig) -> GatingNetwork:
    """The router that `measure_routing` fit on the first `n` domains."""
    return load_gating(_router_path(work, n), in_dim, n, cfg.router.hidden_dim)


def measure_routing(features, data, domains, b: ScalingBudget, cfg: TrainConfig, work: Path) -> dict:
    """For each N: the router refit on the first N domains' stored features (timed), its accuracy
    on their test chunks by prompt length, the confusion matrix, and its picks for the ppl chunks."""
    lengths = [n for n in EVAL_LENGTHS if n <= cfg.block_size]
    result = {}
    for n in b.ns:
        names = domains[:n]
        t0 = time.perf_counter()
        net, summary = fit_router({d: {"train": features[d]["train"], "calib": features[d]["calib"]} for d in names},
                                  cfg.router, seed=cfg.seed)
        fit_seconds = time.perf_counter() - t0
        path = _router_path(work, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_gating(net, path)
        by_len = {}
        confusion = torch.zeros(n, n, dtype=torch.long)
        picks = {}
        with torch.no_grad():
            for i, length in enumerate(lengths):
                correct = total = 0
                for label, d in enumerate(names):
                    test = features[d]["test"][i, : b.router_test_chunks].float()
                    pred = net(test).argmax(-1)
                    correct += int((pred == label).sum())
                    total += len(pred)
                    if i == len(lengths) - 1:
                        confusion[label] += torch.bincount(pred, minlength=n)
                        picks[d] = net(features[d]["test"][i, : b.ppl_chunks].float()).argmax(-1).tolist()
                by_len[str(length)] = round(correct / total, 4)
        off = [(int(confusion[i, j]), names[i], names[j]) for i in range(n) for j in range(n) if i != j and confusion[i, j]]
        result[str(n)] = {"accuracy": by_len[str(lengths[-1])], "accuracy_by_length": by_len,
                          "confusion": confusion.tolist(), "most_confused": [
                              {"true": a, "routed": c, "chunks": k} for k, a, c in sorted(off, reverse=True)[:5]],
                          "fit_seconds": round(fit_seconds, 3), "train_accuracy": summary["train_accuracy"],
                          "picks": picks}
    return result


# ---------------------------------------------------------------- quality


def measure_quality(tl, data, domains, b: ScalingBudget, routing: dict, multitask: dict) -> dict:
    """Perplexity per domain for base, oracle, and at each N routed / multitask / rank-scaled."""
    k = len(tl.domains)
    ppl: dict[str, dict[str, float]] = {"base": {}, "oracle": {}}
    for label, d in enumerate(domains):
        chunks = data[d].test[: b.ppl_chunks]
        oracle = adapter_nll(tl, d, chunks)
        ppl["oracle"][d] = perplexity(oracle, chunks)
        ppl["base"][d] = perplexity(tl.token_nll(chunks, torch.zeros(len(chunks), k)), chunks)
        for n in b.ns:
            if label >= n:
                continue
            picks = routing[str(n)]["picks"][d]  # indices into domains[:n], the same as tl.domains[:n]
            ppl.setdefault(f"routed-{n}", {})[d] = perplexity(routed_nll(tl, chunks, label, oracle, picks), chunks)
            for name in (f"multitask-{n}", f"multitask-rank-{n}"):
                if name in multitask:
                    ppl.setdefault(name, {})[d] = perplexity(adapter_nll(tl, name, chunks), chunks)
    return {"ppl": ppl}


# ---------------------------------------------------------------- isolation


def measure_isolation(tl, tl_updated, data, domains, k: str, b: ScalingBudget, quality: dict) -> dict:
    """Temporal LoRA before and after domain k's adapter is retrained, on every other domain's
    test chunks, through the full model (router + mixer, hard and soft): logits compared bit for
    bit. Multitask before and after (retrain / fine-tune) on the other domains of its N."""
    others = [d for d in domains if d != k]
    temporal: dict[str, dict] = {}
    for mode in ("hard", "soft"):
        identical = total = to_updated = 0
        changes = {}
        for d in others:
            chunks = data[d].test[: b.isolation_chunks]
            probs = tl.route_probs(chunks.tolist())
            to_updated += int((probs.argmax(-1) == tl.domains.index(k)).sum())
            probs2 = tl_updated.route_probs(chunks.tolist())
            same, nll_before, nll_after = _compare_logits(tl, tl.mix_weights(probs, mode), tl_updated,
                                                          tl_updated.mix_weights(probs2, mode), chunks)
            identical += same
            total += len(chunks)
            changes[d] = round(math.exp((nll_after - nll_before) / chunks[:, 1:].numel()) - 1, 6)
        # Under hard routing only chunks the router sends to k's adapter may change.
        temporal[mode] = {"bit_identical_chunks": identical, "chunks": total, "routed_to_updated_domain": to_updated,
                          "max_abs_ppl_change": max(abs(v) for v in changes.values()), "ppl_change": changes}
    n = b.isolation_n
    mt_others = [d for d in domains[:n] if d != k]
    multitask = {}
    for variant in ("multitask-retrain", "multitask-finetune"):
        changes = {}
        for d in mt_others:
            chunks = data[d].test[: b.ppl_chunks]
            changes[d] = round(perplexity(adapter_nll(tl, variant, chunks), chunks)
                               / quality["ppl"][f"multitask-{n}"][d] - 1, 6)
        chunks = data[k].test[: b.ppl_chunks]
        multitask[variant] = {"max_abs_ppl_change": max(abs(v) for v in changes.values()), "ppl_change": changes,
                              "updated_domain_ppl_before": quality["ppl"][f"multitask-{n}"][k],
                              "updated_domain_ppl_after": perplexity(adapter_nll(tl, variant, chunks), chunks)}
    chunks = data[k].test[: b.ppl_chunks]
    return {"updated_domain": k, "multitask_n": n, "temporal": temporal, "multitask": multitask,
            "temporal_updated_domain_ppl_before": quality["ppl"]["oracle"][k],
            "temporal_updated_domain_ppl_after": perplexity(adapter_nll(tl_updated, k, chunks), chunks),
            "new_data": "windows of the domain's training documents that its first adapter never saw"}


@torch.no_grad()
def _compare_logits(tl, w, tl2, w2, chunks: torch.Tensor) -> tuple[int, float, float]:
    """Chunks whose full logits are bit-identical under the two models, and each model's summed NLL
    (one chunk at a time: a chunk's logits are 128 x vocabulary floats)."""
    same, nll = 0, [0.0, 0.0]
    for i in range(len(chunks)):
        x = chunks[i : i + 1]
        logits = []
        for j, (model, weights) in enumerate(((tl, w), (tl2, w2))):
            with model.mixer.weights(weights[i : i + 1]):
                lg = model.model(input_ids=x, use_cache=False).logits[0]
            nll[j] += float(torch.nn.functional.cross_entropy(lg[:-1].float(), x[0, 1:], reduction="sum"))
            logits.append(lg)
        same += int(torch.equal(*logits))
    return same, nll[0], nll[1]


# ---------------------------------------------------------------- add a domain without old data


def add_domain_without_old_data(corpora, names: list[str], adapters, features, work: Path, cfg: TrainConfig,
                                spec: str, base, progress, log) -> dict:
    """A bundle of names[:-1] trained from user corpora (JSONL files), the files deleted, then
    `add_domain` for names[-1]: only the new domain's text exists when it runs."""
    root = work / "add-demo"
    shutil.rmtree(root, ignore_errors=True)
    corpus_dir = root / "corpora"
    corpus_dir.mkdir(parents=True)
    old, new = names[:-1], names[-1]
    splits = {}
    for d in [*old, new]:
        path = corpus_dir / f"{d}.jsonl"
        atomic_write_text(path, "".join(json.dumps(asdict(doc), ensure_ascii=False) + "\n" for doc in corpora[d]))
        if d in old:
            splits[d] = {"source": source_of(d, path), "documents": len(corpora[d])}
    replay = {d: {"train": features[d]["train"], "calib": features[d]["calib"]} for d in old}
    router, summary = fit_router(replay, cfg.router, seed=cfg.seed)
    model, tokenizer, base_id = load_backbone(base)
    lengths = router_prefix_lengths(cfg.router, cfg.block_size)  # those of the stored features
    info = {"train_config": cfg.to_dict(), "router_training": summary | {"prefix_lengths": lengths},
            "history": [{"version": 1, "change": "train", "domains": old}], "data": splits}
    tl = TemporalLoRA.assemble(model, tokenizer, base_id=base_id, adapter_dirs={d: adapters[d] for d in old},
                               router=router, router_config=cfg.router, feature_spec=spec, info=info)
    tl.replay = replay
    bundle = root / "bundle"
    tl.save_pretrained(bundle)
    del tl, model
    for d in old:
        (corpus_dir / f"{d}.jsonl").unlink()  # the old domains' raw text is gone
    log(f"[scaling] add_domain '{new}' with the old corpora ({', '.join(old)}) deleted")
    t0 = time.perf_counter()
    report = add_domain(bundle, new, data=corpus_dir / f"{new}.jsonl", config=replace(cfg), base=base,
                        progress=progress, log=log)
    seconds = time.perf_counter() - t0
    return {"old_domains": old, "new_domain": new,
            "old_corpora_present": [d for d in old if (corpus_dir / f"{d}.jsonl").exists()],
            "version": report["version"], "domains": report["domains"],
            "replay_rebuilt": report["replay_rebuilt"], "old_domains_unchanged": report["old_domains_unchanged"],
            "old_domain_accuracy_before": report["old_domain_accuracy_before"],
            "old_domain_accuracy_after": report["old_domain_accuracy_after"],
            "timing": report["timing"], "seconds_total": round(seconds, 1)}
