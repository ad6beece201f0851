"""The parts of a bundle on disk: router networks, replay memories, data splits, subdomains.

`bundle.py` makes whole-bundle writes atomic and verifies what is read; this module knows where
each part lives and how the manifest records it, so that training, `from_pretrained`,
`save_pretrained` and every change of a bundle (evolve/) read and write the parts one way:

    router/router.safetensors, router/replay.safetensors      the router and its replay memory
    data/splits.json                                          which documents each domain held out
    subadapters/<parent>/<child>/                             subdomain adapters (PEFT folders)
    subrouters/<parent>/router.safetensors, replay.safetensors, splits.json
    styles/<domain>/<style>/                                  style adapters (PEFT folders)
    grounding/<domain>.sqlite                                 a domain's passage index (grounding.py)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from temporal_lora.adapters import save_peft_adapters
from temporal_lora.bundle import safe_path
from temporal_lora.config import RouterConfig
from temporal_lora.errors import BundleError
from temporal_lora.grounding import PassageIndex
from temporal_lora.routing.gating import GatingNetwork, load_gating, save_gating
from temporal_lora.routing.hierarchy import DEFAULT_FALLBACK, Hierarchy, SubRouter, adapter_name
from temporal_lora.routing.lexical import (
    LexicalHead,
    load_lexical,
    load_lexical_replay,
    save_lexical,
    save_lexical_replay,
)
from temporal_lora.routing.replay import load_replay, save_replay
from temporal_lora.routing.styles import Styles

ROUTER_DIR = "router"
SPLITS_FILE = "data/splits.json"
SUBADAPTERS = "subadapters"
SUBROUTERS = "subrouters"
STYLES = "styles"
GROUNDING = "grounding"


# ------------------------------------------------------------------------------------------ routers
def load_router(bundle: Path, entry: dict, n_outputs: int) -> GatingNetwork | None:
    """The gating network a manifest entry (`manifest["router"]` or a sub-router's) points to."""
    if not entry.get("path"):
        return None
    cfg = RouterConfig(**entry["config"])
    return load_gating(safe_path(bundle, entry["path"]), entry["in_dim"], n_outputs, cfg.hidden_dim)


def write_router(root: Path, folder: str, entry: dict, net: GatingNetwork | None, replay: dict | None,
                 names: list[str], lengths: list[int], *, lexical: LexicalHead | None = None,
                 lexical_replay: dict | None = None) -> None:
    """Write a gating network and its replay memory (features of `names`) under `root/folder` and
    record both in the manifest `entry`. A parent with one subdomain has replay but no network yet.
    A lexical head (and its replay memory of hashed rows) is written beside them when given."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    entry["replay"] = None
    entry.pop("lexical", None)
    if lexical is not None:
        save_lexical(lexical, root / folder / "lexical.safetensors")
        entry["lexical"] = {"path": f"{folder}/lexical.safetensors", "weight": lexical.weight, "replay": None}
        if lexical_replay is not None and all(n in lexical_replay for n in names):
            save_lexical_replay(root / folder / "lexical_replay.safetensors", {n: lexical_replay[n] for n in names})
            entry["lexical"]["replay"] = f"{folder}/lexical_replay.safetensors"
    if replay is not None:
        save_replay(root / folder / "replay.safetensors", {n: replay[n] for n in names}, lengths)
        entry["replay"] = f"{folder}/replay.safetensors"
    if net is None:
        entry["path"] = None
        return
    save_gating(net, root / folder / "router.safetensors")
    entry.update(path=f"{folder}/router.safetensors", in_dim=int(net.feature_mean.shape[0]),
                 temperature=float(net.temperature))


def read_replay(bundle: Path, entry: dict, names: list[str]) -> tuple[dict, list[int]] | None:
    """The replay memory a router entry points to (None for bundles written before it existed)."""
    if not entry.get("replay"):
        return None
    features, lengths = load_replay(safe_path(bundle, entry["replay"]))
    missing = [n for n in names if n not in features]
    if missing:
        raise BundleError(f"router replay memory lacks {', '.join(missing)}")
    return features, lengths


def read_lexical(bundle: Path, entry: dict, names: list[str]) -> tuple[LexicalHead | None, dict | None]:
    """The lexical head a router entry points to, and its replay memory (hashed rows of `names`):
    (None, None) for a bundle without a lexical head."""
    info = entry.get("lexical")
    if not info:
        return None, None
    head = load_lexical(safe_path(bundle, info["path"]), len(names))
    rows = load_lexical_replay(safe_path(bundle, info["replay"])) if info.get("replay") else None
    if rows is not None and any(n not in rows for n in names):
        raise BundleError("router lexical replay memory lacks a domain")
    return head, rows


# ------------------------------------------------------------------------------------------ route examples
EXAMPLES_FILE = "router/examples.json"
DEFAULT_EXAMPLE_WEIGHT = 20.0  # one example counts as many replay rows: a handful must move the boundary
EXAMPLE_FEATURES = "router/examples.safetensors"


def example_id(domain: str, text: str) -> str:
    """A route example's id: the same text for the same domain is one example."""
    return "ex-" + hashlib.sha256(f"{domain}\n{text}".encode()).hexdigest()[:12]


def read_examples(bundle: Path, manifest: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A bundle's route examples ([{id, domain, text}], {id: pooled features [dim]}); none for
    bundles that have none (every bundle written before `tlora examples`)."""
    entry = manifest["router"].get("examples")
    if not entry:
        return [], {}
    try:
        items = json.loads(safe_path(bundle, entry["path"]).read_text(encoding="utf-8"))["examples"]
        feats = load_file(str(safe_path(bundle, entry["features"]))) if items else {}
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"route examples of {bundle} are unreadable: {exc}") from exc
    return items, feats


def write_examples(root: Path, manifest: dict, items: list[dict], feats: dict[str, torch.Tensor],
                   weight: float) -> None:
    """Write route examples and their features; record them in the manifest's router entry."""
    if not items:
        manifest["router"].pop("examples", None)
        return
    (root / ROUTER_DIR).mkdir(parents=True, exist_ok=True)
    (root / EXAMPLES_FILE).write_text(json.dumps({"examples": items}, indent=1, ensure_ascii=False), encoding="utf-8")
    save_file({i["id"]: feats[i["id"]].to(torch.float16).contiguous() for i in items}, str(root / EXAMPLE_FEATURES))
    manifest["router"]["examples"] = {"path": EXAMPLES_FILE, "features": EXAMPLE_FEATURES, "weight": weight,
                                      "count": len(items)}


def examples_by_domain(items: list[dict], feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{domain: [k, dim]} of route examples, the form `fit_router` takes."""
    out: dict[str, list[torch.Tensor]] = {}
    for item in items:
        out.setdefault(item["domain"], []).append(feats[item["id"]].float())
    return {d: torch.stack(v) for d, v in out.items()}


# ------------------------------------------------------------------------------------------ splits
def read_splits(bundle: Path, rel: str | None) -> dict:
    """A splits.json ({name: {source, val_ids, test_ids, ...}}); {} when the manifest names none."""
    if not rel:
        return {}
    try:
        return json.loads(safe_path(bundle, rel).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle data splits {rel} unreadable: {exc}") from exc


def write_splits(root: Path, rel: str, splits: dict) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps(splits, indent=1), encoding="utf-8")
    return rel


# ------------------------------------------------------------------------------------------ grounding
def grounding_file(domain: str) -> str:
    return f"{GROUNDING}/{domain}.sqlite"


def write_grounding_index(root: Path, domain: str, index: PassageIndex) -> dict:
    """One domain's passage index into a bundle being written; its manifest entry."""
    rel = grounding_file(domain)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(index.to_bytes())
    return {"path": rel, "passages": index.size}


def grounding_entry(indexes: dict[str, dict], passages: int) -> dict:
    """The manifest's `grounding`: how many passages a prompt gets and each grounded domain's index."""
    return {"passages": passages, "domains": indexes}


def read_grounding(bundle: Path, manifest: dict) -> tuple[dict[str, PassageIndex], int]:
    """The grounded domains' passage indexes and the passages per prompt; ({}, 0) without grounding."""
    entry = manifest.get("grounding") or {}
    indexes = {d: PassageIndex.from_bytes(safe_path(bundle, info["path"]).read_bytes(), f"grounding index of {d!r}")
               for d, info in (entry.get("domains") or {}).items() if d in manifest["domains"]}
    return indexes, int(entry.get("passages", 0)) if indexes else 0


# ------------------------------------------------------------------------------------------ subdomains
def read_hierarchy(bundle: Path, manifest: dict) -> Hierarchy:
    """The manifest's subdomains (routers, replay memory, splits), without touching any model."""
    subs, replay, lengths, splits = {}, {}, {}, {}
    entries = manifest.get("subdomains") or {}
    for parent, entry in entries.items():
        if parent not in manifest["domains"]:
            raise BundleError(f"subdomains listed under {parent!r}, which is not a domain of this bundle")
        children = list(entry["children"])
        subs[parent] = SubRouter(parent, children, load_router(bundle, entry["router"], len(children)),
                                 float(entry.get("fallback_threshold", DEFAULT_FALLBACK)))
        found = read_replay(bundle, entry["router"], children)
        if found is None:
            raise BundleError(f"subdomains of {parent!r} have no replay memory")
        replay[parent], lengths[parent] = found
        splits[parent] = read_splits(bundle, entry.get("data"))
    return Hierarchy(subs, entries, replay, lengths, splits)


def subrouter_folder(parent: str) -> str:
    return f"{SUBROUTERS}/{parent}"


def subadapter_folder(parent: str, child: str) -> str:
    return f"{SUBADAPTERS}/{parent}/{child}"


def write_subrouter(root: Path, entry: dict, sub: SubRouter, replay: dict, lengths: list[int],
                    splits: dict) -> None:
    """Write one parent's sub-router, replay memory and splits; update its manifest entry."""
    folder = subrouter_folder(sub.parent)
    write_router(root, folder, entry.setdefault("router", {}), sub.router, replay, sub.children, lengths)
    entry["data"] = write_splits(root, f"{folder}/splits.json", splits)
    entry["fallback_threshold"] = sub.fallback_threshold
    entry["children"] = list(sub.children)


def write_hierarchy(hierarchy: Hierarchy, peft_model, root: Path) -> dict:
    """Write subadapters/ and subrouters/ under `root`; return the manifest's `subdomains` entry."""
    entries = json.loads(json.dumps(hierarchy.entries))
    save_adapters_at(peft_model, root, {adapter_name(parent, child): entries[parent]["adapters"][child]["path"]
                                        for parent, sub in hierarchy.subs.items() for child in sub.children})
    for parent, sub in hierarchy.subs.items():
        write_subrouter(root, entries[parent], sub, hierarchy.replay[parent], hierarchy.lengths[parent],
                        hierarchy.splits.get(parent, {}))
    return entries


def save_adapters_at(peft_model, root: Path, places: dict[str, str]) -> None:
    """Save the named adapters of `peft_model` as PEFT folders at `root/<place>` (paths the manifest
    records). PEFT saves extra adapters under their names in one folder; they are moved from there."""
    if not places:
        return
    stage = root / ".adapters-stage"
    save_peft_adapters(peft_model, stage, selected_adapters=list(places))
    for name, rel in places.items():
        folder = root / rel
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage / name), str(folder))
    shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------------------------------ styles
def style_folder(domain: str, style: str) -> str:
    return f"{STYLES}/{domain}/{style}"


def read_styles(bundle: Path, manifest: dict) -> Styles:
    """The manifest's style adapters ({domain: {"default", "adapters"}}), checked against its domains."""
    entries = manifest.get("styles") or {}
    for domain, entry in entries.items():
        if domain not in manifest["domains"]:
            raise BundleError(f"styles listed under {domain!r}, which is not a domain of this bundle")
        for style, info in entry.get("adapters", {}).items():
            if not (safe_path(bundle, info["path"]) / "adapter_model.safetensors").is_file():
                raise BundleError(f"style adapter {domain}/{style} has no adapter_model.safetensors")
        if entry.get("default") not in (None, *entry.get("adapters", {})):
            raise BundleError(f"default style {entry['default']!r} of {domain!r} has no adapter")
    return Styles(json.loads(json.dumps(entries)))


def write_styles(styles: Styles, peft_model, root: Path) -> dict:
    """Write styles/ under `root` (save_pretrained); return the manifest's `styles` entry."""
    save_adapters_at(peft_model, root, {adapter_name(domain, style): info["path"]
                                        for domain, entry in styles.entries.items()
                                        for style, info in entry.get("adapters", {}).items()})
    return json.loads(json.dumps(styles.entries))
