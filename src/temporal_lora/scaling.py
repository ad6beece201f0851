"""`tlora bench scaling`: where one adapter per domain wins over one multitask adapter, and where not.

On N = 2, 4, 8, 16 real domains (corpora/subdomains.py) with the same per-domain token budget:

- quality: test perplexity of routed Temporal LoRA (hard routing, router refit on the first N
  domains) vs one multitask LoRA on the union of the N domains (N x the per-domain steps, same
  rank), a multitask LoRA with rank scaled by N, and the oracle (each domain's own adapter);
- the cost of adding the N-th domain: Temporal LoRA trains one adapter and refits the router on
  stored features; multitask retrains on all N domains. Both are measured wall times of runs
  made here (the multitask run for N *is* the retraining that adding the N-th domain needs);
- the data that adding a domain needs, and a real `add_domain` on a bundle whose old corpora
  were deleted;
- isolation: one domain's adapter retrained on new text of that domain; the other domains'
  outputs under the Temporal LoRA model are compared bit for bit, and multitask's perplexity
  change on the other domains is measured after retraining it with that domain's new data;
- router accuracy (and confusion) as N grows.

The 16 per-domain adapters are independent, so they serve every N. Each trained adapter, feature
set and finished phase is stored under `<out>/scaling-work/` at once; an interrupted run resumes there.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from temporal_lora.cache import atomic_write_text
from temporal_lora.config import TrainConfig, budget_config
from temporal_lora.corpora import Document
from temporal_lora.errors import InputError

LENGTHS = (8, 16, 32, 64, 128)


@dataclass
class ScalingBudget:
    """How much the scaling benchmark trains and measures (per domain unless said otherwise)."""

    name: str = "quick"
    # 8 steps x 4 x 128 tokens per domain: the whole quick run trains 57 x that (16 adapters,
    # multitask at N=2..16 = 30 x, rank-scaled multitask at N=4, isolation retrains, the
    # add-domain run), about 230k tokens, which fits an hour of a 2-core CPU shared with other
    # jobs. The core's quick budget is 40 steps: these adapters are lighter.
    steps: int = 8
    ns: tuple[int, ...] = (2, 4, 8, 16)
    rank_scaled_ns: tuple[int, ...] = (4,)  # each costs N x steps; N=16 would double the run
    ppl_chunks: int = 12  # test chunks of 128 tokens per domain (paired across strategies)
    router_chunks: int = 64  # router training chunks per domain
    calib_chunks: int = 16
    router_test_chunks: int = 48
    isolation_n: int = 4  # multitask retrained on this many domains for the isolation figure
    isolation_chunks: int = 6  # test chunks per other domain checked bit for bit (all 15 others)
    add_domain_demo: bool = True  # a real add_domain on a bundle whose old corpora are deleted


def scaling_budget(name: str) -> ScalingBudget:
    if name == "quick":
        return ScalingBudget()
    if name == "full":
        return ScalingBudget(name="full", steps=40, rank_scaled_ns=(2, 4, 8, 16), ppl_chunks=32,
                             router_chunks=150, calib_chunks=30, router_test_chunks=100, isolation_n=8)
    raise InputError(f"unknown scaling budget {name!r}; choose quick or full")


def _gmean(xs: list[float]) -> float:
    return round(math.exp(sum(math.log(x) for x in xs) / len(xs)), 4)


# ---------------------------------------------------------------- the run


def run_scaling(out: str | Path, *, base: str | None = None, budget: str | ScalingBudget = "quick",
                corpora: dict[str, list[Document]] | None = None, config: TrainConfig | None = None,
                progress: bool = True, log=print) -> dict:
    """Run every scaling measurement; write scaling.json, scaling.md and plots to `out`.

    `corpora` ({domain: documents}, in the order domains are added) replaces the 16 built-in
    subdomains; `config` replaces the quick training recipe (tests use both with a tiny model).
    """
    from temporal_lora.backbone import decoder_layers, load_backbone
    from temporal_lora.bench import _Phases, hardware
    from temporal_lora.router import resolve_feature_spec

    b = scaling_budget(budget) if isinstance(budget, str) else budget
    if any(n < 2 for n in b.ns) or list(b.ns) != sorted(set(b.ns)):
        raise InputError(f"domain counts must be increasing and at least 2, got {b.ns}")
    if b.isolation_n not in b.ns or any(n not in b.ns for n in b.rank_scaled_ns):
        raise InputError("isolation_n and rank_scaled_ns must be among the domain counts")
    cfg = config or replace(budget_config("quick"), steps=b.steps, router_chunks=b.router_chunks,
                            calib_chunks=b.calib_chunks)
    if corpora is None:
        from temporal_lora.corpora.subdomains import SCALING_DOMAINS, load_subdomains

        corpora = load_subdomains(SCALING_DOMAINS[: max(b.ns)])
    domains = list(corpora)[: max(b.ns)]
    if len(domains) < max(b.ns):
        raise InputError(f"{max(b.ns)} domains needed, {len(domains)} given")
    out = Path(out)
    work = out / "scaling-work"  # not bench's work/: both can live in one --out
    _check_work(work, {"budget": asdict(b), "train_config": cfg.to_dict(), "domains": domains, "base": base})
    phases = _Phases(work, log)
    t_start = time.perf_counter()

    model, tokenizer, base_id = load_backbone(base)
    spec = resolve_feature_spec(cfg.router.features, len(decoder_layers(model)))
    data = _prepare(corpora, domains, tokenizer, cfg, b)

    adapters = _train_adapters(model, data, work, cfg, progress, log)
    multitask = _train_multitask(model, data, domains, work, cfg, b, progress, log)
    iso_domain = domains[0]
    isolation_dirs = _train_isolation(model, data, domains, iso_domain, work, cfg, b, adapters, multitask,
                                      progress, log)
    features = _features(model, spec, data, domains, work, cfg, log)
    routing = phases.run("router", lambda: measure_routing(features, data, domains, b, cfg, work))
    del model

    def tl_for(adapter_dirs: dict[str, Path]):
        from temporal_lora.model import TemporalLoRA

        m, tok, _ = load_backbone(base)
        return TemporalLoRA.assemble(m, tok, base_id=base_id, adapter_dirs=adapter_dirs,
                                     router=_load_router(work, max(b.ns), cfg), router_config=cfg.router,
                                     feature_spec=spec)

    tl = None

    def main_tl():
        nonlocal tl
        if tl is None:
            tl = tl_for(adapters)
            for name, folder in {**multitask, **isolation_dirs}.items():
                tl.peft_model.load_adapter(str(folder), adapter_name=name)
        return tl

    quality = phases.run("quality", lambda: measure_quality(main_tl(), data, domains, b, routing, multitask))
    isolation = phases.run("isolation", lambda: measure_isolation(
        main_tl(), tl_for({**adapters, iso_domain: isolation_dirs["temporal-update"]}), data, domains,
        iso_domain, b, quality))
    demo = None
    if b.add_domain_demo:
        demo = phases.run("add_domain_demo", lambda: add_domain_without_old_data(
            corpora, domains[:3], adapters, features, work, cfg, spec, base, progress, log))

    report = assemble_report(domains, corpora, data, b, cfg, adapters, multitask, isolation_dirs, features,
                             routing, quality, isolation, demo, work)
    report["hardware"] = hardware()
    report["phase_seconds"] = phases.data.get("_seconds", {})
    report["seconds_total_this_run"] = round(time.perf_counter() - t_start, 1)
    write_scaling(report, out)
    return report


def _check_work(work: Path, recipe: dict) -> None:
    """Cached adapters are only reused by a run with the same recipe (steps, ranks, domains...)."""
    path = work / "recipe.json"
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as read back
    if path.is_file():
        if json.loads(path.read_text()) != recipe:
            raise InputError(f"{work} holds a scaling run with another budget, config or domain list; "
                             "choose another --out or delete it")
    else:
        atomic_write_text(path, json.dumps(recipe, indent=1))


# ---------------------------------------------------------------- data


@dataclass
class _Domain:
    name: str
    dd: object  # train.DomainData
    train: list[list[int]]  # what the domain's adapter (and multitask) trains on
    update: list[list[int]]  # new text of the domain, never seen by the first adapter
    router: torch.Tensor
    calib: torch.Tensor
    test: torch.Tensor  # test-document chunks: the first ppl_chunks score perplexity


def _prepare(corpora, domains, tokenizer, cfg: TrainConfig, b: ScalingBudget) -> dict[str, _Domain]:
    from temporal_lora.data import dedupe, split_documents
    from temporal_lora.train import DomainData, chunks_tensor

    n = cfg.steps * cfg.batch_size
    out = {}
    for name in domains:
        docs = corpora[name]
        unique = dedupe(docs)
        dd = DomainData(name, f"subdomain:{name}", split_documents(unique, seed=cfg.seed), len(docs) - len(unique))
        # chunk_documents visits documents in the same seeded order whatever the count, so the
        # first n of 2n windows are exactly the adapter's training windows and the rest are new.
        both = chunks_tensor(dd.splits.train, tokenizer, cfg, 2 * n, cfg.seed, f"{name} train split").tolist()
        if len(both) < 2 * n:
            raise InputError(f"{name}: {len(both)} training windows, {2 * n} needed (training + update)")
        out[name] = _Domain(
            name, dd, both[:n], both[n:],
            chunks_tensor(dd.splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, name),
            chunks_tensor(dd.splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{name} val split"),
            chunks_tensor(dd.splits.test, tokenizer, cfg, max(b.router_test_chunks, b.ppl_chunks), cfg.seed,
                          f"{name} test split"),
        )
    return out


# ---------------------------------------------------------------- training (each result cached)


def _train_adapters(model, data, work: Path, cfg, progress, log) -> dict[str, Path]:
    from temporal_lora.adapters import train_adapter
    from temporal_lora.baselines import _done, _finish

    dirs = {}
    for i, (name, d) in enumerate(data.items()):
        folder = work / "adapters" / name
        if not _done(folder):
            log(f"[scaling] adapter {i + 1}/{len(data)}: '{name}' ({cfg.steps} steps)")
            _finish(folder, train_adapter(model, d.train, folder, cfg, desc=name, progress=progress))
        dirs[name] = folder
    return dirs


def rank_scaled(cfg: TrainConfig, n: int) -> TrainConfig:
    """The multitask recipe with rank (and alpha, so alpha/r stays) multiplied by N."""
    return replace(cfg, adapter=replace(cfg.adapter, r=cfg.adapter.r * n, alpha=cfg.adapter.alpha * n))


def _train_multitask(model, data, domains, work: Path, cfg, b: ScalingBudget, progress, log) -> dict[str, Path]:
    from temporal_lora.baselines import train_multitask

    dirs = {}
    for n in b.ns:
        chunks = {d: data[d].train for d in domains[:n]}
        dirs[f"multitask-{n}"] = train_multitask(model, chunks, work / f"multitask-{n}", cfg,
                                                 progress=progress, log=log)
        if n in b.rank_scaled_ns:
            dirs[f"multitask-rank-{n}"] = train_multitask(model, chunks, work / f"multitask-rank-{n}",
                                                          rank_scaled(cfg, n), progress=progress, log=log)
    return dirs


def _train_isolation(model, data, domains, k: str, work: Path, cfg, b: ScalingBudget, adapters, multitask,
                     progress, log) -> dict[str, Path]:
    """Domain k gets new text. Temporal LoRA retrains only k's adapter on it; multitask either
    retrains on the union with k's data replaced (same recipe, N x steps) or fine-tunes the
    existing multitask adapter on k's new text (steps, no old data needed, but it drifts)."""
    from temporal_lora.adapters import train_adapter
    from temporal_lora.baselines import _done, _finish, train_multitask

    n = b.isolation_n
    root = work / "isolation"
    dirs = {"temporal-update": root / f"temporal-{k}"}
    if not _done(dirs["temporal-update"]):
        log(f"[scaling] isolation: retraining '{k}' on new text of the domain")
        _finish(dirs["temporal-update"], train_adapter(model, data[k].update, dirs["temporal-update"], cfg,
                                                       desc=f"{k} (update)", progress=progress))
    chunks = {d: (data[d].update if d == k else data[d].train) for d in domains[:n]}
    dirs["multitask-retrain"] = train_multitask(model, chunks, root / f"multitask-{n}-retrain", cfg,
                                                progress=progress, log=log)
    dirs["multitask-finetune"] = root / f"multitask-{n}-finetune"
    if not _done(dirs["multitask-finetune"]):
        log(f"[scaling] isolation: fine-tuning multitask-{n} on new text of '{k}'")
        _finish(dirs["multitask-finetune"], train_adapter(
            model, data[k].update, dirs["multitask-finetune"], cfg, desc="multitask (update)",
            progress=progress, init_from=multitask[f"multitask-{n}"]))
    return dirs


