"""The bench's report: bench.json, bench.md and the plots, from the phases' results."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import GOALS, BenchBudget, hardware, pyplot, write_results

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
    write_results(out, "bench", report, markdown(report))
    plot_bench(report, out)


def plot_bench(report: dict, out: Path) -> None:
    plt = pyplot()

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
