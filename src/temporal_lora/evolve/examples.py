"""Route examples from the user: the lever a deployer pulls when a route is wrong.

`add_examples(bundle, "legal", ["Can I use GPL code in a closed product?"])` stores the texts with
their pooled router features (router/examples.json + router/examples.safetensors), refits the
router on the replay memory plus every stored example (each counting `weight` replay rows), and
writes a new bundle version. Adapters are copied byte for byte; only the router changes. Refitting
takes seconds: the old domains' features come from the replay memory, only the new texts go
through the base model (up to the router's layer).

Examples of the domain "none" are out-of-scope texts: requests no domain should answer. They are
stored like the others but never become a router class (`fit_router` ignores names it does not
train); in a bundle whose router config has `abstain_auto` (`tlora train --abstain auto`, or
`tlora examples add --abstain auto`) every refit chooses the abstain threshold with them
(routing/abstain.py) and records the choice in the manifest's router training summary ("abstain").
Where the bundle has a lexical replay memory, the lexical head is refit on the same rows (examples
included; evolve/common.py, as add-domain does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from temporal_lora.bundle import read_manifest
from temporal_lora.config import RouterConfig, TrainConfig
from temporal_lora.errors import BundleError, InputError
from temporal_lora.evolve.common import rechoose_abstain, refit_lexical
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.gating import fit_router
from temporal_lora.storage import (
    DEFAULT_EXAMPLE_WEIGHT,
    ROUTER_DIR,
    example_id,
    examples_by_domain,
    read_examples,
    read_replay,
    write_examples,
    write_router,
)
from temporal_lora.versions import commit, copy_files

DEFAULT_WEIGHT = DEFAULT_EXAMPLE_WEIGHT  # one example counts as many replay rows
MAX_EXAMPLE_CHARS = 20_000
NONE = "none"  # the out-of-scope "domain": texts no domain should answer (a reserved domain name)
ABSTAIN_NOTE = ("out-of-scope examples (domain 'none') choose the abstain threshold only in bundles with "
                "--abstain auto: run `tlora examples add --abstain auto ...` to switch it on")


def list_examples(bundle: str | Path) -> list[dict]:
    """The bundle's route examples: [{"id", "domain", "text"}]."""
    bundle = Path(bundle)
    return read_examples(bundle, read_manifest(bundle))[0]


def add_examples(bundle: str | Path, domain: str, texts: list[str], *, weight: float | None = None,
                 base: str | None = None, abstain: str | None = None) -> dict:
    """Add route examples for `domain` ("none": out-of-scope examples), refit the router, write a new
    version; returns a report. `abstain="auto"` also switches the bundle to choosing its abstain
    threshold at every refit (router config `abstain_auto`)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    domains = list(manifest["domains"])
    if domain not in domains and domain != NONE:
        raise InputError(f"bundle {bundle} has no domain {domain!r}; it has {', '.join(domains)} "
                         f"(or '{NONE}' for out-of-scope examples)")
    if abstain not in (None, "auto"):
        raise InputError(f"abstain takes 'auto', got {abstain!r}")
    switch_on = abstain == "auto" and not manifest["router"]["config"].get("abstain_auto", False)
    texts = [t.strip() for t in texts]
    if not texts:
        raise InputError("no example texts given")
    if any(not t for t in texts):
        raise InputError("an example text is empty")
    if any(len(t) > MAX_EXAMPLE_CHARS for t in texts):
        raise InputError(f"an example text is longer than {MAX_EXAMPLE_CHARS} characters")
    items, feats = read_examples(bundle, manifest)
    known = {i["id"] for i in items}
    new = []
    for text in texts:
        eid = example_id(domain, text)
        if eid not in known:
            known.add(eid)
            new.append({"id": eid, "domain": domain, "text": text})
    if not new and not switch_on:
        return {"version": manifest.get("version"), "added": 0, "examples": len(items), "changed": False}
    _check_replay(bundle, manifest)
    if new:
        tl = TemporalLoRA.from_pretrained(bundle, base=base)
        pooled = tl.route_features(tl.encode([i["text"] for i in new]))
        # As stored (float16): a later refit reads them back so, and must choose the same threshold.
        feats = dict(feats) | {i["id"]: pooled[k].to(torch.float16) for k, i in enumerate(new)}
    change = {"change": "examples-add", "domain": domain, "added": len(new)} | ({"abstain": "auto"} if switch_on else {})
    return _refit(bundle, manifest, items + new, feats, weight, change, abstain_auto=switch_on)


def remove_examples(bundle: str | Path, ids: list[str] | None = None, *, domain: str | None = None) -> dict:
    """Remove examples by id (or all of one domain), refit the router, write a new version."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    items, feats = read_examples(bundle, manifest)
    if not ids and domain is None:
        raise InputError("give example ids or --domain")
    unknown = [i for i in ids or [] if i not in {x["id"] for x in items}]
    if unknown:
        raise InputError(f"bundle {bundle} has no example {', '.join(unknown)}")
    if domain is not None and domain not in manifest["domains"] and domain != NONE:
        raise InputError(f"bundle {bundle} has no domain {domain!r}")
    drop = set(ids or []) | {x["id"] for x in items if x["domain"] == domain}
    keep = [x for x in items if x["id"] not in drop]
    if len(keep) == len(items):
        return {"version": manifest.get("version"), "removed": 0, "examples": len(items), "changed": False}
    _check_replay(bundle, manifest)
    return _refit(bundle, manifest, keep, feats, None, {"change": "examples-remove", "removed": len(items) - len(keep)})


