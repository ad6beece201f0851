"""`tlora demo`: fetch, train with the quick budget, evaluate, show routed samples, judge answers to the
Django FAQ's questions (`tlora eval --questions django-faq`) — on the default model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from temporal_lora.answers import evaluate_answers, markdown_table
from temporal_lora.backbone import default_model_dir
from temporal_lora.cache import atomic_write_text
from temporal_lora.config import RunContext
from temporal_lora.corpora import BUILTIN_DOMAINS, fetch_builtin
from temporal_lora.evaluate import evaluate_bundle, held_out_chunks, write_report
from temporal_lora.train import train_bundle

SAMPLE_PROMPT_TOKENS = 24
SAMPLE_NEW_TOKENS = 32
DEMO_ANSWER_TOKENS = 48  # the FAQ's answers are judged by token F1 against the reference


def run_demo(out: Path, *, domains: list[str], budget: str = "quick", seed: int = 0, base: str | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    out = Path(out)
    timing: dict[str, float] = {}
    start = t0 = time.perf_counter()
    console.rule("[bold]1/5 fetch: base model and corpora into the cache")
    fetch_builtin([d for d in domains if d in BUILTIN_DOMAINS])
    if base is None:
        console.print(f"base model: {default_model_dir()}")
    timing["fetch"] = time.perf_counter() - t0

    console.rule(f"[bold]2/5 train: one LoRA adapter per domain, then the router ({budget} budget)")
    t0 = time.perf_counter()
    tl = train_bundle(domains, out / "bundle", base=base, budget=budget, seed=seed,
                      run=RunContext(log=console.print))
    timing["train"] = time.perf_counter() - t0

    console.rule("[bold]3/5 evaluate on held-out test documents")
    t0 = time.perf_counter()
    report = evaluate_bundle(tl, None, seed=seed)
    timing["evaluate"] = time.perf_counter() - t0

    console.rule("[bold]4/5 routed generation: one mixed-domain batch")
    t0 = time.perf_counter()
    sets = held_out_chunks(tl, 1, seed=seed + 7)
    prompts = [tl.tokenizer.decode(sets[d][0][:SAMPLE_PROMPT_TOKENS]) for d in tl.domains]
    samples = [g.to_dict() | {"true_domain": d} for d, g in
               zip(tl.domains, tl.generate(prompts, mode="hard", max_new_tokens=SAMPLE_NEW_TOKENS,
                                                   repetition_penalty=1.3), strict=True)]
    timing["samples"] = time.perf_counter() - t0

    console.rule("[bold]5/5 answers: the Django FAQ's questions, base model / routed / right adapter forced")
    t0 = time.perf_counter()
    answers = evaluate_answers(tl, "django-faq", out / "answers", max_new_tokens=DEMO_ANSWER_TOKENS)
    timing["answers"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - start

    report["samples"] = samples
    report["answers"] = {"source": answers["source"], "summary": answers["summary"]["overall"]}
    report["demo_timing"] = {k: round(v, 1) for k, v in timing.items()}
    report_dir = out / "report"

    write_report(report, report_dir)
    atomic_write_text(report_dir / "samples.json", json.dumps(samples, indent=2))

    for s in samples:
        route = s["route"]
        console.print(f"[bold]{s['true_domain']}[/] -> routed to [bold green]{route['domain']}[/] "
                      f"(confidence {route['confidence']:.2f})")
        console.print(f"  [dim]{s['prompt']!r}[/]\n  -> {s['text']!r}")

    table = Table(title="Temporal LoRA demo: test perplexity (lower is better) and routing")
    for col in ("domain", "base", "oracle", "routed", "soft", "oracle vs base", "routed vs oracle"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    ppl = report["perplexity"]
    for d in tl.domains:
        table.add_row(d, f"{ppl['base'][d]:.2f}", f"{ppl['oracle'][d]:.2f}", f"{ppl['routed'][d]:.2f}",
                      f"{ppl['soft'][d]:.2f}", f"{report['relative_to_base'][d]:+.1%}",
                      f"{report['routed_vs_oracle'][d]:+.2%}")
    console.print(table)
    acc = report["router"]["accuracy_by_length"]
    console.print("router accuracy by prompt length: " + ", ".join(f"{n} tok {v:.1%}" for n, v in acc.items()))
    console.print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in report["demo_timing"].items()))
    console.print(f"answers to {answers['source']}:")
    console.print(markdown_table(answers))
    console.print(f"bundle: {out / 'bundle'}   report: {report_dir}/report.md (+ report.json, PNG plots)   "
                  f"answers: {out / 'answers'}/answers.md")
    return report
