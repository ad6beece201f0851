"""Domains over time: add or remove a domain in an existing bundle without touching the others.

`add_domain` trains one new adapter on the frozen base and refits the router on the replay
memory (replay.py: the stored router features of every old domain) plus the new domain's
features, so no old raw text is read and no old adapter is retrained. Old adapter files are
copied byte for byte into the new version (checked against the manifest's checksums).
`remove_domain` drops one adapter and refits the router on the remaining replay memory. Both
write a new bundle version (versions.py) atomically.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from temporal_lora.adapters import train_adapter
from temporal_lora.backbone import fingerprint, load_backbone
from temporal_lora.bundle import read_manifest, safe_path
from temporal_lora.config import BUDGETS, AdapterConfig, RouterConfig, TrainConfig, budget_config
from temporal_lora.errors import BaseModelMismatchError, BundleError, CorpusError, InputError
from temporal_lora.replay import (
    REPLAY_FILE,
    domain_features,
    fit_router,
    load_replay,
    replay_accuracy,
    save_replay,
)
from temporal_lora.router import GatingNetwork
from temporal_lora.versions import commit, copy_files

ROUTER_FILE = "router/router.safetensors"
SPLITS_FILE = "data/splits.json"


def bundle_train_config(manifest: dict) -> TrainConfig:
    """The TrainConfig a bundle was trained with (defaults for whatever an old manifest lacks)."""
    raw = dict(manifest.get("train_config") or {})
    adapter = AdapterConfig(**raw.pop("adapter", {}))
    router = RouterConfig(**(manifest["router"].get("config") or raw.pop("router", {})))
    raw.pop("router", None)
    known = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in raw.items() if k in known}, adapter=adapter, router=router)


def load_router(bundle: Path, manifest: dict) -> GatingNetwork:
    rinfo = manifest["router"]
    cfg = RouterConfig(**rinfo["config"])
    net = GatingNetwork(rinfo["in_dim"], len(manifest["domains"]), cfg.hidden_dim)
    net.load_state_dict(load_file(str(safe_path(bundle, rinfo["path"]))))
    return net.eval()


def add_domain(bundle: str | Path, name: str, *, data: str | Path | None = None, corpus: str | None = None,
               budget: str | None = None, seed: int | None = None, config: TrainConfig | None = None,
               base: str | None = None, progress: bool = True, log=print) -> dict:
    """Train an adapter for `name` (from `data` or the built-in `corpus`), refit the router, save a new version.

    Returns a report: timing (adapter vs router), the router's accuracy on the old domains'
    stored validation features before and after, and the new version number.
    """
    from temporal_lora.train import chunks_tensor, load_domain_data, validate_domains

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    old_domains = list(manifest["domains"])
    if name in old_domains:
        raise InputError(f"domain {name!r} is already in bundle {bundle}; remove it first to retrain it")
    validate_domains([*old_domains, name])
    if data is not None and corpus is not None:
        raise InputError("give either --data or --corpus, not both")
    if corpus is not None and corpus != name:
        raise InputError(f"--corpus {corpus!r} must equal the domain name (built-in corpora are named domains); "
                         f"for another name export the corpus and pass --data")
    paths = {name: Path(data)} if data is not None else {}
    base_cfg = bundle_train_config(manifest)
    budget = budget or (base_cfg.budget if base_cfg.budget in BUDGETS else "quick")
    cfg = config or budget_config(budget, base_cfg.seed if seed is None else seed)
    cfg.block_size = base_cfg.block_size  # the replay memory was computed on blocks of this size
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    dd = load_domain_data(name, paths, cfg.seed)  # fail fast on a bad corpus, before the model loads
    timing["load_corpus"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = _backbone(manifest, base)
    timing["load_base_model"] = time.perf_counter() - t0
    spec = manifest["router"]["features"]
    router_cfg = RouterConfig(**manifest["router"]["config"])

    t0 = time.perf_counter()
    replay, lengths, rebuilt = _replay(bundle, manifest, model, tokenizer, base_cfg)
    timing["load_replay"] = time.perf_counter() - t0
    if rebuilt:
        log(f"bundle has no router replay memory: recomputed it from the old domains' corpora ({timing['load_replay']:.0f} s)")

    t0 = time.perf_counter()
    n_train = cfg.steps * cfg.batch_size
    train_chunks = chunks_tensor(dd.splits.train, tokenizer, cfg, n_train, cfg.seed, f"{name} train split")
    router_chunks = chunks_tensor(dd.splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, name)
    calib_chunks = chunks_tensor(dd.splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{name} val split")
    timing["chunk"] = time.perf_counter() - t0

    # The new adapter is trained in the system temp dir, so a killed run leaves nothing beside the bundle.
    work = Path(tempfile.mkdtemp(prefix=f"tlora-add-{name}-"))
    try:
        log(f"training adapter '{name}' on {len(train_chunks)} chunks of {cfg.block_size} tokens ({cfg.steps} steps)")
        t0 = time.perf_counter()
        base_fp = manifest["base_model"]["fingerprint"]
        summary = train_adapter(model, train_chunks.tolist(), work / name, cfg, desc=name, progress=progress)
        timing["adapter"] = time.perf_counter() - t0
        if fingerprint(model) != base_fp:
            raise RuntimeError("base model weights changed during adapter training")

        log("refitting the router on the replay memory plus the new domain")
        t0 = time.perf_counter()
        replay[name] = domain_features(model, spec, router_chunks, calib_chunks, lengths)
        timing["router_features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        domains = [*old_domains, name]
        router, router_summary = fit_router({d: replay[d] for d in domains}, router_cfg, seed=cfg.seed)
        timing["router_fit"] = time.perf_counter() - t0

        labels = {d: i for i, d in enumerate(old_domains)}
        old_replay = {d: replay[d] for d in old_domains}
        before = replay_accuracy(load_router(bundle, manifest), old_replay, labels)
        after = replay_accuracy(router, old_replay, labels)

        splits = _splits(bundle, manifest)
        splits[name] = dd.split_summary()
        training = summary | {"source": dd.source, "seed": cfg.seed}

        def fill(tmp: Path, old: dict) -> dict:
            new = json.loads(json.dumps(old))
            _copy_adapters(bundle, old, old_domains, tmp)
            folder = tmp / "adapters" / name
            folder.mkdir(parents=True)
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(work / name / file, folder / file)
            new["domains"] = domains
            new["adapters"][name] = {"path": f"adapters/{name}",
                                     "config": json.loads((folder / "adapter_config.json").read_text()),
                                     "training": training}
            _write_router(tmp, new, router, router_summary, replay, domains, lengths)
            _write_splits(tmp, new, splits)
            return new

        t0 = time.perf_counter()
        result = commit(bundle, fill, {"change": "add-domain", "domain": name, "source": dd.source})
        timing["save"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _check_unchanged(manifest, result, old_domains)
    return {
        "version": result["version"],
        "domain": name,
        "domains": domains,
        "old_domains_unchanged": True,
        "replay_rebuilt": rebuilt,
        "old_domain_accuracy_before": before,
        "old_domain_accuracy_after": after,
        "router_training": router_summary,
        "adapter_training": summary,
        "timing": {k: round(v, 2) for k, v in timing.items()}
        | {"router_total": round(timing["router_features"] + timing["router_fit"], 2)},
    }


def remove_domain(bundle: str | Path, name: str, *, base: str | None = None, log=print) -> dict:
    """Drop `name`'s adapter and refit the router on the remaining domains' replay memory."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    old_domains = list(manifest["domains"])
    if name not in old_domains:
        raise InputError(f"bundle {bundle} has no domain {name!r}; it has {', '.join(old_domains)}")
    if len(old_domains) == 1:
        raise InputError(f"{name!r} is the bundle's only domain; a bundle needs at least one")
    domains = [d for d in old_domains if d != name]
    t0 = time.perf_counter()
    replay, lengths, rebuilt = _replay(bundle, manifest, None, None, bundle_train_config(manifest), base=base)
    if rebuilt:
        log("bundle has no router replay memory: recomputed it from the domains' corpora")
    router_cfg = RouterConfig(**manifest["router"]["config"])
    seed = bundle_train_config(manifest).seed
    router, router_summary = fit_router({d: replay[d] for d in domains}, router_cfg, seed=seed)
    router_seconds = time.perf_counter() - t0
    labels = {d: i for i, d in enumerate(domains)}
    after = replay_accuracy(router, {d: replay[d] for d in domains}, labels)
    splits = {d: v for d, v in _splits(bundle, manifest).items() if d != name}

    def fill(tmp: Path, old: dict) -> dict:
        new = json.loads(json.dumps(old))
        _copy_adapters(bundle, old, domains, tmp)
        new["domains"] = domains
        del new["adapters"][name]
        if name in new.get("subdomains", {}):  # its subdomains go with it (their files are not copied)
            del new["subdomains"][name]
        _write_router(tmp, new, router, router_summary, replay, domains, lengths)
        _write_splits(tmp, new, splits)
        return new

    result = commit(bundle, fill, {"change": "remove-domain", "domain": name})
    _check_unchanged(manifest, result, domains)
    return {"version": result["version"], "removed": name, "domains": domains, "replay_rebuilt": rebuilt,
            "accuracy_after": after, "router_training": router_summary, "router_seconds": round(router_seconds, 2)}


