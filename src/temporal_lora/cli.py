"""`tlora`: a thin command line over the library. Each command parses, calls one function, prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from temporal_lora.errors import TemporalLoRAError

DEFAULT_DOMAINS = "medical,legal,technical,code,literature"


def _add_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None,
                   help="base model: HF id, local dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")


def _add_threshold(p: argparse.ArgumentParser) -> None:
    p.add_argument("--abstain-threshold", type=float, default=None, metavar="P",
                   help="override the bundle's threshold: below this confidence the base model answers")


def _load(args):
    from temporal_lora.model import TemporalLoRA

    tl = TemporalLoRA.from_pretrained(args.bundle)
    if getattr(args, "abstain_threshold", None) is not None:
        tl.router_config.abstain_threshold = args.abstain_threshold
    return tl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlora", description=(
        "Temporal LoRA: one frozen base model, one LoRA adapter per domain, a router that picks or mixes them."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download the default model and built-in corpora into the cache")
    p.add_argument("--domains", default=DEFAULT_DOMAINS, help="built-in corpora to fetch (comma-separated)")
    p.add_argument("--no-model", action="store_true", help="skip the base model")

    p = sub.add_parser("corpus", help="write a built-in corpus as JSONL for --data: a domain's documents or "
                                      "built-in conversations (django-faq)")
    p.add_argument("name", help="a built-in domain (documents) or built-in conversations: django-faq")
    p.add_argument("--out", required=True, type=Path, help="JSONL file to write")

    p = sub.add_parser("train", help="train one adapter per domain plus the router; write a bundle")
    p.add_argument("--domains", default=DEFAULT_DOMAINS, help="comma-separated domain names, in order")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    _add_base(p)
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="corpus for a domain: folder of .txt/.md files, or JSONL whose lines are documents "
                        "({'text': ...}) and/or conversations ({'messages': [...]}, OpenAI/TRL format) (repeatable)")
    p.add_argument("--init", default="base", choices=["base", "shared"],
                   help="shared: first one adapter on the union of the domains (a seed phase of the same "
                        "number of steps), then every domain's adapter starts from it (default: fresh LoRAs)")
    p.add_argument("--budget", default="quick", choices=["quick", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router-features", default=None,
                   help="'embeddings', 'hidden:LAYER', 'hidden:L1,L2' or 'hidden:default' (the default: layers 8+12 of SmolLM2's 30)")
    p.add_argument("--abstain-threshold", type=float, default=None,
                   help="calibrated confidence below which the plain base model answers (default 0: never)")

    p = sub.add_parser("route", help="route texts; one JSON object per input on stdout")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--jsonl", type=Path, help="read inputs from a JSONL file with a 'text' field")
    _add_threshold(p)
    p.add_argument("--segments", default=None, metavar="UNIT",
                   help="route each text segment by segment: sentence, paragraph or tokens:K (with hysteresis)")
    p.add_argument("--smoothing", type=float, default=None, help="segment routing: weight of the newest segment")
    p.add_argument("--margin", type=float, default=None, help="segment routing: switching margin")
    p.add_argument("--confirm", type=int, default=None, help="segment routing: segments a challenger must lead")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="segment routing: a challenger counts only on segments it wins with at least this probability")
    p.add_argument("--fallback-threshold", type=float, default=None, metavar="P",
                   help="bundles with subdomains: sub-router confidence below which the parent adapter is used")

    p = sub.add_parser("generate", help="generate with routed adapters; prints the text and its route")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("prompt", nargs="+", metavar="PROMPT")
    p.add_argument("--mode", default="hard", choices=["hard", "soft", "topk"])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--domain", default=None, help="force one domain's adapter ('base' for none; 'legal/plain' "
                                                  "forces a domain and its style)")
    p.add_argument("--style", default=None, help="answer style of the chosen domain (e.g. plain, formal; 'auto' "
                                                 "reads the prompt's register; 'none' the domain's own adapter; "
                                                 "default: the domain's default style)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (small models loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the base model's chat template")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.add_argument("--segments", default=None, metavar="tokens:K",
                   help="re-route every K generated tokens and switch adapters there (greedy; hard or soft)")
    _add_threshold(p)

    p = sub.add_parser("eval", help="evaluate a bundle on its test documents; write the report")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--chunks", type=int, default=None, help="test chunks per domain for perplexity")
    p.add_argument("--router-chunks", type=int, default=100, help="test chunks per domain for routing")

    p = sub.add_parser("demo", help="fetch, train (quick budget), evaluate and show samples")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--budget", default="quick", choices=["quick", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domains", default=DEFAULT_DOMAINS)
    _add_base(p)

    p = sub.add_parser("add-domain", help="train one more adapter, refit the router from its replay memory; new version")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--name", required=True, help="the new domain's name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="folder of .txt/.md files, or a JSONL file of documents ({'text': ...}) and/or conversations ({'messages': [...]})")
    src.add_argument("--corpus", help="a built-in corpus (its name must equal --name)")
    p.add_argument("--init", default="base", choices=["base", "nearest", "blend"],
                   help="where the new adapter starts: a fresh LoRA (default), the adapter of the old domain the "
                        "router finds closest, or the router-weighted blend of the old adapters")
    p.add_argument("--budget", default=None, choices=["quick", "full"], help="default: the bundle's budget")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("add-subdomain", help="train a subdomain adapter under a domain, refit its sub-router; new version")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--parent", required=True, help="the domain the subdomain belongs to")
    p.add_argument("--name", required=True, help="the subdomain's name (routes show parent/name)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder of .txt/.md files, or a JSONL file of documents ({'text': ...}) and/or conversations ({'messages': [...]})")
    src.add_argument("--corpus", help="a built-in subdomain (medical: case-reports, reviews, trials; "
                                      "literature: comedies, tragedies, histories); must equal --name")
    p.add_argument("--init", default="parent", choices=["parent", "base"],
                   help="start the adapter from the parent's adapter (default) or from scratch")
    p.add_argument("--fallback-threshold", type=float, default=None, metavar="P",
                   help="sub-router confidence below which the parent adapter is used (default 0.6)")
    p.add_argument("--budget", default=None, choices=["quick", "full"], help="default: the bundle's budget")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("add-style", help="train a DPO style adapter under a domain (e.g. legal/plain); new version")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--domain", required=True, help="the domain the style belongs to")
    p.add_argument("--name", required=True, help="the style's name (requests use style=NAME or model DOMAIN/NAME)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preferences", type=Path, help="JSONL of {\"prompt\", \"chosen\", \"rejected\"} (TRL's format)")
    src.add_argument("--reward", help="build pairs on-policy with a built-in reward: plain, formal or concise")
    p.add_argument("--budget", default="quick", choices=["quick", "full"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--default", action="store_true", help="make it the domain's default style")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("examples", help="route examples from the user: add/list/remove; the router is refit; new version")
    ex = p.add_subparsers(dest="examples_command", required=True, metavar="ACTION")
    q = ex.add_parser("add", help="add example texts for a domain and refit the router")
    q.add_argument("--bundle", required=True, type=Path)
    q.add_argument("--domain", required=True)
    q.add_argument("texts", nargs="*", metavar="TEXT")
    q.add_argument("--jsonl", type=Path, help="JSONL with a 'text' field per line (and optional 'domain')")
    q.add_argument("--weight", type=float, default=None, help="how many replay rows one example counts as (default 20)")
    _add_base(q)
    q = ex.add_parser("list", help="list the bundle's examples (JSON lines)")
    q.add_argument("--bundle", required=True, type=Path)
    q = ex.add_parser("remove", help="remove examples by id (or all of --domain) and refit the router")
    q.add_argument("--bundle", required=True, type=Path)
    q.add_argument("ids", nargs="*", metavar="ID")
    q.add_argument("--domain", default=None)

    p = sub.add_parser("remove-domain", help="drop one domain's adapter and refit the router; new version")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--name", required=True)

    p = sub.add_parser("history", help="list a bundle's versions")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rollback", help="restore an earlier version of a bundle (recorded as a new version)")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--to", required=True, type=int, metavar="V")

    p = sub.add_parser("bench", help="measure against merging, sequential/multitask LoRA, Arrow, other routers")
    p.add_argument("what", nargs="?", default="all", choices=["all", "scaling", "crossover", "generalisation"],
                   help="all (default): the comparison bench; scaling: 2-16 domains vs multitask LoRA "
                        "(scaling.json, scaling.md, plots); crossover: routed vs multitask at 8/32/128 steps per "
                        "domain for each init (crossover.json, .md, .png; resumable, cache in --work, default "
                        "OUT/crossover-work); generalisation: router accuracy in-source, on "
                        "held-out sources and on questions (generalisation.json, generalisation.md)")
    p.add_argument("--work", type=Path, default=None,
                   help="generalisation: cached texts, features and phases (default OUT/work; resumable); "
                        "crossover: its cache (default OUT/crossover-work)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="bench.json, bench.md, plots (and work/)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle to measure (default: train one into OUT/work)")
    p.add_argument("--budget", default="quick", choices=["quick", "full"])
    p.add_argument("--steps", type=int, default=None,
                   help="scaling: training steps per domain (default: the budget's; the core quick recipe is 40)")
    p.add_argument("--init", default=None, choices=["base", "nearest", "blend"],
                   help="scaling: where each domain's adapter starts (default base)")
    _add_base(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with automatic routing and a playground page")
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TLORA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TLORA_API_KEY; none = open)")
    p.add_argument("--mode", default="hard", choices=["hard", "soft", "topk"], help="routing for model 'auto'")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--max-concurrency", type=int, default=32, help="requests in progress before 429s")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--engine", default="torch", choices=["torch", "llama-cpp", "auto"],
                   help="local generation: torch (the reference), llama-cpp (pip install "
                        "'temporal-lora[cpu-engine]'; Llama bases), auto = llama-cpp at --max-batch 1 when it can run the bundle, else torch")
    p.add_argument("--engine-weights", default="f32", choices=["f32", "q8_0", "q4_1"],
                   help="llama-cpp base weights: f32 = exact (ours, as GGUF); q8_0/q4_1 = faster, not exact")
    p.add_argument("--engine-threads", type=int, default=1, help="llama-cpp CPU threads")
    p.add_argument("--backend", default="local", choices=["local", "openai-compatible"],
                   help="generate here, or forward to a multi-LoRA engine after routing")
    p.add_argument("--backend-url", default=None, help="e.g. http://gpu-host:8001/v1 (vLLM, LoRAX, SGLang, tlora)")
    p.add_argument("--backend-api-key", default=os.environ.get("TLORA_BACKEND_API_KEY"))
    p.add_argument("--backend-base-model", default="base", help="the engine's name for the plain base model")
    p.add_argument("--backend-lora-updates", default="vllm", choices=["vllm", "off"],
                   help="after a reload, load new adapters into the engine with its /v1/load_lora_adapter "
                        "(vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), or not (off)")
    p.add_argument("--reload-poll", type=float, default=2.0, metavar="SECONDS",
                   help="check the bundle's manifest.json for a new version this often; 0 = only on "
                        "POST /admin/reload (default 2)")
    p.add_argument("--runtime-lora-updates", action="store_true",
                   help="offer vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (to act as the engine "
                        "of a forwarding front-end)")
    _add_threshold(p)

    p = sub.add_parser("export", help="export adapters for a multi-LoRA engine and print its serve command")
    p.add_argument("target", choices=["vllm"])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--port", type=int, default=8001, help="port in the printed vllm command")
    return parser


def _domains(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


def cmd_fetch(args) -> None:
    from temporal_lora.backbone import default_model_dir
    from temporal_lora.cache import cache_dir
    from temporal_lora.corpora import fetch_builtin
    from temporal_lora.corpora.sources import PRIMARY, load_source, sources_of

    for name, count in fetch_builtin(_domains(args.domains)).items():
        # The router's other training sources (held-out ones are the bench's, fetched there).
        extra = [f"{s.name} {len(load_source(s.name))}" for s in sources_of(name) if s.name != PRIMARY[name]]
        print(f"{name}: {count} documents" + (f" (router also reads: {', '.join(extra)})" if extra else ""))
    if not args.no_model:
        print(f"base model: {default_model_dir()}")
    print(f"cache: {cache_dir()}")


def cmd_corpus(args) -> None:
    from temporal_lora.conversations import write_corpus_jsonl

    kind, count = write_corpus_jsonl(args.name, args.out)
    print(f"{count} {kind} written to {args.out}")


def cmd_train(args) -> None:
    from temporal_lora.corpora import parse_data_spec
    from temporal_lora.train import train_bundle

    data = dict(parse_data_spec(spec) for spec in args.data)
    tl = train_bundle(_domains(args.domains), args.out, base=args.base, data=data, budget=args.budget,
                      seed=args.seed, router_features=args.router_features,
                      abstain_threshold=args.abstain_threshold, init=args.init)
    print(f"bundle written to {args.out} (domains: {', '.join(tl.domains)}; router: {tl.feature_spec})")


def cmd_route(args) -> None:
    from temporal_lora.corpora import read_jsonl_texts
    from temporal_lora.errors import InputError

    texts = list(args.texts) + (read_jsonl_texts(args.jsonl) if args.jsonl else [])
    if not texts:
        raise InputError("no input: give TEXT arguments or --jsonl FILE")
    segments = None
    if args.segments:
        from temporal_lora.routing.segments import SegmentConfig

        knobs = {k: v for k, v in (("smoothing", args.smoothing), ("margin", args.margin),
                                   ("confirm", args.confirm), ("min_confidence", args.min_confidence))
                 if v is not None}
        segments = SegmentConfig.parse(args.segments, **knobs)
    from temporal_lora.routing.decisions import route_texts

    # One JSON object per text: the decision, the subdomain below it (bundles with subdomains),
    # and with --segments the segment-by-segment routes; /v1/route answers the same.
    for row in route_texts(_load(args), texts, segments=segments, fallback_threshold=args.fallback_threshold):
        print(json.dumps(row))


def cmd_generate(args) -> None:
    tl = _load(args)
    if args.segments:
        from temporal_lora.errors import InputError
        from temporal_lora.routing.segments import SegmentConfig, generate_segmented

        cfg = SegmentConfig.parse(args.segments)
        if cfg.unit != "tokens" or args.mode == "topk" or args.domain or args.sample or args.chat:
            raise InputError("--segments takes tokens:K with greedy hard/soft routing (no --domain/--sample/--chat)")
        for prompt in args.prompt:
            out = generate_segmented(tl, prompt, cfg=cfg, max_new_tokens=args.max_new_tokens, mode=args.mode,
                                     repetition_penalty=args.repetition_penalty)
            if args.json:
                print(json.dumps(out))
            else:
                print("[routes: " + " | ".join(r["domain"] for r in out["routes"]) + "]")
                print(prompt + out["text"])
        return
    results = tl.generate(args.prompt, mode=args.mode, top_k=args.top_k, domain=args.domain,
                          max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                          chat=args.chat, seed=args.seed, style=args.style)
    for g in results:
        if args.json:
            print(json.dumps(g.to_dict()))
        else:
            used = ", ".join(f"{d}={w:.2f}" for d, w in g.weights.items() if w > 0) or "base model"
            style = f"; style: {g.style['style'] or 'none'}" if g.style else ""
            note = f" ({g.style['note']})" if g.style and g.style.get("note") else ""
            print(f"[route: {g.route.domain or 'abstained'} ({g.route.confidence:.2f}); adapters: {used}{style}{note}]")
            print(g.text if args.chat else g.prompt + g.text)


def cmd_eval(args) -> None:
    from temporal_lora.evaluate import evaluate_bundle, markdown_tables

    tl = _load(args)
    report = evaluate_bundle(tl, args.out, ppl_chunks=args.chunks, router_chunks=args.router_chunks)
    print(markdown_tables(report))
    print(f"\nreport written to {args.out}/report.json, report.md and PNG plots")


def cmd_demo(args) -> None:
    from temporal_lora.demo import run_demo

    run_demo(args.out, domains=_domains(args.domains), budget=args.budget, seed=args.seed, base=args.base)


def cmd_add_domain(args) -> None:
    from temporal_lora.evolve import add_domain

    report = add_domain(args.bundle, args.name, data=args.data, corpus=args.corpus, budget=args.budget,
                        seed=args.seed, init=args.init)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    t = report["timing"]
    print(f"version {report['version']}: added '{args.name}' (domains: {', '.join(report['domains'])}); "
          f"adapter {t['adapter']:.1f} s, router {t['router_total']:.1f} s; old adapters byte-identical")
    for d, before in report["old_domain_accuracy_before"].items():
        print(f"  router accuracy on {d} (validation features): {before:.2%} -> "
              f"{report['old_domain_accuracy_after'][d]:.2%}")


def cmd_add_subdomain(args) -> None:
    from temporal_lora.evolve import add_subdomain

    report = add_subdomain(args.bundle, args.parent, args.name, data=args.data, corpus=args.corpus,
                           budget=args.budget, seed=args.seed, init=args.init,
                           fallback_threshold=args.fallback_threshold)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    t = report["timing"]
    print(f"version {report['version']}: added '{args.parent}/{args.name}' (subdomains of {args.parent}: "
          f"{', '.join(report['children'])}); adapter {t['adapter']:.1f} s, router {t['router']:.1f} s; "
          f"other files byte-identical")
    acc = report["router_training"].get("calibration_accuracy_by_child")
    if acc:
        print("  sub-router accuracy (validation features): "
              + ", ".join(f"{c} {a:.2%}" for c, a in acc.items()))


def cmd_add_style(args) -> None:
    from temporal_lora.evolve import add_style

    report = add_style(args.bundle, args.domain, args.name, preferences=args.preferences, reward=args.reward,
                       budget=args.budget, seed=args.seed, make_default=args.default)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    t, tr = report["timing"], report["training"]
    print(f"version {report['version']}: added style '{report['route']}' ({tr['pairs']} pairs, {tr['steps']} DPO "
          f"steps, {report['seconds_total']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) +
          f"); final preference margin {tr['final_margin']}; other files byte-identical")


def cmd_remove_domain(args) -> None:
    from temporal_lora.evolve import remove_domain

    report = remove_domain(args.bundle, args.name)
    print(f"version {report['version']}: removed '{args.name}' (domains: {', '.join(report['domains'])})")


def cmd_history(args) -> None:
    from temporal_lora.versions import list_versions

    for row in list_versions(args.bundle):
        if args.json:
            print(json.dumps(row))
            continue
        what = row["change"] + "".join(f" {row[k]}" for k in ("domain", "to") if k in row)
        flag = " (current)" if row["current"] else ("" if row["stored"] else " (files not stored)")
        print(f"{row['version']:>3}  {row['time']}  {what:<28} {','.join(row['domains'])}{flag}")


def cmd_examples(args) -> None:
    from temporal_lora.evolve.examples import add_examples, list_examples, remove_examples

    if args.examples_command == "list":
        for item in list_examples(args.bundle):
            print(json.dumps(item, ensure_ascii=False))
        return
    if args.examples_command == "add":
        texts = list(args.texts)
        if args.jsonl is not None:
            from temporal_lora.corpora import read_jsonl_texts

            texts += read_jsonl_texts(args.jsonl)
        report = add_examples(args.bundle, args.domain, texts, weight=args.weight, base=args.base)
    else:
        report = remove_examples(args.bundle, args.ids, domain=args.domain)
    report.pop("router_training", None)
    print(json.dumps(report))


def cmd_bench(args) -> None:
    if args.what == "generalisation":
        from temporal_lora.bench.generalisation import run_generalisation

        run_generalisation(args.out, work=args.work, base=args.base, budget=args.budget)
        print((args.out / "generalisation.md").read_text(encoding="utf-8"))
        print(f"written to {args.out}/generalisation.json and generalisation.md")
        return
    if args.what == "crossover":
        from temporal_lora.bench.crossover import run_crossover

        if args.bundle is not None:
            from temporal_lora.errors import InputError

            raise InputError("bench crossover trains its own adapters; --bundle is not used")
        run_crossover(args.out, work=args.work, base=args.base, budget=args.budget)
        print((args.out / "crossover.md").read_text(encoding="utf-8"))
        print(f"written to {args.out}/crossover.json, crossover_detail.json, crossover.md and crossover.png")
        return
    if args.what == "scaling":
        from temporal_lora.bench.scaling import run_scaling

        if args.bundle is not None:
            from temporal_lora.errors import InputError

            raise InputError("bench scaling trains its own adapters; --bundle is not used")
        from dataclasses import replace

        from temporal_lora.bench.scaling import scaling_budget

        budget = scaling_budget(args.budget)
        budget = replace(budget, steps=args.steps or budget.steps, init=args.init or budget.init)
        run_scaling(args.out, base=args.base, budget=budget)
        print((args.out / "scaling.md").read_text(encoding="utf-8"))
        print(f"written to {args.out}/scaling.json, scaling.md and PNG plots")
        return
    from temporal_lora.bench import run_bench

    run_bench(args.out, bundle=args.bundle, base=args.base, budget=args.budget)
    print((args.out / "bench.md").read_text(encoding="utf-8"))
    print(f"written to {args.out}/bench.json, bench.md and PNG plots")


def cmd_rollback(args) -> None:
    from temporal_lora.versions import rollback

    manifest = rollback(args.bundle, args.to)
    print(f"version {manifest['version']}: restored version {args.to} (domains: {', '.join(manifest['domains'])})")


def cmd_serve(args) -> None:
    from temporal_lora.errors import InputError
    from temporal_lora.server import ServerSettings, serve

    if (args.backend == "openai-compatible") != bool(args.backend_url):
        raise InputError("--backend openai-compatible needs --backend-url (and --backend-url needs it)")
    settings = ServerSettings(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                              max_body_bytes=args.max_body_bytes, max_concurrency=args.max_concurrency,
                              max_batch=args.max_batch, routing_mode=args.mode, api_key=args.api_key,
                              backend_url=args.backend_url, backend_api_key=args.backend_api_key,
                              backend_base_model=args.backend_base_model,
                              backend_lora_updates=args.backend_lora_updates, reload_poll_s=args.reload_poll,
                              runtime_lora_updates=args.runtime_lora_updates, engine=args.engine,
                              engine_weights=args.engine_weights, engine_threads=args.engine_threads)
    if args.reload_poll < 0:
        raise InputError("--reload-poll must be 0 (off) or a number of seconds")
    if args.engine_weights != "f32" and args.engine != "torch" and args.max_batch > 1:
        # Measured (benchmarks/results/serve/engine_load.json): llama.cpp's quantised kernels round
        # differently with the number of sequences in a call.
        print(f"note: --engine-weights {args.engine_weights} is not batch-invariant: a request batched with "
              "others may get other tokens than alone; --max-batch 1 keeps each request equal to itself alone",
              file=sys.stderr)
    serve(args.bundle, host=args.host, port=args.port, settings=settings, abstain_threshold=args.abstain_threshold)


def cmd_export(args) -> None:
    from temporal_lora.export import export_vllm

    result = export_vllm(args.bundle, args.out, port=args.port)
    print(f"adapters written to {result['out']} (one PEFT folder per domain)")
    print("start the engine:")
    print(f"  {result['command']}")
    print("then route in front of it:")
    print(f"  {result['front']}")


COMMANDS = {"fetch": cmd_fetch, "corpus": cmd_corpus, "train": cmd_train, "route": cmd_route, "generate": cmd_generate,
            "eval": cmd_eval, "demo": cmd_demo, "add-domain": cmd_add_domain, "add-subdomain": cmd_add_subdomain,
            "add-style": cmd_add_style, "examples": cmd_examples,
            "remove-domain": cmd_remove_domain,
            "history": cmd_history, "rollback": cmd_rollback, "bench": cmd_bench,
            "serve": cmd_serve, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Quieter library logs; our own progress bars and messages say what is happening.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A deprecation notice that PEFT/accelerate trigger inside transformers on every training run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        if args.command != "fetch":  # fetch prints its own progress; elsewhere the load bar is noise
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        COMMANDS[args.command](args)
    except TemporalLoRAError as exc:
        print(f"tlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