def _features(model, spec, data, domains, work: Path, cfg, log) -> dict[str, dict]:
    """Router features of every domain (train/calib, the replay memory) and of its test chunks,
    computed once on the frozen base and stored with the seconds they took."""
    from temporal_lora.replay import domain_features
    from temporal_lora.router import prefix_features

    lengths = [n for n in LENGTHS if n <= cfg.block_size]
    out = {}
    for name in domains:
        path = work / "features" / f"{name}.safetensors"
        if not path.is_file():
            log(f"[scaling] router features of '{name}'")
            t0 = time.perf_counter()
            f = domain_features(model, spec, data[name].router, data[name].calib, lengths)
            seconds = time.perf_counter() - t0
            test = prefix_features(model, spec, data[name].test, lengths)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            save_file({"train": f["train"].contiguous(), "calib": f["calib"].contiguous(), "test": test.contiguous()},
                      str(tmp), metadata={"seconds": f"{seconds:.3f}"})
            tmp.replace(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            seconds = float(fh.metadata()["seconds"])
        t = load_file(str(path))
        out[name] = {"train": t["train"], "calib": t["calib"], "test": t["test"], "seconds": seconds}
    return out


# ---------------------------------------------------------------- routing


def _router_path(work: Path, n: int) -> Path:
    return work / "routers" / f"N{n}.safetensors"


def _load_router(work: Path, n: int, cfg: TrainConfig):
    from temporal_lora.router import GatingNetwork

    state = load_file(str(_router_path(work, n)))
    net = GatingNetwork(state["feature_mean"].shape[0], n, cfg.router.hidden_dim)
    net.load_state_dict(state)
    return net.eval()


def measure_routing(features, data, domains, b: ScalingBudget, cfg: TrainConfig, work: Path) -> dict:
    """For each N: the router refit on the first N domains' stored features (timed), its accuracy
    on their test chunks by prompt length, the confusion matrix, and its picks for the ppl chunks."""
    from temporal_lora.replay import fit_router

    lengths = [n for n in LENGTHS if n <= cfg.block_size]
    result = {}
    for n in b.ns:
        names = domains[:n]
        t0 = time.perf_counter()
        net, summary = fit_router({d: {"train": features[d]["train"], "calib": features[d]["calib"]} for d in names},
                                  cfg.router, seed=cfg.seed)
        fit_seconds = time.perf_counter() - t0
        path = _router_path(work, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
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
    from temporal_lora.bench import _ppl, _routed_nll, _single_nll

    k = len(tl.domains)
    ppl: dict[str, dict[str, float]] = {"base": {}, "oracle": {}}
    for label, d in enumerate(domains):
        chunks = data[d].test[: b.ppl_chunks]
        oracle = _single_nll(tl, d, chunks)
        ppl["oracle"][d] = _ppl(oracle, chunks)
        ppl["base"][d] = _ppl(tl.token_nll(chunks, torch.zeros(len(chunks), k)), chunks)
        for n in b.ns:
            if label >= n:
                continue
            picks = routing[str(n)]["picks"][d]  # indices into domains[:n], the same as tl.domains[:n]
            ppl.setdefault(f"routed-{n}", {})[d] = _ppl(_routed_nll(tl, chunks, label, oracle, picks), chunks)
            for name in (f"multitask-{n}", f"multitask-rank-{n}"):
                if name in multitask:
                    ppl.setdefault(name, {})[d] = _ppl(_single_nll(tl, name, chunks), chunks)
    return {"ppl": ppl}


# ---------------------------------------------------------------- isolation


def measure_isolation(tl, tl_updated, data, domains, k: str, b: ScalingBudget, quality: dict) -> dict:
    """Temporal LoRA before and after domain k's adapter is retrained, on every other domain's
    test chunks, through the full model (router + mixer, hard and soft): logits compared bit for
    bit. Multitask before and after (retrain / fine-tune) on the other domains of its N."""
    from temporal_lora.bench import _ppl, _single_nll

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
            changes[d] = round(_ppl(_single_nll(tl, variant, chunks), chunks) / quality["ppl"][f"multitask-{n}"][d] - 1, 6)
        chunks = data[k].test[: b.ppl_chunks]
        multitask[variant] = {"max_abs_ppl_change": max(abs(v) for v in changes.values()), "ppl_change": changes,
                              "updated_domain_ppl_before": quality["ppl"][f"multitask-{n}"][k],
                              "updated_domain_ppl_after": _ppl(_single_nll(tl, variant, chunks), chunks)}
    chunks = data[k].test[: b.ppl_chunks]
    return {"updated_domain": k, "multitask_n": n, "temporal": temporal, "multitask": multitask,
            "temporal_updated_domain_ppl_before": quality["ppl"]["oracle"][k],
            "temporal_updated_domain_ppl_after": _ppl(_single_nll(tl_updated, k, chunks), chunks),
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
    from temporal_lora.backbone import load_backbone
    from temporal_lora.evolve import add_domain
    from temporal_lora.model import TemporalLoRA
    from temporal_lora.replay import fit_router

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
            splits[d] = {"source": f"path:{path.resolve()}", "documents": len(corpora[d])}
    replay = {d: {"train": features[d]["train"], "calib": features[d]["calib"]} for d in old}
    router, summary = fit_router(replay, cfg.router, seed=cfg.seed)
    model, tokenizer, base_id = load_backbone(base)
    lengths = [n for n in LENGTHS if n <= cfg.block_size]
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


# ---------------------------------------------------------------- report


def _training(folder: Path) -> dict:
    return json.loads((folder / "training.json").read_text())


def assemble_report(domains, corpora, data, b: ScalingBudget, cfg: TrainConfig, adapters, multitask, isolation_dirs,
                    features, routing, quality, isolation, demo, work: Path) -> dict:
    ppl = quality["ppl"]
    train = {d: _training(adapters[d]) for d in domains}
    step_seconds = statistics.median(t["seconds"] / t["steps"] for t in train.values())
    rows = []
    for n in b.ns:
        names = domains[:n]
        r = {"n": n,
             "ppl_routed": _gmean([ppl[f"routed-{n}"][d] for d in names]),
             "ppl_multitask": _gmean([ppl[f"multitask-{n}"][d] for d in names]),
             "ppl_oracle": _gmean([ppl["oracle"][d] for d in names]),
             "ppl_base": _gmean([ppl["base"][d] for d in names])}
        r["ppl_ratio_routed_vs_multitask"] = round(r["ppl_routed"] / r["ppl_multitask"], 4)
        r["multitask_vs_oracle"] = round(r["ppl_multitask"] / r["ppl_oracle"], 4)
        r["routed_vs_oracle"] = round(r["ppl_routed"] / r["ppl_oracle"], 4)
        r["domains_where_multitask_better"] = [d for d in names if ppl[f"multitask-{n}"][d] < ppl[f"routed-{n}"][d]]
        if f"multitask-rank-{n}" in ppl:
            r["ppl_multitask_rank_scaled"] = _gmean([ppl[f"multitask-rank-{n}"][d] for d in names])
            r["ppl_ratio_routed_vs_multitask_rank_scaled"] = round(r["ppl_routed"] / r["ppl_multitask_rank_scaled"], 4)
        # Adding the n-th domain (from n-1 to n): Temporal LoRA trains that one adapter, computes
        # its router features and refits the router on n domains' stored features; multitask
        # retrains on all n domains, which is exactly the multitask-n run measured here.
        new = names[-1]
        temporal = train[new]["seconds"] + features[new]["seconds"] + routing[str(n)]["fit_seconds"]
        mt = _training(multitask[f"multitask-{n}"])
        r["add_seconds_temporal"] = round(temporal, 1)
        r["add_seconds_multitask"] = round(mt["seconds"], 1)
        r["add_cost_ratio_multitask_vs_temporal"] = round(mt["seconds"] / temporal, 2)
        r["add_steps"] = {"temporal": train[new]["steps"], "multitask": mt["steps"]}
        r["router_accuracy"] = routing[str(n)]["accuracy"]
        # What adding needs besides the new domain's text: old domains' training text (multitask)
        # vs the router's stored features of the old domains (Temporal LoRA, float16).
        old = names[:-1]
        r["old_data_needed_bytes"] = {
            "multitask_raw_text": sum(len(doc.text.encode()) for d in old for doc in data[d].dd.splits.train),
            "temporal_replay_features": sum(2 * (features[d]["train"].numel() + features[d]["calib"].numel())
                                            for d in old)}
        rows.append(r)
    temporal_iso = isolation["temporal"]
    mt_iso = isolation["multitask"]
    return {
        "n_domains": list(b.ns),
        "ppl_ratio_routed_vs_multitask": [r["ppl_ratio_routed_vs_multitask"] for r in rows],
        "ppl_ratio_routed_vs_multitask_rank_scaled": {str(r["n"]): r["ppl_ratio_routed_vs_multitask_rank_scaled"]
                                                      for r in rows if "ppl_ratio_routed_vs_multitask_rank_scaled" in r},
        "add_cost_ratio_multitask_vs_temporal": [r["add_cost_ratio_multitask_vs_temporal"] for r in rows],
        "router_accuracy": [r["router_accuracy"] for r in rows],
        "isolation_max_ppl_change_other_domains": {
            "temporal": temporal_iso["hard"]["max_abs_ppl_change"],
            "temporal_soft": temporal_iso["soft"]["max_abs_ppl_change"],
            "multitask": mt_iso["multitask-retrain"]["max_abs_ppl_change"],
            "multitask_finetune": mt_iso["multitask-finetune"]["max_abs_ppl_change"]},
        "rows": rows,
        "domains": domains,
        "domain_documents": {d: {"documents": len(corpora[d]), "train": len(data[d].dd.splits.train),
                                 "val": len(data[d].dd.splits.val), "test": len(data[d].dd.splits.test)}
                             for d in domains},
        "domain_sources": _descriptions(domains),
        "ppl": ppl,
        "routing": {n: {k: v for k, v in r.items() if k != "picks"} for n, r in routing.items()},
        "isolation": isolation,
        "add_domain_without_old_data": demo,
        "training": {"per_domain": train, "median_seconds_per_step_adapter": round(step_seconds, 3),
                     "multitask": {k: _training(v) for k, v in multitask.items()},
                     "isolation": {k: _training(v) for k, v in isolation_dirs.items()}},
        "budget": asdict(b),
        "train_config": cfg.to_dict(),
        "notes": [
            "ppl: geometric mean over the first N domains of per-domain test perplexity "
            f"({b.ppl_chunks} chunks of {cfg.block_size} tokens from held-out documents, paired across strategies)",
            "routed: hard routing by the router refit on the first N domains; a misrouted chunk is scored "
            "with the adapter it was routed to",
            f"multitask: one LoRA (r={cfg.adapter.r}) on the union of the N domains' training chunks, N x "
            f"{cfg.steps} steps; rank-scaled: r={cfg.adapter.r} x N, alpha scaled alike, at N in {list(b.rank_scaled_ns)}",
            "add cost: measured wall seconds of adding the N-th domain (N-1 -> N): Temporal LoRA = that "
            "domain's adapter training + its router features + router refit on N domains' stored features; "
            "multitask = the multitask-N training run. CPU shared with other jobs: both sides saw the same machine",
            "isolation temporal: max |ppl change| over every other domain's test chunks through the full "
            "model (router + adapters), hard routing; soft routing gives every adapter a small weight",
        ],
    }


def _descriptions(domains) -> dict[str, str]:
    from temporal_lora.corpora.subdomains import DESCRIPTIONS

    return {d: DESCRIPTIONS.get(d, "user corpus") for d in domains}


def markdown(r: dict) -> str:
    lines = ["# Scaling: Temporal LoRA vs one multitask LoRA as domains are added", "",
             f"Domains (in the order they are added): {', '.join(r['domains'])}.", "",
             f"Per-domain budget: {r['train_config']['steps']} steps x {r['train_config']['batch_size']} x "
             f"{r['train_config']['block_size']} tokens, LoRA r={r['train_config']['adapter']['r']}. {r['hardware']}.", "",
             "## Quality (geometric-mean test perplexity over the first N domains; lower is better)", "",
             "| N | base | oracle | routed (ours) | multitask | multitask rank x N | routed / multitask | "
             "multitask / oracle | router accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        rank = row.get("ppl_multitask_rank_scaled")
        lines.append(f"| {row['n']} | {row['ppl_base']:.2f} | {row['ppl_oracle']:.2f} | {row['ppl_routed']:.2f} | "
                     f"{row['ppl_multitask']:.2f} | {'' if rank is None else f'{rank:.2f}'} | "
                     f"{row['ppl_ratio_routed_vs_multitask']:.3f} | {row['multitask_vs_oracle']:.3f} | "
                     f"{row['router_accuracy']:.3f} |")
    lines += ["", "Domains where multitask beats routed at N: " + "; ".join(
        f"N={row['n']}: {', '.join(row['domains_where_multitask_better']) or 'none'}" for row in r["rows"]), "",
        "## Cost of adding the N-th domain (measured wall seconds)", "",
        "| N | Temporal LoRA (adapter + features + router refit) | multitask (retrain on N) | ratio | steps (ours / multitask) "
        "| old data needed: multitask raw text | ours: stored router features |",
        "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        need = row["old_data_needed_bytes"]
        lines.append(f"| {row['n']} | {row['add_seconds_temporal']:.0f} | {row['add_seconds_multitask']:.0f} | "
                     f"{row['add_cost_ratio_multitask_vs_temporal']:.1f}x | {row['add_steps']['temporal']} / "
                     f"{row['add_steps']['multitask']} | {need['multitask_raw_text'] / 1e6:.1f} MB | "
                     f"{need['temporal_replay_features'] / 1e6:.2f} MB |")
    demo = r.get("add_domain_without_old_data")
    if demo:
        lines += ["", f"`add_domain` with the old corpora deleted: bundle of {', '.join(demo['old_domains'])} "
                  f"(their JSONL corpora deleted: present afterwards = {demo['old_corpora_present'] or 'none'}), "
                  f"added '{demo['new_domain']}' -> version {demo['version']} in {demo['seconds_total']:.0f} s; "
                  f"replay rebuilt from text: {demo['replay_rebuilt']}; old adapters unchanged: "
                  f"{demo['old_domains_unchanged']}; router accuracy on old domains' stored features before "
                  f"{demo['old_domain_accuracy_before']} after {demo['old_domain_accuracy_after']}."]
    iso = r["isolation"]
    t = iso["temporal"]
    lines += ["", f"## Isolation: '{iso['updated_domain']}' retrained on new text ({iso['new_data']})", "",
              "| model | other domains checked | bit-identical chunks | max abs ppl change on other domains | "
              "updated domain ppl before -> after |", "|---|---|---|---|---|"]
    for mode in ("hard", "soft"):
        lines.append(f"| Temporal LoRA, {mode} routing | {len(t[mode]['ppl_change'])} | {t[mode]['bit_identical_chunks']}"
                     f"/{t[mode]['chunks']} | {t[mode]['max_abs_ppl_change']:.2e} | "
                     f"{iso['temporal_updated_domain_ppl_before']:.2f} -> {iso['temporal_updated_domain_ppl_after']:.2f} |")
    for variant, v in iso["multitask"].items():
        lines.append(f"| {variant} (N={iso['multitask_n']}) | {len(v['ppl_change'])} | - | "
                     f"{v['max_abs_ppl_change']:.2e} | {v['updated_domain_ppl_before']:.2f} -> "
                     f"{v['updated_domain_ppl_after']:.2f} |")
    lines += ["", "## Router confusion as N grows (most confused pairs at 128 tokens)", ""]
    for n, info in r["routing"].items():
        pairs = ", ".join(f"{p['true']} -> {p['routed']} ({p['chunks']})" for p in info["most_confused"]) or "none"
        lines.append(f"- N={n}: accuracy {info['accuracy']:.3f} (by prompt length {info['accuracy_by_length']}); {pairs}")
    lines += ["", "## Domains (document-level splits)", "", "| # | domain | source | documents | train / val / test |",
              "|---|---|---|---|---|"]
    for i, d in enumerate(r["domains"]):
        c = r["domain_documents"][d]
        lines.append(f"| {i + 1} | {d} | {r['domain_sources'][d]} | {c['documents']} | "
                     f"{c['train']} / {c['val']} / {c['test']} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def write_scaling(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scaling.json", json.dumps(report, indent=2))
    atomic_write_text(out / "scaling.md", markdown(report))
    plot_scaling(report, out)


def plot_scaling(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    ns = [row["n"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for key, label in (("ppl_routed", "routed (ours)"), ("ppl_multitask", "multitask"), ("ppl_oracle", "oracle")):
        ax.plot(ns, [row[key] / row["ppl_oracle"] for row in rows], marker="o", label=label)
    rank = [(row["n"], row["ppl_multitask_rank_scaled"] / row["ppl_oracle"]) for row in rows
            if "ppl_multitask_rank_scaled" in row]
    if rank:
        ax.plot(*zip(*rank, strict=True), marker="s", ls="", label="multitask, rank x N")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("domains N")
    ax.set_ylabel("perplexity / oracle (geo. mean)")
    ax.set_title("Quality as domains grow")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    width = 0.38
    x = range(len(ns))
    ax.bar([i - width / 2 for i in x], [row["add_seconds_temporal"] for row in rows], width, label="Temporal LoRA")
    ax.bar([i + width / 2 for i in x], [row["add_seconds_multitask"] for row in rows], width, label="multitask retrain")
    for i, row in enumerate(rows):
        ax.annotate(f"{row['add_cost_ratio_multitask_vs_temporal']:.1f}x", (i + width / 2, row["add_seconds_multitask"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [str(n) for n in ns])
    ax.set_xlabel("adding domain N")
    ax.set_ylabel("wall seconds")
    ax.set_title("Cost of adding one domain")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(ns, r["router_accuracy"], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(min(0.5, min(r["router_accuracy"]) - 0.05), 1.0)
    ax.set_xlabel("domains N")
    ax.set_ylabel("router accuracy (128-token prompts)")
    ax.set_title("Routing as domains grow")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)

    iso = r["isolation"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    series = {"Temporal LoRA (hard)": iso["temporal"]["hard"]["ppl_change"],
              **{f"{k} (N={iso['multitask_n']})": v["ppl_change"] for k, v in iso["multitask"].items()}}
    names = list(iso["multitask"]["multitask-retrain"]["ppl_change"])
    width = 0.8 / len(series)
    for i, (label, changes) in enumerate(series.items()):
        ax.bar([j + (i - len(series) / 2 + 0.5) * width for j in range(len(names))],
               [100 * changes.get(d, 0.0) for d in names], width, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("ppl change on other domains (%)")
    ax.set_title(f"Updating '{iso['updated_domain']}': effect on the other domains")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "isolation.png", dpi=110)
    plt.close(fig)
