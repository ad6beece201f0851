"""Evaluate a bundle on its held-out test documents: routing quality and perplexity per strategy;
and, for domains trained on conversations, on their held-out conversations: assistant-token
perplexity and routing of the user turns (what the router reads when serving)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from temporal_lora.cache import atomic_write_text
from temporal_lora.config import EVAL_LENGTHS, RunContext
from temporal_lora.conversations import (
    Conversation,
    assistant_nll,
    load_domain_texts,
    user_turn_ids,
)
from temporal_lora.corpora import load_domain, source_paths
from temporal_lora.data import chunk_documents
from temporal_lora.errors import BundleError, CorpusError
from temporal_lora.mixing import one_hot
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.features import prefix_features
from temporal_lora.routing.gating import GatingNetwork
from temporal_lora.scoring import perplexity
from temporal_lora.text import separator_id

STRATEGIES = ("base", "oracle", "routed", "soft")


def held_out_chunks(tl: TemporalLoRA, n: int, *, block_size: int = 128, seed: int = 0,
                    documents_only: bool = False) -> dict[str, torch.Tensor]:
    """Chunks of each domain's *test* documents, as recorded in the bundle at training time.
    A domain trained on conversations only is an error, or left out with `documents_only`."""
    splits = tl.info.get("data") or {}
    result = {}
    for domain in tl.domains:
        info = splits.get(domain)
        if not info:
            raise BundleError(f"bundle has no recorded test split for domain {domain!r}")
        source = info["source"]
        if not info["test_ids"] and info.get("conversations"):
            if documents_only:
                continue
            raise CorpusError(f"domain {domain!r} has conversations only; the report measures test documents")
        paths = source_paths(domain, source)
        wanted = set(info["test_ids"])
        docs = [d for d in load_domain(domain, paths) if d.id in wanted]
        if not docs:
            raise CorpusError(f"the test documents of {domain!r} are no longer in {source}")
        chunks = chunk_documents(docs, tl.tokenizer, block_size=block_size, max_chunks=n, seed=seed,
                                 separator=separator_id(tl.tokenizer))
        if not chunks:
            raise CorpusError(f"the test documents of {domain!r} hold fewer than {block_size} tokens")
        result[domain] = torch.tensor(chunks, dtype=torch.long)
    return result


def held_out_conversations(tl: TemporalLoRA) -> dict[str, list[Conversation]]:
    """Each domain's *test* conversations, as recorded at training time (domains without any are
    left out)."""
    splits = tl.info.get("data") or {}
    result = {}
    for domain in tl.domains:
        info = splits.get(domain) or {}
        wanted = set((info.get("conversations") or {}).get("test_ids") or [])
        if not wanted:
            continue
        _, convs = load_domain_texts(domain, source_paths(domain, info["source"]))
        convs = [c for c in convs if c.id in wanted]
        if not convs:
            raise CorpusError(f"the test conversations of {domain!r} are no longer in {info['source']}")
        result[domain] = convs
    return result


def conversation_metrics(tl: TemporalLoRA, convs: dict[str, list[Conversation]], max_tokens: int = 512) -> dict:
    """Per domain: assistant-token perplexity of its test conversations with the base model, the
    domain's own adapter (oracle) and the adapter the router picks from the user turns (routed,
    hard), and how often the user turns are routed to the domain."""
    k = len(tl.domains)

    def nll(conv: Conversation, weights: torch.Tensor) -> tuple[float, int]:
        with tl.mixer.weights(weights.unsqueeze(0)):  # one conversation at a time: its own weights
            return assistant_nll(tl.model, tl.tokenizer, [conv], max_tokens)

    def ppl(rows: list[tuple[float, int]]) -> float:
        return round(math.exp(sum(t for t, _ in rows) / max(1, sum(n for _, n in rows))), 4)

    out = {}
    for label, domain in enumerate(tl.domains):
        if domain not in convs:
            continue
        items = convs[domain]
        turns = user_turn_ids(tl.tokenizer, items, tl.router_config.max_tokens)
        hard = tl.mix_weights(tl.route_probs(turns), "hard")
        base = [nll(c, torch.zeros(k)) for c in items]
        oracle = [nll(c, one_hot([label], k)[0]) for c in items]
        # As for document chunks: where the router is right, routed is the oracle's forward.
        routed = [o if hard[i, label] == 1 else nll(c, hard[i])
                  for i, (c, o) in enumerate(zip(items, oracle, strict=True))]
        out[domain] = {"test_conversations": len(items),
                       "assistant_ppl": {"base": ppl(base), "oracle": ppl(oracle), "routed": ppl(routed)},
                       "routing_user_turns": round(float((hard[:, label] == 1).float().mean()), 4)}
    return out


def router_metrics(tl: TemporalLoRA, sets: dict[str, torch.Tensor], lengths=EVAL_LENGTHS, *,
                   router: GatingNetwork | None = None, domains: list[str] | None = None) -> dict:
    """Accuracy by prompt length (prefixes of the same test chunks), confusion, macro-F1, ECE.

    By default of the bundle's router over its domains; `router` and `domains` measure another
    gating network on the same base-model features (e.g. one over close, confusable domains).
    """
    router = router if router is not None else tl.router
    domains = list(domains) if domains is not None else tl.domains
    block = min(len(c[0]) for c in sets.values())
    lengths = [n for n in lengths if n <= block]
    probs_by_len, labels = [], []
    for label, domain in enumerate(domains):
        if domain not in sets:  # a domain without test documents (conversations only): no row
            continue
        with tl.mixer.weights(None):
            feats = prefix_features(tl.model, tl.feature_spec, sets[domain], lengths)
        with torch.no_grad():
            probs_by_len.append(torch.stack([router(f) for f in feats]))
        labels.append(torch.full((len(sets[domain]),), label))
    probs = torch.cat(probs_by_len, dim=1)  # [lengths, n, domains]
    y = torch.cat(labels)
    k = len(domains)
    confusions = {str(n): _confusion(y, probs[i].argmax(-1), k) for i, n in enumerate(lengths)}
    # accuracy is the confusion matrix's diagonal share
    by_length = {n: round(float(c.diagonal().sum()) / len(y), 4) for n, c in confusions.items()}
    full = probs[-1]
    confusion = confusions[str(lengths[-1])]
    f1s = []
    for c in sorted(set(y.tolist())):  # classes with test rows
        tp = int(confusion[c, c])
        prec = tp / max(1, int(confusion[:, c].sum()))
        rec = tp / max(1, int(confusion[c].sum()))
        f1s.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    threshold = tl.router_config.abstain_threshold
    return {
        "accuracy": by_length[str(lengths[-1])],
        "accuracy_by_length": by_length,
        "macro_f1": round(sum(f1s) / len(f1s), 4),
        "confusion": confusion.tolist(),
        "confusion_length": lengths[-1],
        "confusion_by_length": {n: c.tolist() for n, c in confusions.items()},
        "ece": round(expected_calibration_error(full, y), 4),
        "abstain_threshold": threshold,
        "abstained_fraction": round(float((full.max(-1).values < threshold).float().mean()), 4),
        "test_chunks": {d: len(sets[d]) for d in domains if d in sets},
    }


def _confusion(truth: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """[k, k] counts, rows = true domain, columns = routed domain."""
    return torch.bincount(truth * k + pred, minlength=k * k).reshape(k, k)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += float(sel.float().mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece


def perplexities(tl: TemporalLoRA, sets: dict[str, torch.Tensor], run: RunContext | None = None) -> dict:
    """Test perplexity per domain for base, oracle (true adapter), routed (hard) and soft.

    The router reads each whole chunk (its first `max_tokens` tokens) and that route is scored.
    """
    from tqdm.auto import tqdm

    result = {s: {} for s in STRATEGIES}
    k = len(tl.domains)
    bar = tqdm(total=len(sets) * 3, desc="perplexity", disable=not (run or RunContext()).progress)
    for label, domain in enumerate(tl.domains):
        if domain not in sets:
            continue
        chunks = sets[domain]
        n = len(chunks)
        probs = tl.route_probs(chunks.tolist())
        nll = {"base": tl.token_nll(chunks, torch.zeros(n, k))}
        bar.update(1)
        nll["oracle"] = tl.token_nll(chunks, one_hot([label] * n, k))
        bar.update(1)
        # Hard routing applies exactly the oracle's adapter wherever the router is right, so only
        # the misrouted (or abstained) chunks need their own forward pass.
        hard = tl.mix_weights(probs, "hard")
        routed = nll["oracle"].clone()
        wrong = (hard[:, label] != 1).nonzero().flatten()
        if len(wrong):
            routed[wrong] = tl.token_nll(chunks[wrong], hard[wrong])
        nll["routed"] = routed
        nll["soft"] = tl.token_nll(chunks, tl.mix_weights(probs, "soft"))
        bar.update(1)
        for strategy in STRATEGIES:
            result[strategy][domain] = perplexity(nll[strategy], chunks)
    bar.close()
    return result


def evaluate_bundle(tl: TemporalLoRA, out_dir: str | Path | None = None, *, ppl_chunks: int | None = None,
                    router_chunks: int = 100, seed: int = 0, run: RunContext | None = None,
                    progress: bool | None = None) -> dict:
    """Run the evaluation; write report.json, report.md and plots to `out_dir` if given.
    `run.progress` shows a progress bar (`progress`, if given, overrides it)."""
    timing: dict[str, float] = {}
    cfg = tl.info.get("train_config") or {}
    ppl_chunks = ppl_chunks or cfg.get("eval_chunks", 24)
    block = cfg.get("block_size", 128)
    t0 = time.perf_counter()
    router_sets = held_out_chunks(tl, max(router_chunks, ppl_chunks), block_size=block, seed=seed,
                                  documents_only=True)
    ppl_sets = {d: c[:ppl_chunks] for d, c in router_sets.items()}
    conv_sets = held_out_conversations(tl)
    timing["load_test_data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    router = router_metrics(tl, router_sets) if router_sets else None
    timing["router_eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = perplexities(tl, ppl_sets, run=RunContext.of(run, progress=progress))
    timing["perplexity_eval"] = time.perf_counter() - t0
    docs = list(ppl_sets)
    report = {
        "domains": tl.domains,
        "base_model": tl.base_id,
        "router_features": tl.feature_spec,
        "router": router,
        "perplexity": ppl,
        "perplexity_chunks": {d: len(c) for d, c in ppl_sets.items()},
        "relative_to_base": {d: round(ppl["oracle"][d] / ppl["base"][d] - 1, 4) for d in docs},
        "routed_vs_oracle": {d: round(ppl["routed"][d] / ppl["oracle"][d] - 1, 4) for d in docs},
        "soft_vs_oracle": {d: round(ppl["soft"][d] / ppl["oracle"][d] - 1, 4) for d in docs},
        "training": tl.info.get("training", {}),
        "router_training": tl.info.get("router_training", {}),
        "timing": {**(tl.info.get("timing") or {}), **{k: round(v, 2) for k, v in timing.items()}},
    }
    if conv_sets:
        t0 = time.perf_counter()
        report["conversations"] = conversation_metrics(tl, conv_sets)
        report["timing"]["conversation_eval"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def markdown_tables(report: dict) -> str:
    lines: list[str] = []
    domains = report["domains"]
    ppl = report["perplexity"]
    docs = [d for d in domains if d in ppl["base"]]
    if docs:
        lines += ["| domain | base | oracle | routed | soft | oracle vs base | routed vs oracle |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for d in docs:
            lines.append(f"| {d} | {ppl['base'][d]:.2f} | {ppl['oracle'][d]:.2f} | {ppl['routed'][d]:.2f} | "
                         f"{ppl['soft'][d]:.2f} | {report['relative_to_base'][d]:+.1%} | "
                         f"{report['routed_vs_oracle'][d]:+.2%} |")
    if report.get("router"):
        acc = report["router"]["accuracy_by_length"]
        lines += ["", "| prompt tokens | " + " | ".join(acc) + " |", "|---|" + "---:|" * len(acc),
                  "| router accuracy | " + " | ".join(f"{v:.1%}" for v in acc.values()) + " |"]
        conf = report["router"]["confusion"]
        lines += ["", f"Confusion at {report['router']['confusion_length']} tokens (rows: true, columns: routed)", "",
                  "| true \\ routed | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
        lines += [f"| {d} | " + " | ".join(str(v) for v in row) + " |"
                  for d, row in zip(domains, conf, strict=True) if d in docs]
    conv = report.get("conversations") or {}
    if conv:
        lines += ["", "Held-out conversations: assistant-token perplexity; routing of the user turns", "",
                  "| domain | conversations | base | oracle | routed | user turns routed to the domain |",
                  "|---|---:|---:|---:|---:|---:|"]
        for d, m in conv.items():
            a = m["assistant_ppl"]
            lines.append(f"| {d} | {m['test_conversations']} | {a['base']:.2f} | {a['oracle']:.2f} | "
                         f"{a['routed']:.2f} | {m['routing_user_turns']:.1%} |")
    return "\n".join(lines).lstrip("\n")


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    timing = "\n".join(f"| {k} | {v:.1f} |" for k, v in _timing_rows(report).items())
    r = report["router"]
    summary = (f"; router accuracy {r['accuracy']:.1%} (macro-F1 {r['macro_f1']:.3f}, ECE {r['ece']:.3f})"
               if r else "")
    md = (f"# Temporal LoRA evaluation\n\nBase model: `{report['base_model']}`; router features: "
          f"`{report['router_features']}`{summary}.\n\n"
          f"Perplexity on held-out test documents:\n\n{markdown_tables(report)}\n\n"
          f"## Where the time went (seconds)\n\n| phase | seconds |\n|---|---:|\n{timing}\n")
    atomic_write_text(out_dir / "report.md", md)
    plot_report(report, out_dir)


def _timing_rows(report: dict) -> dict[str, float]:
    rows = dict(report["timing"])
    rows.update({f"demo total: {k}": v for k, v in report.get("demo_timing", {}).items()})
    return rows


def plot_report(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report["router"]:  # conversation domains only: the tables say it all
        return
    domains = report["domains"]
    conf = report["router"]["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2, 1.1 * len(domains) + 1.5))
    ax.imshow(conf, cmap="Blues")
    for i, row in enumerate(conf):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="black" if v < max(map(max, conf)) / 2 else "white")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true domain")
    ax.set_title(f"Router confusion ({report['router']['confusion_length']} tokens)")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=110)
    plt.close(fig)

    domains = [d for d in domains if d in report["perplexity"]["base"]]
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 2, 4))
    width = 0.2
    for i, strategy in enumerate(STRATEGIES):
        values = [report["perplexity"][strategy][d] for d in domains]
        ax.bar([x + (i - 1.5) * width for x in range(len(domains))], values, width, label=strategy)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.legend()
    ax.set_title("Perplexity per domain and strategy")
    fig.tight_layout()
    fig.savefig(out_dir / "perplexity.png", dpi=110)
    plt.close(fig)

    acc = report["router"]["accuracy_by_length"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([int(n) for n in acc], list(acc.values()), marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(n) for n in acc], list(acc))
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("router accuracy")
    ax.set_ylim(min(0.5, min(acc.values()) - 0.05), 1.01)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_by_length.png", dpi=110)
    plt.close(fig)