def _check_replay(bundle: Path, manifest: dict) -> None:
    if read_replay(bundle, manifest["router"], manifest["domains"]) is None:
        raise BundleError(f"bundle {bundle} has no router replay memory (written before it existed); "
                          "run `tlora add-domain` or retrain it first")


def _refit(bundle: Path, manifest: dict, items: list[dict], feats: dict, weight: float | None, change: dict,
           abstain_auto: bool = False) -> dict:
    """Refit the router (and its lexical head, where the bundle has one) on the replay memory plus
    `items`; with `abstain_auto` (or the bundle's own setting), choose the abstain threshold."""
    domains = list(manifest["domains"])
    replay, lengths = read_replay(bundle, manifest["router"], domains)
    replay = {d: replay[d] for d in domains}
    old_weight = (manifest["router"].get("examples") or {}).get("weight", DEFAULT_WEIGHT)
    weight = float(old_weight if weight is None else weight)
    if weight <= 0:
        raise InputError(f"example weight must be > 0, got {weight}")
    seed = TrainConfig.from_dict(manifest.get("train_config")).seed
    router_cfg = RouterConfig(**manifest["router"]["config"])
    router, summary = fit_router(replay, router_cfg, seed=seed, examples=examples_by_domain(items, feats),
                                 example_weight=weight)  # "none" examples are no class: fit_router skips them
    lexical = refit_lexical(bundle, manifest, router, replay, domains, seed=seed, examples=items,
                            example_weight=weight)
    summary["lexical"] = lexical[2]
    config_in = manifest["router"]["config"] | ({"abstain_auto": True} if abstain_auto else {})
    config, abstain = rechoose_abstain(config_in, router, replay, lengths, lexical, items, feats)
    if abstain is not None:
        summary["abstain"] = abstain
        config |= {"abstain_auto": True}

    def fill(tmp: Path, old: dict) -> dict:
        new = json.loads(json.dumps(old))
        skip = {f"{ROUTER_DIR}/{name}" for name in ("router.safetensors", "examples.json", "examples.safetensors",
                                                    "lexical.safetensors", "lexical_replay.safetensors")}
        copy_files(bundle, [rel for rel in old["files"] if rel not in skip and not rel.startswith("versions/")], tmp)
        write_router(tmp, ROUTER_DIR, new["router"], router, replay, domains, lengths, lexical=lexical[0],
                     lexical_replay=lexical[1])
        new["router"]["config"].update(config)
        new["router"]["training"] = summary | {"prefix_lengths": list(lengths), "refit_from": "replay memory + examples"}
        write_examples(tmp, new, items, feats, weight)
        return new

    result = commit(bundle, fill, change)
    report = {"version": result["version"], "examples": len(items), "weight": weight, "changed": True,
              "router_training": summary, **{k: v for k, v in change.items() if k != "change"}}
    if "abstain" in summary:
        report["abstain"] = summary["abstain"]
    elif any(i["domain"] == NONE for i in items):
        report["note"] = ABSTAIN_NOTE
    return report