# ------------------------------------------------------------------------------------------ helpers
def _backbone(manifest: dict, base: str | None):
    model, tokenizer, _ = load_backbone(base or manifest["base_model"]["id"])
    if fingerprint(model) != manifest["base_model"]["fingerprint"]:
        raise BaseModelMismatchError(f"the bundle was trained on base model {manifest['base_model']['id']!r}; "
                                     "the model given has different weights")
    return model, tokenizer


def _replay(bundle: Path, manifest: dict, model, tokenizer, cfg: TrainConfig, base: str | None = None):
    """The stored replay memory, or (old bundles) the same features recomputed from each domain's corpus."""
    rel = manifest["router"].get("replay")
    if rel:
        features, lengths = load_replay(safe_path(bundle, rel))
        missing = [d for d in manifest["domains"] if d not in features]
        if missing:
            raise BundleError(f"router replay memory lacks domain(s) {', '.join(missing)}")
        return features, lengths, False
    from temporal_lora.train import chunks_tensor, load_domain_data

    if model is None:
        model, tokenizer = _backbone(manifest, base)
    lengths = manifest["router"].get("training", {}).get("prefix_lengths") or [
        n for n in cfg.router.train_lengths if n <= cfg.block_size]
    splits = _splits(bundle, manifest)
    features = {}
    for domain in manifest["domains"]:
        info = splits.get(domain)
        if not info:
            raise BundleError(f"cannot rebuild the replay memory: no recorded split for {domain!r}")
        source = info["source"]
        paths = {domain: Path(source.removeprefix("path:"))} if source.startswith("path:") else {}
        dd = load_domain_data(domain, paths, cfg.seed)
        if sorted(d.id for d in dd.splits.val) != sorted(info["val_ids"]):
            raise CorpusError(f"cannot rebuild the replay memory: the corpus of {domain!r} changed since training")
        train = chunks_tensor(dd.splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, domain)
        calib = chunks_tensor(dd.splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{domain} val split")
        features[domain] = domain_features(model, manifest["router"]["features"], train, calib, lengths)
    return features, lengths, True


def _splits(bundle: Path, manifest: dict) -> dict:
    if not manifest.get("data"):
        return {}
    try:
        return json.loads(safe_path(bundle, manifest["data"]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle data splits unreadable: {exc}") from exc


def _copy_adapters(bundle: Path, old: dict, domains: list[str], tmp: Path) -> None:
    """Copy the kept adapters' files (and PEFT's adapters/README.md) byte for byte, with their
    subdomains' adapters and sub-routers (hierarchy.py), if any."""
    keep = [f"{old['adapters'][d]['path']}/" for d in domains]
    keep += [f"{top}/{d}/" for d in domains for top in ("subadapters", "subrouters")]
    rels = [rel for rel in old["files"] if any(rel.startswith(k) for k in keep) or rel == "adapters/README.md"]
    copy_files(bundle, rels, tmp)


def _write_router(tmp: Path, manifest: dict, router: GatingNetwork, summary: dict, replay: dict,
                  domains: list[str], lengths: list[int]) -> None:
    (tmp / "router").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in router.state_dict().items()}, str(tmp / ROUTER_FILE))
    save_replay(tmp / REPLAY_FILE, {d: replay[d] for d in domains}, lengths)
    manifest["router"].update(path=ROUTER_FILE, replay=REPLAY_FILE, in_dim=int(router.feature_mean.shape[0]),
                              temperature=float(router.temperature),
                              training=summary | {"prefix_lengths": list(lengths), "refit_from": "replay memory"})


def _write_splits(tmp: Path, manifest: dict, splits: dict) -> None:
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / SPLITS_FILE).write_text(json.dumps(splits, indent=1))
    manifest["data"] = SPLITS_FILE


def _check_unchanged(old: dict, new: dict, domains: list[str]) -> None:
    """Every kept adapter file must have exactly its old checksum (the promise of add/remove-domain)."""
    for d in domains:
        prefix = f"{old['adapters'][d]['path']}/"
        for rel, digest in old["files"].items():
            if rel.startswith(prefix) and new["files"].get(rel) != digest:
                raise BundleError(f"adapter file {rel} changed while editing the bundle")


def old_domain_test_accuracy(net: GatingNetwork, feats: dict[str, torch.Tensor], domains: list[str]) -> dict:
    """Accuracy per domain of `net` on test features ([n, dim] per domain), labels by position in `domains`."""
    out = {}
    with torch.no_grad():
        for d, x in feats.items():
            out[d] = float((net(x.float()).argmax(-1) == domains.index(d)).float().mean())
    return out
