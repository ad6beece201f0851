"""Add or remove a domain in an existing bundle without touching the others.

`add_domain` trains one new adapter on the frozen base and refits the router on the replay
memory (routing/replay.py: the stored router features of every old domain) plus the new
domain's features, so no old raw text is read and no old adapter is retrained. Old adapter files
are copied byte for byte into the new version (checked against the manifest's checksums).
`remove_domain` drops one adapter and refits the router on the remaining replay memory. Both
write a new bundle version (versions.py) atomically.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from temporal_lora.bundle import read_manifest, safe_path
from temporal_lora.config import RouterConfig, RunContext, TrainConfig, router_prefix_lengths
from temporal_lora.corpora import source_paths
from temporal_lora.errors import BundleError, CorpusError, InputError
from temporal_lora.evolve.common import (
    Addition,
    bundle_train_config,
    check_kept,
    load_base_for,
    place_adapter,
    rechoose_abstain,
    refit_lexical,
)
from temporal_lora.evolve.warm_start import check_init, router_affinity, warm_start
from temporal_lora.routing.gating import GatingNetwork, fit_router
from temporal_lora.routing.replay import domain_features, replay_accuracy
from temporal_lora.storage import (
    DEFAULT_EXAMPLE_WEIGHT,
    ROUTER_DIR,
    SPLITS_FILE,
    examples_by_domain,
    grounding_entry,
    grounding_file,
    load_router,
    read_examples,
    read_replay,
    read_splits,
    write_examples,
    write_grounding_index,
    write_router,
    write_splits,
)
from temporal_lora.text import pad_id
from temporal_lora.train import (
    chunks_tensor,
    conversation_tokens,
    ground_training,
    grounding_index,
    load_domain_data,
    router_features,
    router_text,
    validate_domains,
    with_written_questions,
)
from temporal_lora.versions import commit, copy_files


def add_domain(bundle: str | Path, name: str, *, data: str | Path | None = None, corpus: str | None = None,
               budget: str | None = None, seed: int | None = None, config: TrainConfig | None = None,
               base: str | None = None, init: str = "base", run: RunContext | None = None,
               progress: bool | None = None, log: Callable[[str], object] | None = None) -> dict:
    """Train an adapter for `name` (from `data` or the built-in `corpus`), refit the router, save a new version.

    `init` is where the new adapter starts (evolve/warm_start.py): `base` (a fresh LoRA), `nearest`
    (the adapter of the old domain the router finds closest to the new text) or `blend` (the
    router-weighted average of the old adapters); the manifest records it. Returns a report: timing (adapter vs router), the router's accuracy on the old domains'
    stored validation features before and after, and the new version number.

    Settings: `config`, or preset `budget` with `seed` (default: the bundle's own); a budget or seed
    that disagrees with a given config is an InputError (config.settings_for). `run` says how to report (progress bars, log lines); `progress`/`log`, if given, override its fields.
    """
    check_init(init)
    run = RunContext.of(run, progress=progress, log=log)
    # Starting from an existing adapter needs its LoRA shape.
    add = Addition(bundle, budget=budget, seed=seed, config=config, keep_adapter_shape=init != "base")
    bundle, manifest, cfg = add.bundle, add.manifest, add.cfg
    old_domains = list(manifest["domains"])
    if name in old_domains:
        raise InputError(f"domain {name!r} is already in bundle {bundle}; remove it first to retrain it")
    validate_domains([*old_domains, name])
    if data is not None and corpus is not None:
        raise InputError("give either --data or --corpus, not both")
    if corpus is not None and corpus != name:
        raise InputError(f"--corpus {corpus!r} must equal the domain name (built-in corpora are named domains); "
                         f"for another name export the corpus and pass --data")

    with add.timed("load_corpus"):
        dd = load_domain_data(name, {name: Path(data)} if data is not None else {}, cfg.seed)  # fail fast
        # A bundle that grounds answers keeps its passages per prompt, so the new adapter trains on prompts
        # of the shape it will be served with.
        k = (manifest.get("grounding") or {}).get("passages") or cfg.grounding_passages
        grounded_cfg = replace(cfg, grounding_passages=k)
        index = grounding_index(dd, grounded_cfg, data is not None)
    add.load_model(base)
    if index is not None:
        dd, index = with_written_questions(dd, index, grounded_cfg, add.model, add.tokenizer)
        dd = ground_training(dd, index, grounded_cfg, add.tokenizer, conversation_tokens(add.model, add.tokenizer))
    with add.timed("load_replay"):
        replay, lengths, rebuilt = _replay(bundle, manifest, add.model, add.tokenizer, bundle_train_config(manifest))
    if rebuilt:
        run.log(f"bundle has no router replay memory: recomputed it from the old domains' corpora "
                f"({add.timing['load_replay']:.0f} s)")
    train_chunks, train_convs = add.rows(dd, name)
    # Short texts and other sources only when every old domain has them too: a router that saw short
    # texts of one domain alone would send every short input there.
    wide = all("short" in replay[d] for d in old_domains)
    rcfg = add.cfg if wide else replace(add.cfg, router=replace(add.cfg.router, extra_sources=False, short_texts=0))
    with add.timed("chunk"):
        rt = router_text(dd, add.tokenizer, rcfg, builtin=data is None, run=run)

    # The new adapter is trained in the system temp dir, so a killed run leaves nothing beside the bundle.
    work = Path(tempfile.mkdtemp(prefix=f"tlora-add-{name}-"))
    try:
        # The router's features are the frozen base model's: computed before training, they also tell
        # a warm start which old domains the new text is like.
        with add.timed("router_features"):
            pad = pad_id(add.tokenizer)
            new_rows: dict = {}
            replay[name] = router_features(add.model, add.spec, rt, lengths, pad, min_rows=cfg.router_chunks,
                                           with_short=rcfg.router.short_texts > 0, rows=new_rows)
        old_router = load_router(bundle, manifest["router"], len(old_domains))
        affinity = router_affinity(old_router, replay[name]["train"], old_domains)
        folders = {d: safe_path(bundle, manifest["adapters"][d]["path"]) for d in old_domains}
        init_from, init_info = warm_start(init, affinity, folders, work)
        convs = f" and {len(train_convs)} conversations" if train_convs else ""
        run.log(f"training adapter '{name}' on {len(train_chunks)} chunks of {cfg.block_size} tokens{convs} ({cfg.steps} steps, "
                f"init {init}{' from ' + init_info['init_from'] if 'init_from' in init_info else ''})")
        summary = add.train(train_chunks, work / name, name, run=run, init_from=init_from,
                            conversations=train_convs)

        run.log("refitting the router on the replay memory plus the new domain")
        domains = [*old_domains, name]
        with add.timed("router_fit"):
            ex_items, ex_feats, ex_weight = _examples(bundle, manifest, domains)
            router, router_summary = fit_router({d: replay[d] for d in domains}, add.router_cfg, seed=cfg.seed,
                                                examples=examples_by_domain(ex_items, ex_feats),
                                                example_weight=ex_weight)
            lexical = refit_lexical(bundle, manifest, router, replay, domains, seed=cfg.seed,
                                    new_rows={name: new_rows}, tokenizer=add.tokenizer, examples=ex_items,
                                    example_weight=ex_weight)
            router_summary["lexical"] = lexical[2]
            abstain, router_summary["abstain"] = rechoose_abstain(manifest["router"]["config"], router, replay,
                                                                  lengths, lexical, ex_items, ex_feats)

        labels = {d: i for i, d in enumerate(old_domains)}
        old_replay = {d: replay[d] for d in old_domains}
        before = replay_accuracy(old_router, old_replay, labels)
        after = replay_accuracy(router, old_replay, labels)

        splits = read_splits(bundle, manifest.get("data"))
        splits[name] = dd.split_summary() | ({"router_sources": rt.sources} if rt.sources else {})
        training = summary | {"source": dd.source, "seed": cfg.seed} | init_info

        def fill(tmp: Path, old: dict) -> dict:
            new = json.loads(json.dumps(old))
            copy_domain_files(bundle, old, old_domains, tmp)
            new["domains"] = domains
            new["adapters"][name] = place_adapter(work / name, tmp, f"adapters/{name}", training)
            _write_refit(tmp, new, router, router_summary, replay, domains, lengths, splits, lexical)
            new["router"]["config"].update(abstain)
            write_examples(tmp, new, ex_items, ex_feats, ex_weight)
            if index is not None:
                grounded = (new.get("grounding") or {}).get("domains", {})
                new["grounding"] = grounding_entry(grounded | {name: write_grounding_index(tmp, name, index)}, k)
            return new

        with add.timed("save"):
            result = commit(bundle, fill, {"change": "add-domain", "domain": name, "source": dd.source})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check_unchanged(manifest, result, old_domains)
    timing = add.rounded_timing()
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
        "timing": timing | {"router_total": round(timing["router_features"] + timing["router_fit"], 2)},
    }


def remove_domain(bundle: str | Path, name: str, *, base: str | None = None, run: RunContext | None = None,
                  log: Callable[[str], object] | None = None) -> dict:
    """Drop `name`'s adapter and refit the router on the remaining domains' replay memory.
    Its one log line (a replay memory rebuilt) goes to `run.log` (`log`, if given, overrides it)."""
    run = RunContext.of(run, log=log)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    old_domains = list(manifest["domains"])
    if name not in old_domains:
        raise InputError(f"bundle {bundle} has no domain {name!r}; it has {', '.join(old_domains)}")
    if len(old_domains) == 1:
        raise InputError(f"{name!r} is the bundle's only domain; a bundle needs at least one")
    domains = [d for d in old_domains if d != name]
    t0 = time.perf_counter()
    own = bundle_train_config(manifest)
    replay, lengths, rebuilt = _replay(bundle, manifest, None, None, own, base=base)
    if rebuilt:
        run.log("bundle has no router replay memory: recomputed it from the domains' corpora")
    router_cfg = RouterConfig(**manifest["router"]["config"])
    ex_items, ex_feats, ex_weight = _examples(bundle, manifest, domains)
    router, router_summary = fit_router({d: replay[d] for d in domains}, router_cfg, seed=own.seed,
                                        examples=examples_by_domain(ex_items, ex_feats), example_weight=ex_weight)
    lexical = refit_lexical(bundle, manifest, router, replay, domains, seed=own.seed, examples=ex_items,
                            example_weight=ex_weight)
    router_summary["lexical"] = lexical[2]
    abstain, router_summary["abstain"] = rechoose_abstain(manifest["router"]["config"], router,
                                                          {d: replay[d] for d in domains}, lengths, lexical,
                                                          ex_items, ex_feats)
    router_seconds = time.perf_counter() - t0
    labels = {d: i for i, d in enumerate(domains)}
    after = replay_accuracy(router, {d: replay[d] for d in domains}, labels)
    splits = {d: v for d, v in read_splits(bundle, manifest.get("data")).items() if d != name}

    def fill(tmp: Path, old: dict) -> dict:
        new = json.loads(json.dumps(old))
        copy_domain_files(bundle, old, domains, tmp)
        new["domains"] = domains
        del new["adapters"][name]
        if name in new.get("subdomains", {}):  # its subdomains go with it (their files are not copied)
            del new["subdomains"][name]
        if name in (new.get("grounding") or {}).get("domains", {}):  # and its passage index
            del new["grounding"]["domains"][name]
        _write_refit(tmp, new, router, router_summary, replay, domains, lengths, splits, lexical)
        new["router"]["config"].update(abstain)
        write_examples(tmp, new, ex_items, ex_feats, ex_weight)
        return new

    result = commit(bundle, fill, {"change": "remove-domain", "domain": name})
    check_unchanged(manifest, result, domains)
    return {"version": result["version"], "removed": name, "domains": domains, "replay_rebuilt": rebuilt,
            "accuracy_after": after, "router_training": router_summary, "router_seconds": round(router_seconds, 2)}


# ------------------------------------------------------------------------------------------ helpers
def _examples(bundle: Path, manifest: dict, domains: list[str]) -> tuple[list[dict], dict, float]:
    """The user's route examples of the domains kept (an example of a removed domain goes with it)
    and the out-of-scope ones (domain 'none')."""
    items, feats = read_examples(bundle, manifest)
    weight = float((manifest["router"].get("examples") or {}).get("weight", DEFAULT_EXAMPLE_WEIGHT))
    return [i for i in items if i["domain"] in domains or i["domain"] == "none"], feats, weight


def _replay(bundle: Path, manifest: dict, model, tokenizer, cfg: TrainConfig, base: str | None = None):
    """The stored replay memory, or (old bundles) the same features recomputed from each domain's corpus."""
    found = read_replay(bundle, manifest["router"], manifest["domains"])
    if found is not None:
        return *found, False
    if model is None:
        model, tokenizer = load_base_for(manifest, base)
    lengths = manifest["router"].get("training", {}).get("prefix_lengths") or router_prefix_lengths(
        cfg.router, cfg.block_size)
    splits = read_splits(bundle, manifest.get("data"))
    features = {}
    for domain in manifest["domains"]:
        info = splits.get(domain)
        if not info:
            raise BundleError(f"cannot rebuild the replay memory: no recorded split for {domain!r}")
        dd = load_domain_data(domain, source_paths(domain, info["source"]), cfg.seed)
        if sorted(d.id for d in dd.splits.val) != sorted(info["val_ids"]):
            raise CorpusError(f"cannot rebuild the replay memory: the corpus of {domain!r} changed since training")
        train = chunks_tensor(dd.splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, domain)
        calib = chunks_tensor(dd.splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{domain} val split")
        features[domain] = domain_features(model, manifest["router"]["features"], train, calib, lengths)
    return features, lengths, True


def copy_domain_files(bundle: Path, old: dict, domains: list[str], tmp: Path) -> None:
    """Copy the kept domains' adapter files (and PEFT's adapters/README.md) byte for byte, with
    their subdomains' adapters and sub-routers, if any."""
    keep = [f"{old['adapters'][d]['path']}/" for d in domains]
    keep += [f"{top}/{d}/" for d in domains for top in ("subadapters", "subrouters")]
    indexes = {grounding_file(d) for d in domains}
    rels = [rel for rel in old["files"]
            if any(rel.startswith(k) for k in keep) or rel in indexes or rel == "adapters/README.md"]
    copy_files(bundle, rels, tmp)


def _write_refit(tmp: Path, manifest: dict, router: GatingNetwork, summary: dict, replay: dict,
                 domains: list[str], lengths: list[int], splits: dict, lexical: tuple) -> None:
    """The refit router (with its lexical head and memory: `refit_lexical`'s result), its replay
    memory and the data splits into the version being built."""
    write_router(tmp, ROUTER_DIR, manifest["router"], router, replay, domains, lengths,
                 lexical=lexical[0], lexical_replay=lexical[1])
    manifest["router"]["training"] = summary | {"prefix_lengths": list(lengths), "refit_from": "replay memory"}
    manifest["data"] = write_splits(tmp, SPLITS_FILE, splits)


def check_unchanged(old: dict, new: dict, domains: list[str]) -> None:
    """Every kept domain's adapter files must have exactly their old checksums (add/remove-domain)."""
    prefixes = tuple(f"{old['adapters'][d]['path']}/" for d in domains)
    check_kept(old["files"], new["files"], lambda rel: rel.startswith(prefixes), "adapter file", "editing the bundle")
