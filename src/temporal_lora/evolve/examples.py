"""Route examples from the user: the lever a deployer pulls when a route is wrong.

`add_examples(bundle, "legal", ["Can I use GPL code in a closed product?"])` stores the texts with
their pooled router features (router/examples.json + router/examples.safetensors), refits the
router on the replay memory plus every stored example (each counting `weight` replay rows), and
writes a new bundle version. Adapters are copied byte for byte; only the router changes. Refitting
takes seconds: the old domains' features come from the replay memory, only the new texts go
through the base model (up to the router's layer).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from temporal_lora.bundle import read_manifest
from temporal_lora.config import RouterConfig, TrainConfig
from temporal_lora.errors import BundleError, InputError
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.gating import fit_router
from temporal_lora.storage import (
    ROUTER_DIR,
    examples_by_domain,
    read_examples,
    read_replay,
    write_examples,
    write_router,
)
from temporal_lora.versions import commit, copy_files

DEFAULT_WEIGHT = 20.0  # one example counts as many replay rows: a handful must move the boundary
MAX_EXAMPLE_CHARS = 20_000


def list_examples(bundle: str | Path) -> list[dict]:
    """The bundle's route examples: [{"id", "domain", "text"}]."""
    bundle = Path(bundle)
    return read_examples(bundle, read_manifest(bundle))[0]


def add_examples(bundle: str | Path, domain: str, texts: list[str], *, weight: float | None = None,
                 base: str | None = None) -> dict:
    """Add route examples for `domain`, refit the router, write a new version; returns a report."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    domains = list(manifest["domains"])
    if domain not in domains:
        raise InputError(f"bundle {bundle} has no domain {domain!r}; it has {', '.join(domains)}")
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
        eid = "ex-" + hashlib.sha256(f"{domain}\n{text}".encode()).hexdigest()[:12]
        if eid not in known:
            known.add(eid)
            new.append({"id": eid, "domain": domain, "text": text})
    if not new:
        return {"version": manifest.get("version"), "added": 0, "examples": len(items), "changed": False}
    _check_replay(bundle, manifest)
    tl = TemporalLoRA.from_pretrained(bundle, base=base)
    pooled = tl.route_features(tl.encode([i["text"] for i in new]))
    feats = dict(feats) | {i["id"]: pooled[k] for k, i in enumerate(new)}
    return _refit(bundle, manifest, items + new, feats, weight, {"change": "examples-add", "domain": domain,
                                                                 "added": len(new)})


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
    if domain is not None and domain not in manifest["domains"]:
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


def _refit(bundle: Path, manifest: dict, items: list[dict], feats: dict, weight: float | None, change: dict) -> dict:
    domains = list(manifest["domains"])
    replay, lengths = read_replay(bundle, manifest["router"], domains)
    old_weight = (manifest["router"].get("examples") or {}).get("weight", DEFAULT_WEIGHT)
    weight = float(old_weight if weight is None else weight)
    if weight <= 0:
        raise InputError(f"example weight must be > 0, got {weight}")
    seed = TrainConfig.from_dict(manifest.get("train_config")).seed
    router_cfg = RouterConfig(**manifest["router"]["config"])
    router, summary = fit_router({d: replay[d] for d in domains}, router_cfg, seed=seed,
                                 examples=examples_by_domain(items, feats), example_weight=weight)

    def fill(tmp: Path, old: dict) -> dict:
        new = json.loads(json.dumps(old))
        skip = {f"{ROUTER_DIR}/router.safetensors", f"{ROUTER_DIR}/examples.json", f"{ROUTER_DIR}/examples.safetensors"}
        copy_files(bundle, [rel for rel in old["files"] if rel not in skip and not rel.startswith("versions/")], tmp)
        write_router(tmp, ROUTER_DIR, new["router"], router, replay, domains, lengths)
        new["router"]["training"] = summary | {"prefix_lengths": list(lengths), "refit_from": "replay memory + examples"}
        write_examples(tmp, new, items, feats, weight)
        return new

    result = commit(bundle, fill, change)
    return {"version": result["version"], "examples": len(items), "weight": weight, "changed": True,
            "router_training": summary, **{k: v for k, v in change.items() if k != "change"}}
