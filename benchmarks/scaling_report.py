"""The scaling benchmark's report: scaling.json, scaling.md and the plots."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import ScalingBudget, pyplot, write_results
from temporal_lora.config import TrainConfig
from temporal_lora.corpora.subdomains import DESCRIPTIONS


def _gmean(xs: list[float]) -> float:
    return round(math.exp(sum(math.log(x) for x in xs) / len(xs)), 4)


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
            f"adapter init: {b.init}" + ("" if b.init == "base" else
                                         " (domain i starts from the adapters of domains 0..i-1, weighted by the "
                                         "router fit on them; the first domain starts fresh)"),
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
    return {d: DESCRIPTIONS.get(d, "user corpus") for d in domains}


def markdown(r: dict) -> str:
    lines = ["# Scaling: Temporal LoRA vs one multitask LoRA as domains are added", "",
             f"Domains (in the order they are added): {', '.join(r['domains'])}.", "",
             f"Per-domain budget: {r['train_config']['steps']} steps x {r['train_config']['batch_size']} x "
             f"{r['train_config']['block_size']} tokens, LoRA r={r['train_config']['adapter']['r']}, "
             f"{r['budget'].get('init', 'base')} init. {r['hardware']}.", "",
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
    write_results(out, "scaling", report, markdown(report))
    plot_scaling(report, out)


def plot_scaling(r: dict, out: Path) -> None:
    plt = pyplot()

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
