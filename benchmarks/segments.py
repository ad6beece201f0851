"""Segment routing with hysteresis on concatenations of real held-out documents.

Streams are built from a bundle's *test* documents (the hysteresis settings are chosen on
streams built the same way from its *validation* documents):

* A->B->A: three consecutive spans of `--piece` tokens from a test document of A, one of B, another of A;
* A->mix->A: the middle piece alternates blocks of `--piece/4` tokens from two other domains B and C;
* single-domain: `3 x --piece` consecutive tokens of one test document (counts flaps).

Metrics: switch-lag (tokens after the A->B boundary until B holds weight > 0.9 for 3 consecutive
segments), return-gap (the same for A after the B->A / mix->A boundary), flaps (switches on
single-domain text), and perplexity on the mixed streams for: the base model, the oracle adapter
per segment, segment routing (hard/soft, offline and causal), and whole-text routing (the router
reads the whole stream once; hard/soft). Writes segments.json, segments.md, segments_*.png.

    python -m benchmarks segments --bundle runs/demo/bundle --out runs/bench/time
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import pyplot
from benchmarks.flags import flag
from temporal_lora.corpora import load_domain
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.features import pool_prefixes, token_features
from temporal_lora.routing.segments import SegmentConfig, SegmentRouter, token_spans

HOLD, THRESHOLD = 3, 0.9


def doc_tokens(tl, domain: str, ids: set[str], min_tokens: int) -> list[list[int]]:
    docs = [d for d in load_domain(domain, {}) if d.id in ids]
    out = []
    for d in docs:
        toks = tl.tokenizer(d.text[:40_000], add_special_tokens=False)["input_ids"]
        if len(toks) >= min_tokens:
            out.append(toks)
    return out


def span(rng: random.Random, docs: list[list[int]], n: int) -> list[int]:
    doc = rng.choice(docs)
    start = rng.randrange(0, len(doc) - n + 1)
    return doc[start: start + n]


def build_streams(tl, split_key: str, piece: int, seed: int, reps: int) -> dict:
    splits = tl.info["data"]
    domains = tl.domains
    docs = {d: doc_tokens(tl, d, set(splits[d][split_key]), piece) for d in domains}
    long_docs = {d: doc_tokens(tl, d, set(splits[d][split_key]), 3 * piece) for d in domains}
    rng = random.Random(seed)
    block = piece // 4
    aba, amix, single = [], [], []
    for _ in range(reps):
        for a, b in itertools.permutations(domains, 2):
            ids = span(rng, docs[a], piece) + span(rng, docs[b], piece) + span(rng, docs[a], piece)
            truth = [a] * piece + [b] * piece + [a] * piece
            aba.append({"kind": "A->B->A", "a": a, "b": b, "ids": ids, "truth": truth, "boundaries": [piece, 2 * piece]})
        for a in domains:
            b, c = rng.sample([d for d in domains if d != a], 2)
            mid, mid_truth = [], []
            for k in range(4):
                dom = (b, c)[k % 2]
                mid += span(rng, docs[dom], block)
                mid_truth += [dom] * block
            ids = span(rng, docs[a], piece) + mid + span(rng, docs[a], piece)
            truth = [a] * piece + mid_truth + [a] * piece
            amix.append({"kind": "A->mix->A", "a": a, "b": f"{b}+{c}", "ids": ids, "truth": truth,
                         "boundaries": [piece, 2 * piece]})
    for d in domains:
        for doc in long_docs[d][: 4 * reps]:
            start = rng.randrange(0, len(doc) - 3 * piece + 1)
            single.append({"kind": "single", "a": d, "ids": doc[start: start + 3 * piece], "truth": [d] * 3 * piece})
    return {"A->B->A": aba, "A->mix->A": amix, "single": single}


def hold_position(weights: torch.Tensor, spans, domain_idx: int, after: int) -> int | None:
    """Token offset (from `after`) of the first of HOLD consecutive segments at/after `after` with weight > 0.9."""
    run = 0
    for j, (a, _b) in enumerate(spans):
        if a < after:
            continue
        run = run + 1 if float(weights[j, domain_idx]) > THRESHOLD else 0
        if run == HOLD:
            return spans[j - HOLD + 1][0] - after
    return None


def stream_metrics(tl, router: SegmentRouter, stream: dict, probs: torch.Tensor, spans, mode: str = "hard") -> dict:
    segs = router.decide(probs, spans)
    k = len(tl.domains)
    if mode == "hard":
        w = torch.zeros(len(segs), k)
        for j, s in enumerate(segs):
            w[j, tl.domains.index(s.domain)] = 1
    else:
        w = torch.tensor([s.smoothed for s in segs])
    out = {"switches": sum(s.switched for s in segs), "segments": len(segs)}
    if stream["kind"] != "single":
        b1, b2 = stream["boundaries"]
        a = tl.domains.index(stream["a"])
        if stream["kind"] == "A->B->A":
            lag = hold_position(w, [sp for sp in spans if sp[0] < b2], tl.domains.index(stream["b"]), b1)
            out["switch_lag"] = lag
        gap = hold_position(w, spans, a, b2)
        out["return_gap"] = gap
    else:
        truth = tl.domains.index(stream["a"])
        out["flaps"] = out["switches"]
        out["off_domain_segments"] = sum(tl.domains.index(s.domain) != truth for s in segs)
    return out


def summarise(rows: list[dict], piece: int) -> dict:
    def agg(key):
        vals = [r[key] for r in rows if key in r]
        if not vals:
            return None
        missed = sum(v is None for v in vals)
        got = sorted(v for v in vals if v is not None)
        return {"mean": round(sum(got) / max(1, len(got)), 1) if got else None,
                "median": got[len(got) // 2] if got else None, "max": max(got) if got else None,
                "missed": missed, "n": len(vals)}

    return {"switch_lag": agg("switch_lag"), "return_gap": agg("return_gap"),
            "flaps": sum(r.get("flaps", 0) for r in rows), "flapping_docs": sum(r.get("flaps", 0) > 0 for r in rows)}


def segment_probs_for(router: SegmentRouter, streams: dict, size: int) -> dict:
    out = {}
    for kind, items in streams.items():
        out[kind] = []
        for s in items:
            spans = token_spans(len(s["ids"]), size)
            out[kind].append((router.segment_probs(s["ids"], spans), spans))
    return out


def evaluate_config(tl, streams, probs_cache, cfg: SegmentConfig, piece: int, mode: str = "hard") -> dict:
    router = SegmentRouter(tl, cfg)
    result = {}
    for kind, items in streams.items():
        rows = [stream_metrics(tl, router, s, p, sp, mode) for s, (p, sp) in zip(items, probs_cache[kind], strict=True)]
        result[kind] = summarise(rows, piece)
    return result


@torch.no_grad()
def whole_text_probs(tl, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    with tl.mixer.weights(None):
        feats = token_features(tl.model, tl.feature_spec, x, mask)
    return tl.router(pool_prefixes(feats, mask))[0]


@torch.no_grad()
def stream_nll(tl, ids: list[int], weights: torch.Tensor) -> float:
    """Summed next-token NLL of one stream under per-token weights [n, k]."""
    x = torch.tensor([ids])
    with tl.mixer.weights(weights.unsqueeze(0)):
        logits = tl.model(input_ids=x, use_cache=False).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))


def perplexity_table(tl, streams: list[dict], cfg: SegmentConfig, strategies: tuple[str, ...] | None = None) -> dict:
    router = SegmentRouter(tl, cfg)
    k = len(tl.domains)
    wanted = strategies
    totals: dict[str, float] = {}
    tokens = 0
    per_stream = []
    for s in streams:
        ids, n = s["ids"], len(s["ids"])
        spans = token_spans(n, cfg.size)
        segs = router.decide(router.segment_probs(ids, spans), spans)
        oracle = torch.zeros(n, k)
        oracle[torch.arange(n), torch.tensor([tl.domains.index(t) for t in s["truth"]])] = 1
        whole = whole_text_probs(tl, ids)
        hard_whole = torch.zeros(k)
        hard_whole[int(whole.argmax())] = 1
        strategies = {
            "base": torch.zeros(n, k),
            "oracle per segment": oracle,
            "segment hard": router.token_weights(segs, n, "hard"),
            "segment soft": router.token_weights(segs, n, "soft"),
            "segment hard (causal)": router.token_weights(segs, n, "hard", causal=True),
            "whole-text hard": hard_whole.expand(n, k).clone(),
            "whole-text soft": whole.expand(n, k).clone(),
        }
        row = {"kind": s["kind"], "a": s["a"], "b": s.get("b")}
        for name, w in strategies.items():
            if wanted is not None and name not in wanted:
                continue
            nll = stream_nll(tl, ids, w)
            totals[name] = totals.get(name, 0.0) + nll
            row[name] = round(math.exp(nll / (n - 1)), 3)
        tokens += n - 1
        per_stream.append(row)
    ppl = {name: round(math.exp(v / tokens), 4) for name, v in totals.items()}
    oracle = ppl["oracle per segment"]
    return {"perplexity": ppl, "vs_oracle": {n: round(v / oracle - 1, 4) for n, v in ppl.items()},
            "tokens": tokens, "streams": len(streams), "per_stream": per_stream}


@dataclass
class SegmentsSettings:
    """The flags of `python -m benchmarks segments`."""

    bundle: Path = flag(Path("runs/demo/bundle"), "the bundle whose held-out documents make the streams")
    out: Path = flag(Path("runs/bench/time"), "segments.json, .md, segments_weights.png (--sweep-test: segments_sweep.*)")
    piece: int = flag(256, "tokens per piece of a stream")
    reps: int = flag(1, "streams per domain pair")
    sizes: str = flag("16,32,64", "segment sizes in tokens, comma-separated")
    ppl_streams: int = flag(25, "mixed streams scored for perplexity")
    sweep_test: bool = flag(False, "instead: every smoothing/margin setting on the test streams (hard routing), and "
                            "perplexity for --ppl-config on --ppl-streams mixed streams")
    ppl_config: str = flag("32,1.0,0.0,2", "size,smoothing,margin,confirm for --sweep-test perplexity")


def run(settings: SegmentsSettings) -> dict:
    """Choose hysteresis on validation streams, measure on test streams (or only the sweep),
    print the table; returns what segments.json (segments_sweep.json) holds."""
    settings.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tl = TemporalLoRA.from_pretrained(settings.bundle)
    if settings.sweep_test:
        return sweep_test(tl, settings)
    sizes = [int(s) for s in settings.sizes.split(",")]
    grid = [(sm, mg) for sm in (1.0, 0.7, 0.5) for mg in (0.0, 0.1, 0.2, 0.4)]

    # 1. choose smoothing/margin per segment size on validation streams (zero flaps first, then lag)
    val = build_streams(tl, "val_ids", settings.piece, seed=1, reps=settings.reps)
    test = build_streams(tl, "test_ids", settings.piece, seed=2, reps=settings.reps)
    sweep, chosen = [], {}
    for size in sizes:
        val_probs = segment_probs_for(SegmentRouter(tl, SegmentConfig(size=size)), val, size)
        best = None
        for sm, mg in grid:
            r = evaluate_config(tl, val, val_probs, SegmentConfig(size=size, smoothing=sm, margin=mg), settings.piece)
            lag = r["A->B->A"]["switch_lag"]
            gap = r["A->mix->A"]["return_gap"]
            score = (r["single"]["flaps"], lag["missed"] + gap["missed"], (lag["mean"] or 0) + (gap["mean"] or 0))
            sweep.append({"size": size, "smoothing": sm, "margin": mg, "val": r, "score": list(score)})
            if best is None or score < best[0]:
                best = (score, sm, mg)
        chosen[size] = {"smoothing": best[1], "margin": best[2]}
        print(f"size {size}: chose smoothing={best[1]} margin={best[2]} (val score {best[0]})", flush=True)

    # 2. report on test streams with the chosen settings (and without hysteresis, for contrast)
    results = {}
    for size in sizes:
        test_probs = segment_probs_for(SegmentRouter(tl, SegmentConfig(size=size)), test, size)
        c = chosen[size]
        results[size] = {
            "chosen": c,
            "hard": evaluate_config(tl, test, test_probs, SegmentConfig(size=size, **c), settings.piece),
            "soft": evaluate_config(tl, test, test_probs, SegmentConfig(size=size, **c), settings.piece, mode="soft"),
            "no_hysteresis": evaluate_config(tl, test, test_probs, SegmentConfig(size=size, smoothing=1.0, margin=0.0),
                                             settings.piece),
        }
    main_size = 32 if 32 in sizes else sizes[0]
    cfg = SegmentConfig(size=main_size, **chosen[main_size])

    # 3. perplexity on mixed test streams and on single-domain streams (soft vs hard)
    t0 = time.perf_counter()
    rng = random.Random(3)
    mixed = test["A->B->A"] + test["A->mix->A"]
    mixed = rng.sample(mixed, min(settings.ppl_streams, len(mixed)))
    ppl = {"mixed": perplexity_table(tl, mixed, cfg),
           "A->B->A": None, "A->mix->A": None,
           "single": perplexity_table(tl, list({s["a"]: s for s in reversed(test["single"])}.values()), cfg)}
    for kind in ("A->B->A", "A->mix->A"):
        rows = [r for r in ppl["mixed"]["per_stream"] if r["kind"] == kind]
        ppl[kind] = {name: round(sum(r[name] for r in rows) / len(rows), 3) for name in ppl["mixed"]["perplexity"]}
    ppl_seconds = time.perf_counter() - t0

    result = {"bundle": str(settings.bundle), "domains": tl.domains, "piece_tokens": settings.piece, "sizes": sizes,
              "hold": HOLD, "threshold": THRESHOLD, "chosen": chosen, "test": results, "sweep": sweep,
              "perplexity_config": {"size": main_size, **chosen[main_size]}, "perplexity": ppl,
              "streams": {k: len(v) for k, v in test.items()},
              "seconds": {"perplexity": round(ppl_seconds, 1), "total": round(time.perf_counter() - t_start, 1)}}
    (settings.out / "segments.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (settings.out / "segments.md").write_text(md)
    plot_weights(tl, test, cfg, settings.out)
    print(md)
    return result


GRID = [(sm, mg, cf) for cf in (1, 2) for sm in (1.0, 0.7, 0.5) for mg in (0.0, 0.1, 0.2, 0.4)]


def sweep_test(tl, args: SegmentsSettings) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    test = build_streams(tl, "test_ids", args.piece, seed=2, reps=args.reps)  # the same streams as main()
    rows = []
    for size in sizes:
        probs = segment_probs_for(SegmentRouter(tl, SegmentConfig(size=size)), test, size)
        for sm, mg, cf in GRID:
            r = evaluate_config(tl, test, probs, SegmentConfig(size=size, smoothing=sm, margin=mg, confirm=cf),
                                args.piece)
            rows.append({"size": size, "smoothing": sm, "margin": mg, "confirm": cf, "test": r})
    size, sm, mg, cf = args.ppl_config.split(",")
    cfg = SegmentConfig(size=int(size), smoothing=float(sm), margin=float(mg), confirm=int(cf))
    rng = random.Random(3)
    mixed = rng.sample(test["A->B->A"] + test["A->mix->A"], min(args.ppl_streams, 25))
    ppl = perplexity_table(tl, mixed, cfg, strategies=("oracle per segment", "segment hard", "segment soft",
                                                       "segment hard (causal)"))
    result = {"bundle": str(args.bundle), "streams": {k: len(v) for k, v in test.items()}, "sweep": rows,
              "perplexity_config": {"size": cfg.size, "smoothing": cfg.smoothing, "margin": cfg.margin,
                                    "confirm": cfg.confirm},
              "perplexity": ppl}
    (args.out / "segments_sweep.json").write_text(json.dumps(result, indent=2))
    lines = ["| segment | smoothing | margin | confirm | A->B->A switch-lag | A->B->A return-gap | A->mix->A return-gap "
             "| flaps (docs flapping) |", "|---|---:|---:|---:|---|---|---|---|"]
    for row in rows:
        t = row["test"]
        lines.append(f"| {row['size']} tokens | {row['smoothing']} | {row['margin']} | {row['confirm']} | "
                     f"{lag_cell(t['A->B->A']['switch_lag'])} | {lag_cell(t['A->B->A']['return_gap'])} | "
                     f"{lag_cell(t['A->mix->A']['return_gap'])} | {t['single']['flaps']} "
                     f"({t['single']['flapping_docs']}/{result['streams']['single']}) |")
    lines += ["", f"Perplexity with segments of {cfg.size} tokens, smoothing {cfg.smoothing}, margin {cfg.margin}, "
              f"confirm {cfg.confirm} "
              f"({ppl['streams']} mixed streams, {ppl['tokens']} tokens):", "", "| strategy | perplexity | vs oracle |",
              "|---|---:|---:|"]
    lines += [f"| {n} | {v:.3f} | {ppl['vs_oracle'][n]:+.2%} |" for n, v in ppl["perplexity"].items()]
    (args.out / "segments_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def lag_cell(x: dict | None) -> str:
    if not x:
        return "-"
    miss = f", {x['missed']} missed" if x["missed"] else ""
    return f"{x['mean']} / {x['max']}{miss}"


def markdown(r: dict) -> str:
    lines = [f"Streams from held-out test documents: {r['streams']} (pieces of {r['piece_tokens']} tokens). "
             f"Lag = tokens after the boundary until the new domain holds weight > {r['threshold']} for "
             f"{r['hold']} consecutive segments (mean / max over streams).", "",
             "| segment | smoothing, margin (chosen on val) | routing | A->B->A switch-lag | A->B->A return-gap "
             "| A->mix->A return-gap | flaps on single-domain docs (docs flapping) |",
             "|---|---|---|---|---|---|---|"]
    for size, res in r["test"].items():
        c = res["chosen"]
        for label, key in (("hard", "hard"), ("soft", "soft"), ("hard, no hysteresis", "no_hysteresis")):
            t = res[key]
            hyst = f"{c['smoothing']}, {c['margin']}" if key != "no_hysteresis" else "1.0, 0.0"
            lines.append(f"| {size} tokens | {hyst} | {label} | {lag_cell(t['A->B->A']['switch_lag'])} | "
                         f"{lag_cell(t['A->B->A']['return_gap'])} | {lag_cell(t['A->mix->A']['return_gap'])} | "
                         f"{t['single']['flaps']} ({t['single']['flapping_docs']}/{r['streams']['single']}) |")
    p = r["perplexity"]
    names = list(p["mixed"]["perplexity"])
    lines += ["", f"Perplexity (segments of {r['perplexity_config']['size']} tokens; "
              f"{p['mixed']['streams']} mixed streams, {p['mixed']['tokens']} tokens; "
              f"{p['single']['streams']} single-domain streams):", "",
              "| strategy | mixed streams | vs oracle | A->B->A (mean) | A->mix->A (mean) | single-domain | vs oracle |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        lines.append(f"| {n} | {p['mixed']['perplexity'][n]:.3f} | {p['mixed']['vs_oracle'][n]:+.2%} | "
                     f"{p['A->B->A'][n]:.3f} | {p['A->mix->A'][n]:.3f} | {p['single']['perplexity'][n]:.3f} | "
                     f"{p['single']['vs_oracle'][n]:+.2%} |")
    return "\n".join(lines) + "\n"


def plot_weights(tl, streams: dict, cfg: SegmentConfig, out: Path) -> None:
    plt = pyplot()

    router = SegmentRouter(tl, cfg)
    examples = [streams["A->B->A"][1], streams["A->mix->A"][0], streams["single"][0]]
    fig, axes = plt.subplots(len(examples), 1, figsize=(11, 2.6 * len(examples)), sharex=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, s in zip(axes, examples, strict=True):
        ids = s["ids"]
        spans = token_spans(len(ids), cfg.size)
        segs = router.decide(router.segment_probs(ids, spans), spans)
        xs = [sp[0] for sp in spans] + [len(ids)]
        for i, d in enumerate(tl.domains):
            raw = [seg.probs[i] for seg in segs]
            sm = [seg.smoothed[i] for seg in segs]
            ax.step(xs, sm + sm[-1:], where="post", color=colors[i], label=f"{d} (smoothed)")
            ax.plot([(a + b) / 2 for a, b in spans], raw, ".", color=colors[i], alpha=0.5)
        active = [tl.domains.index(seg.domain) for seg in segs]
        for (a, b), idx in zip(spans, active, strict=True):
            ax.axvspan(a, b, ymin=0, ymax=0.04, color=colors[idx], alpha=0.9)
        for b in s.get("boundaries", []):
            ax.axvline(b, color="black", ls="--", lw=1)
        truth = f"{s['a']} -> {s['b']} -> {s['a']}" if s.get("b") else s["a"]
        ax.set_title(f"{s['kind']}: {truth}  (dots: raw segment probabilities; bottom bar: active adapter)", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("weight")
    axes[-1].set_xlabel(f"token position (segments of {cfg.size} tokens)")
    axes[0].legend(fontsize=7, ncol=len(tl.domains), loc="upper center", bbox_to_anchor=(0.5, 1.45))
    fig.tight_layout()
    fig.savefig(out / "segments_weights.png", dpi=110)
    plt.close(fig)


