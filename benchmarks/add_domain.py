"""Domains over time: start from one domain and add the others one at a time (N = 1..5).

For each addition it records the time split into the adapter part (training one LoRA adapter)
and the router part (the new domain's features + refitting the router on the replay memory),
and the router's accuracy on the *old* domains' held-out test documents before and after the
addition (same test chunks, same prefix lengths). Writes add_domain.json, add_domain.md and
add_domain.png into --out.

    python -m benchmarks add-domain --out runs/bench/time
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import pyplot
from benchmarks.flags import flag
from temporal_lora.backbone import load_backbone
from temporal_lora.bundle import read_manifest
from temporal_lora.corpora import load_domain
from temporal_lora.data import chunk_documents
from temporal_lora.evolve import add_domain, bundle_train_config
from temporal_lora.routing.features import prefix_features
from temporal_lora.routing.gating import fit_router
from temporal_lora.routing.replay import domain_features
from temporal_lora.storage import load_router
from temporal_lora.train import chunks_tensor, load_domain_data, train_bundle

LENGTHS = [8, 16, 32, 64, 128]


def test_features(model, tokenizer, spec: str, splits: dict, domain: str, n: int) -> torch.Tensor:
    """[lengths, n, dim] router features of `domain`'s held-out test chunks (from the bundle's splits)."""
    wanted = set(splits[domain]["test_ids"])
    docs = [d for d in load_domain(domain, {}) if d.id in wanted]
    chunks = torch.tensor(chunk_documents(docs, tokenizer, block_size=128, max_chunks=n, seed=0))
    return prefix_features(model, spec, chunks, LENGTHS)


def accuracy(net, feats: dict[str, torch.Tensor], domains: list[str]) -> dict:
    """Pooled accuracy over the given domains' chunks, per prefix length, plus per domain at 128 tokens."""
    with torch.no_grad():
        correct = {n: 0 for n in LENGTHS}
        total = 0
        per_domain = {}
        for d, f in feats.items():
            label = domains.index(d)
            for i, n in enumerate(LENGTHS):
                hits = int((net(f[i]).argmax(-1) == label).sum())
                correct[n] += hits
                if n == 128:
                    per_domain[d] = hits / f.shape[1]
            total += f.shape[1]
    return {"by_length": {n: correct[n] / total for n in LENGTHS}, "per_domain_128": per_domain, "chunks": total}


@dataclass
class AddDomainSettings:
    """The flags of `python -m benchmarks add-domain`."""

    out: Path = flag(Path("runs/bench/time"), "add_domain.json, .md, .png (and the bundle it grows)")
    order: str = flag("medical,legal,technical,code,literature", "the domains, in the order they are added")
    budget: str = flag("quick", "training budget of each adapter")
    test_chunks: int = flag(200, "held-out test chunks per domain")
    reference: bool = flag(False, "only add the joint-retrain reference to an existing add_domain.json in --out")


def run(settings: AddDomainSettings) -> dict:
    """Train the first domain, add the others one at a time (or only add the reference), print
    the table; returns what add_domain.json holds."""
    if settings.reference:
        return reference(settings.out, settings.test_chunks)
    order = settings.order.split(",")
    settings.out.mkdir(parents=True, exist_ok=True)
    bundle = settings.out / "add_domain_bundle"
    shutil.rmtree(bundle, ignore_errors=True)

    t0 = time.perf_counter()
    tl = train_bundle(order[:1], bundle, budget=settings.budget, progress=True)
    first_total = time.perf_counter() - t0
    steps = [{"n_after": 1, "domain": order[0], "total_s": round(first_total, 1),
              "adapter_s": tl.info["timing"][f"adapter_{order[0]}"], "router_s": tl.info["timing"]["router"],
              "kind": "train (initial bundle)"}]
    del tl

    model, tokenizer, _ = load_backbone(read_manifest(bundle)["base_model"]["id"])
    spec = read_manifest(bundle)["router"]["features"]
    feats: dict[str, torch.Tensor] = {}
    for i, name in enumerate(order[1:], start=1):
        manifest = read_manifest(bundle)
        old = list(manifest["domains"])
        before_net = load_router(bundle, manifest["router"], len(manifest["domains"]))
        splits = json.loads((bundle / "data" / "splits.json").read_text())
        for d in old:
            if d not in feats:
                feats[d] = test_features(model, tokenizer, spec, splits, d, settings.test_chunks)
        before = accuracy(before_net, {d: feats[d] for d in old}, old)
        t0 = time.perf_counter()
        report = add_domain(bundle, name, budget=settings.budget, progress=True)
        total = time.perf_counter() - t0
        manifest = read_manifest(bundle)
        after_net = load_router(bundle, manifest["router"], len(manifest["domains"]))
        domains = list(manifest["domains"])
        after = accuracy(after_net, {d: feats[d] for d in old}, domains)
        splits = json.loads((bundle / "data" / "splits.json").read_text())
        feats[name] = test_features(model, tokenizer, spec, splits, name, settings.test_chunks)
        new_acc = accuracy(after_net, {name: feats[name]}, domains)
        t = report["timing"]
        steps.append({
            "n_after": i + 1, "domain": name, "kind": "add-domain", "version": report["version"],
            "total_s": round(total, 1), "adapter_s": t["adapter"], "router_s": t["router_total"],
            "router_features_s": t["router_features"], "router_fit_s": t["router_fit"],
            "load_s": round(t["load_corpus"] + t["load_base_model"] + t["load_replay"], 2), "save_s": t["save"],
            "old_accuracy_before": before, "old_accuracy_after": after, "new_domain_accuracy": new_acc,
            "drop_points_128": round(100 * (before["by_length"][128] - after["by_length"][128]), 3),
            "max_drop_points_any_length": round(max(100 * (before["by_length"][n] - after["by_length"][n])
                                                    for n in LENGTHS), 3),
            "old_adapters_byte_identical": report["old_domains_unchanged"],
        })
        print(json.dumps(steps[-1]), flush=True)

    result = {"order": order, "budget": settings.budget, "test_chunks_per_domain": settings.test_chunks,
              "lengths": LENGTHS, "steps": steps, "bundle": str(bundle),
              "history": [e for e in read_manifest(bundle)["history"]]}
    (settings.out / "add_domain.json").write_text(json.dumps(result, indent=2))
    (settings.out / "add_domain.md").write_text(markdown(result))
    plot(result, settings.out / "add_domain.png")
    print(markdown(result))
    return result


def reference(out: Path, n_test: int) -> dict:
    """For each step, a router trained from scratch on the raw text's float32 features of the same
    domains (what retraining everything would give) on the same old-domain test chunks."""

    result = json.loads((out / "add_domain.json").read_text())
    for step in result["steps"]:  # JSON made the prefix lengths strings
        for acc in step.values():
            if isinstance(acc, dict) and "by_length" in acc:
                acc["by_length"] = {int(k): v for k, v in acc["by_length"].items()}
    bundle = Path(result["bundle"])
    manifest = read_manifest(bundle)
    cfg = bundle_train_config(manifest)
    model, tokenizer, _ = load_backbone(manifest["base_model"]["id"])
    spec = manifest["router"]["features"]
    splits = json.loads((bundle / "data" / "splits.json").read_text())
    order = result["order"]
    raw, test = {}, {}
    for d in order:
        dd = load_domain_data(d, {}, cfg.seed)
        train = chunks_tensor(dd.splits.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, d)
        calib = chunks_tensor(dd.splits.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, d)
        raw[d] = domain_features(model, spec, train, calib, LENGTHS)
        test[d] = test_features(model, tokenizer, spec, splits, d, n_test)
    for step in result["steps"]:
        if step["kind"] != "add-domain":
            continue
        domains = order[: step["n_after"]]
        net, _ = fit_router({d: raw[d] for d in domains}, cfg.router, seed=cfg.seed)
        step["joint_retrain_old_accuracy"] = accuracy(net, {d: test[d] for d in domains[:-1]}, domains)
    (out / "add_domain.json").write_text(json.dumps(result, indent=2))
    (out / "add_domain.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| N after | added | adapter s | router s (features + fit) | old-domain acc. before -> after (128 tok) "
             "| before -> after (32 tok) | largest drop, any length (points) | new domain acc. (128 tok) |",
             "|---:|---|---:|---:|---|---|---:|---:|"]
    for s in result["steps"]:
        if s["kind"] != "add-domain":
            lines.append(f"| {s['n_after']} | {s['domain']} (initial train) | {s['adapter_s']:.1f} | "
                         f"{s['router_s']:.1f} | - | - | - | - |")
            continue
        b, a = s["old_accuracy_before"]["by_length"], s["old_accuracy_after"]["by_length"]
        lines.append(
            f"| {s['n_after']} | {s['domain']} | {s['adapter_s']:.1f} | {s['router_s']:.2f} "
            f"({s['router_features_s']:.2f} + {s['router_fit_s']:.2f}) | {b[128]:.2%} -> {a[128]:.2%} | "
            f"{b[32]:.2%} -> {a[32]:.2%} | {s['max_drop_points_any_length']:+.2f} | "
            f"{s['new_domain_accuracy']['by_length'][128]:.2%} |")
    refs = [s for s in result["steps"] if "joint_retrain_old_accuracy" in s]
    if refs:
        lines += ["", "Old-domain accuracy after each addition: router refit on the replay memory vs a router "
                  "retrained from scratch on the raw text's features (same domains, same test chunks):", "",
                  "| N after | prefix tokens | 8 | 16 | 32 | 64 | 128 |", "|---:|---|---:|---:|---:|---:|---:|"]
        for s in refs:
            for label, key in (("replay refit", "old_accuracy_after"), ("joint retrain", "joint_retrain_old_accuracy")):
                acc = s[key]["by_length"]
                lines.append(f"| {s['n_after']} | {label} | " + " | ".join(f"{acc[n]:.2%}" for n in LENGTHS) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    steps = result["steps"]
    ns = [s["n_after"] for s in steps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(ns, [s["adapter_s"] for s in steps], label="adapter (train LoRA)")
    ax1.bar(ns, [s["router_s"] for s in steps], bottom=[s["adapter_s"] for s in steps],
            label="router (features + refit)")
    ax1.set_xlabel("domains after the step (1 = initial train)")
    ax1.set_ylabel("seconds")
    ax1.set_title("Time to add domain N")
    ax1.set_xticks(ns, [f"{n}\n{s['domain']}" for n, s in zip(ns, steps, strict=True)])
    ax1.legend()
    adds = [s for s in steps if s["kind"] == "add-domain"]
    x = [s["n_after"] for s in adds]
    for n, style in ((128, "-"), (32, "--"), (8, ":")):
        b = [100 * s["old_accuracy_before"]["by_length"][n] for s in adds]
        a = [100 * s["old_accuracy_after"]["by_length"][n] for s in adds]
        line = ax2.plot(x, b, style, marker="o", label=f"before, {n} tok")[0]
        ax2.plot(x, a, style, marker="s", color=line.get_color(), alpha=0.6, label=f"after, {n} tok")
    ax2.set_xlabel("domains after the addition")
    ax2.set_ylabel("router accuracy on old domains (%)")
    ax2.set_title("Old domains: before vs after each addition")
    ax2.set_xticks(x)
    ax2.legend(fontsize=7, ncol=2)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


