"""`tlora`: a thin command line over the library, built from a command table.

`COMMANDS` (at the bottom) names every command: its one-line help, the function that runs it and its
arguments. A handler parses nothing itself: it calls one library function and prints. Flags that set
a library setting take their help from that setting's attribute docstring (the string under the
dataclass field, e.g. `SegmentConfig.smoothing`), read with `ast` when the parser is built, so the
settings class is where an option is documented. `tlora bench` hands its arguments to the
measurement lab (benchmarks/, beside the package in a repository checkout).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from temporal_lora.config import BUDGETS
from temporal_lora.corpora import DEFAULT_DOMAINS
from temporal_lora.errors import InputError, TemporalLoRAError

__all__ = ["COMMANDS", "DEFAULT_DOMAINS", "build_parser", "main"]


def _load(args):
    from temporal_lora.model import TemporalLoRA

    tl = TemporalLoRA.from_pretrained(args.bundle)
    if getattr(args, "abstain_threshold", None) is not None:
        tl.router_config.abstain_threshold = args.abstain_threshold
    return tl


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
    abstain, extra = args.abstain_threshold, {}
    if args.out_of_scope is not None:
        if abstain not in (None, "auto"):
            raise InputError("--out-of-scope texts choose the abstain threshold: use them with --abstain auto, "
                             "not a fixed number")
        abstain, extra["out_of_scope"] = "auto", _out_of_scope(args.out_of_scope)
    tl = train_bundle(_domains(args.domains), args.out, base=args.base, data=data, budget=args.budget,
                      seed=args.seed, router_features=args.router_features,
                      abstain_threshold=abstain, init=args.init, grounding=args.grounding, **extra)
    print(f"bundle written to {args.out} (domains: {', '.join(tl.domains)}; router: {tl.feature_spec})")


def _out_of_scope(path: Path) -> list[str]:
    """Texts no domain should answer: a .txt file (one per line) or JSONL with a 'text' field."""
    from temporal_lora.corpora.user import load_user_corpus

    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise InputError(f"--out-of-scope {path}: give a .txt file (one text per line) or a .jsonl file")
    texts = [doc.text for doc in load_user_corpus(path)]
    if not texts:
        raise InputError(f"--out-of-scope {path} has no texts")
    return texts


def abstain_value(text: str) -> float | str:
    """--abstain's value: 'auto' or a probability."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


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
    answer_flags = {"--arms": args.arms, "--max-new-tokens": args.max_new_tokens, "--limit": args.limit,
                    "--no-grounding": args.no_grounding or None}
    if args.questions is None and any(v is not None for v in answer_flags.values()):
        raise InputError(f"{', '.join(k for k, v in answer_flags.items() if v is not None)} go with --questions")
    if args.questions is not None:
        from temporal_lora import answers

        report = answers.evaluate_answers(
            _load(args), args.questions, args.out, arms=answers.DEFAULT_ARMS if args.arms is None else args.arms,
            max_new_tokens=answers.DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
            limit=args.limit, grounded=not args.no_grounding)
        print(answers.markdown_table(report))
        t = report["timing"]
        print(f"\nanswers written to {args.out}/answers.json and answers.md ({t['generated']} generated, "
              f"{t['reused']} reused, {t['seconds']:.0f} s)")
        return
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
        report = add_examples(args.bundle, args.domain, texts, weight=args.weight, base=args.base,
                              abstain=args.abstain)
    else:
        report = remove_examples(args.bundle, args.ids, domain=args.domain)
    report.pop("router_training", None)
    print(json.dumps(report))


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


def cmd_bench(args) -> int:
    # Pass the words after `bench` on as they are (a name, then that benchmark's own flags):
    # argparse would take a flag's value for the name.
    rest = list(args.argv)
    if not rest or (rest[0].startswith("-") and rest[0] not in ("-h", "--help", "-l", "--list")):
        rest = ["all", *rest]
    return lab().main(rest, prog="tlora bench")


def lab():
    """The measurement lab (the `benchmarks` package of a repository checkout), imported by name so
    that nothing in the installed package imports it; the working directory is searched too."""
    for attempt in range(2):
        try:
            module = importlib.import_module("benchmarks")
        except ModuleNotFoundError as exc:
            if exc.name != "benchmarks":
                raise
        else:
            if callable(getattr(module, "main", None)):
                return module
        if attempt == 0 and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
            sys.modules.pop("benchmarks", None)
        else:
            break
    raise InputError("tlora bench runs from a repository checkout: the benchmarks live beside the package in "
                     "benchmarks/; from the checkout's root run `tlora bench NAME` or `python -m benchmarks NAME`")


# ------------------------------------------------------------------------------------------ the command table
@dataclass(frozen=True)
class Doc:
    """Help text from a settings dataclass: the attribute docstring of field `name` of class `cls` in
    `module` (read from the source, so building the parser imports no model code)."""

    module: str
    cls: str
    name: str
    prefix: str = ""


@dataclass(frozen=True)
class Env:
    """A default read from the environment variable `name` when the parser is built."""

    name: str


@dataclass(frozen=True)
class Arg:
    """One argument: its names (a positional's name, or option strings) and add_argument's keywords,
    where `help` may be a Doc and `default` an Env."""

    names: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class OneOf:
    """A mutually exclusive group of arguments."""

    args: tuple[Arg, ...]
    required: bool = False


@dataclass(frozen=True)
class Command:
    """One command: its help, the handler that runs it (None for a sub-action, which its command's
    handler dispatches), its arguments and its sub-actions (`dest` names the chosen one)."""

    help: str
    run: Callable[[argparse.Namespace], int | None] | None = None
    args: tuple[Arg | OneOf, ...] = ()
    actions: dict[str, Command] = field(default_factory=dict, hash=False)
    dest: str = ""
    add_help: bool = True


def arg(*names: str, **kwargs: Any) -> Arg:
    return Arg(names, kwargs)


def setting(module: str, cls: str, name: str, *names: str, prefix: str = "", **kwargs: Any) -> Arg:
    """A flag for setting `cls.name` (default flag: --NAME with dashes); its help is the field's docstring."""
    return Arg(names or (f"--{name.replace('_', '-')}",), {**kwargs, "help": Doc(module, cls, name, prefix)})


@cache
def field_docs(module: str, cls: str) -> dict[str, str]:
    """{field: attribute docstring} of dataclass `cls` in `module`: the string literal right under
    each field, whitespace folded. Read with `ast`; the module is not imported."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"no source for {module}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {node.target.id: " ".join(after.value.value.split())
            for node, after in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)}


CONFIG, SEGMENTS = "temporal_lora.config", "temporal_lora.routing.segments"

# Arguments several commands share.
BUNDLE = arg("--bundle", required=True, type=Path)
BASE = arg("--base", default=None,
           help="base model: HF id, local dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
THRESHOLD = arg("--abstain-threshold", type=float, default=None, metavar="P",
                help="override the bundle's threshold: below this confidence the base model answers")
JSON_REPORT = arg("--json", action="store_true", help="print the report as JSON")
DATA_FILE = ("a folder (handbook .md/.txt, conversations .jsonl, questions.txt), a .txt file of short texts (one "
             "per line), or a JSONL file of documents ({'text': ...}), conversations ({'messages': [...]}) "
             "or answered questions ({'question', 'answer'})")


def budget(default: str | None, help: str | Doc = Doc(CONFIG, "TrainConfig", "budget")) -> Arg:
    return arg("--budget", default=default, choices=list(BUDGETS), help=help)


def seed(default: int | None, help: str | Doc = Doc(CONFIG, "TrainConfig", "seed")) -> Arg:
    return arg("--seed", type=int, default=default, help=help)


BUNDLE_BUDGET = "default: the bundle's budget"
BUNDLE_SEED = "default: the bundle's seed"

COMMANDS: dict[str, Command] = {
    "fetch": Command("download the default model and built-in corpora into the cache", cmd_fetch, (
        arg("--domains", default=DEFAULT_DOMAINS, help="built-in corpora to fetch (comma-separated)"),
        arg("--no-model", action="store_true", help="skip the base model"),
    )),
    "corpus": Command("write a built-in corpus as JSONL for --data: a domain's documents or built-in "
                      "conversations (django-faq)", cmd_corpus, (
        arg("name", help="a built-in domain (documents) or built-in conversations: django-faq"),
        arg("--out", required=True, type=Path, help="JSONL file to write"),
    )),
    "train": Command("train one adapter per domain plus the router; write a bundle", cmd_train, (
        arg("--domains", default=DEFAULT_DOMAINS, help="comma-separated domain names, in order"),
        arg("--out", required=True, type=Path, help="bundle directory to write"),
        BASE,
        arg("--data", action="append", default=[], metavar="NAME=PATH",
            help="a domain's data: a folder (a department's handbook as .md/.txt, answered conversations as "
                 ".jsonl, question lists as questions.txt: one per line), a .txt file of short texts (one per "
                 "line: requests, questions), or JSONL whose lines are documents ({'text': ...}), conversations "
                 "({'messages': [...]}, OpenAI/TRL format) or answered questions ({'question', 'answer'}) "
                 "(repeatable)"),
        setting(CONFIG, "TrainConfig", "grounding", default=None, choices=["auto", "on", "off"]),
        arg("--init", default="base", choices=["base", "shared"],
            help="shared: first one adapter on the union of the domains (a seed phase of the same number of "
                 "steps), then every domain's adapter starts from it (default: fresh LoRAs)"),
        budget("quick"),
        seed(0),
        setting(CONFIG, "RouterConfig", "features", "--router-features", default=None),
        arg("--abstain", "--abstain-threshold", dest="abstain_threshold", type=abstain_value, default=None,
            metavar="auto|P", help="confidence below which the base model answers: a number P (default 0: "
                                    "never), or auto: chosen on validation data (and --out-of-scope texts)"),
        arg("--out-of-scope", type=Path, default=None, metavar="FILE",
            help="texts no domain should answer (.txt, one per line, or JSONL with 'text'); implies --abstain auto"),
    )),
    "route": Command("route texts; one JSON object per input on stdout", cmd_route, (
        BUNDLE,
        arg("texts", nargs="*", metavar="TEXT"),
        arg("--jsonl", type=Path, help="read inputs from a JSONL file with a 'text' field"),
        THRESHOLD,
        arg("--segments", default=None, metavar="UNIT",
            help="route each text segment by segment: sentence, paragraph or tokens:K (with hysteresis)"),
        setting(SEGMENTS, "SegmentConfig", "smoothing", type=float, default=None, prefix="segment routing: "),
        setting(SEGMENTS, "SegmentConfig", "margin", type=float, default=None, prefix="segment routing: "),
        setting(SEGMENTS, "SegmentConfig", "confirm", type=int, default=None, prefix="segment routing: "),
        setting(SEGMENTS, "SegmentConfig", "min_confidence", type=float, default=None, prefix="segment routing: "),
        arg("--fallback-threshold", type=float, default=None, metavar="P",
            help="bundles with subdomains: sub-router confidence below which the parent adapter is used"),
    )),
    "generate": Command("generate with routed adapters; prints the text and its route", cmd_generate, (
        BUNDLE,
        arg("prompt", nargs="+", metavar="PROMPT"),
        arg("--mode", default="hard", choices=["hard", "soft", "topk"]),
        arg("--top-k", type=int, default=2),
        arg("--domain", default=None,
            help="force one domain's adapter ('base' for none; 'legal/plain' forces a domain and its style)"),
        arg("--style", default=None,
            help="answer style of the chosen domain (e.g. plain, formal; 'auto' reads the prompt's register; "
                 "'none' the domain's own adapter; default: the domain's default style)"),
        arg("--max-new-tokens", type=int, default=64),
        arg("--sample", action="store_true", help="sample instead of greedy decoding"),
        arg("--temperature", type=float, default=0.8),
        arg("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (small models loop)"),
        seed(0, help="sampling seed"),
        arg("--chat", action="store_true", help="wrap each prompt in the base model's chat template"),
        arg("--json", action="store_true", help="print JSON lines instead of text"),
        arg("--segments", default=None, metavar="tokens:K",
            help="re-route every K generated tokens and switch adapters there (greedy; hard or soft)"),
        THRESHOLD,
    )),
    "eval": Command("evaluate a bundle on its test documents (or its answers to --questions); write the report",
                    cmd_eval, (
        BUNDLE,
        arg("--out", required=True, type=Path),
        arg("--chunks", type=int, default=None, help="test chunks per domain for perplexity"),
        arg("--router-chunks", type=int, default=100, help="test chunks per domain for routing"),
        arg("--questions", default=None, metavar="FILE.jsonl|django-faq",
            help="evaluate answers instead: JSONL of {\"question\", \"domain\"?, \"answer\"?, \"facts\"?: [regex]}, "
                 "or django-faq (the built-in example: held-out Django FAQ questions); writes answers.json and "
                 "answers.md (a rerun reuses the finished answers)"),
        arg("--arms", default=None, metavar="ARMS",
            help="with --questions: comma-separated arms of base, routed, oracle (and routed:STYLE, oracle:STYLE "
                 "in bundles with styles; default base,routed,oracle)"),
        arg("--max-new-tokens", type=int, default=None, help="with --questions: tokens per answer (default 48)"),
        arg("--limit", type=int, default=None, metavar="N", help="with --questions: only the first N questions"),
        arg("--no-grounding", action="store_true",
            help="with --questions: answer from the adapters alone, without the grounded domains' passages"),
        THRESHOLD,
    )),
    "demo": Command("fetch, train (quick budget), evaluate and show samples", cmd_demo, (
        arg("--out", type=Path, default=Path("runs/demo")),
        budget("quick"),
        seed(0),
        arg("--domains", default=DEFAULT_DOMAINS),
        BASE,
    )),
    "add-domain": Command("train one more adapter, refit the router from its replay memory; new version",
                          cmd_add_domain, (
        BUNDLE,
        arg("--name", required=True, help="the new domain's name"),
        OneOf((arg("--data", type=Path, help=DATA_FILE),
               arg("--corpus", help="a built-in corpus (its name must equal --name)"))),
        arg("--init", default="base", choices=["base", "nearest", "blend"],
            help="where the new adapter starts: a fresh LoRA (default), the adapter of the old domain the router "
                 "finds closest, or the router-weighted blend of the old adapters"),
        budget(None, BUNDLE_BUDGET),
        seed(None, BUNDLE_SEED),
        JSON_REPORT,
    )),
    "add-subdomain": Command("train a subdomain adapter under a domain, refit its sub-router; new version",
                             cmd_add_subdomain, (
        BUNDLE,
        arg("--parent", required=True, help="the domain the subdomain belongs to"),
        arg("--name", required=True, help="the subdomain's name (routes show parent/name)"),
        OneOf((arg("--data", type=Path, help=DATA_FILE),
               arg("--corpus", help="a built-in subdomain (medical: case-reports, reviews, trials; "
                                    "literature: comedies, tragedies, histories); must equal --name")),
              required=True),
        arg("--init", default="parent", choices=["parent", "base"],
            help="start the adapter from the parent's adapter (default) or from scratch"),
        arg("--fallback-threshold", type=float, default=None, metavar="P",
            help="sub-router confidence below which the parent adapter is used (default 0.6)"),
        budget(None, BUNDLE_BUDGET),
        seed(None, BUNDLE_SEED),
        JSON_REPORT,
    )),
    "add-style": Command("train a DPO style adapter under a domain (e.g. legal/plain); new version", cmd_add_style, (
        BUNDLE,
        arg("--domain", required=True, help="the domain the style belongs to"),
        arg("--name", required=True, help="the style's name (requests use style=NAME or model DOMAIN/NAME)"),
        OneOf((arg("--preferences", type=Path, help="JSONL of {\"prompt\", \"chosen\", \"rejected\"} (TRL's format)"),
               arg("--reward", help="build pairs on-policy with a built-in reward: plain, formal or concise")),
              required=True),
        budget("quick"),
        seed(None, BUNDLE_SEED),
        arg("--default", action="store_true", help="make it the domain's default style"),
        JSON_REPORT,
    )),
    "examples": Command("route examples from the user: add/list/remove; the router is refit; new version",
                        cmd_examples, dest="examples_command", actions={
        "add": Command("add example texts for a domain and refit the router", args=(
            BUNDLE,
            arg("--domain", required=True, help="a domain, or none: out-of-scope texts (they set the abstain "
                                                "threshold in bundles with --abstain auto)"),
            arg("texts", nargs="*", metavar="TEXT"),
            arg("--jsonl", type=Path, help="JSONL with a 'text' field per line (and optional 'domain')"),
            arg("--weight", type=float, default=None, help="how many replay rows one example counts as (default 20)"),
            arg("--abstain", choices=["auto"], default=None,
                help="from now on choose the abstain threshold at every refit (in-scope validation rows + 'none' "
                     "examples)"),
            BASE,
        )),
        "list": Command("list the bundle's examples (JSON lines)", args=(BUNDLE,)),
        "remove": Command("remove examples by id (or all of --domain) and refit the router", args=(
            BUNDLE,
            arg("ids", nargs="*", metavar="ID"),
            arg("--domain", default=None, help="remove every example of this domain (none: the out-of-scope ones)"),
        )),
    }),
    "remove-domain": Command("drop one domain's adapter and refit the router; new version", cmd_remove_domain, (
        BUNDLE,
        arg("--name", required=True),
    )),
    "history": Command("list a bundle's versions", cmd_history, (
        BUNDLE,
        arg("--json", action="store_true"),
    )),
    "rollback": Command("restore an earlier version of a bundle (recorded as a new version)", cmd_rollback, (
        BUNDLE,
        arg("--to", required=True, type=int, metavar="V"),
    )),
    "bench": Command("measure against merging, sequential/multitask LoRA, Arrow, other routers (from a checkout; "
                     "`tlora bench --help` lists the benchmarks, `tlora bench NAME --help` their flags)", cmd_bench, (
        arg("name", nargs="?", default="all", metavar="NAME", help="a benchmark (default all: the comparison bench)"),
        arg("flags", nargs=argparse.REMAINDER, metavar="FLAGS", help="the benchmark's own flags"),
    ), add_help=False),
    "serve": Command("OpenAI-compatible HTTP server with automatic routing and a playground page", cmd_serve, (
        BUNDLE,
        arg("--host", default="127.0.0.1", help="address to bind (default loopback only)"),
        arg("--port", type=int, default=8000),
        arg("--api-key", default=Env("TLORA_API_KEY"),
            help="require 'Authorization: Bearer KEY' on /v1 (default: $TLORA_API_KEY; none = open)"),
        arg("--mode", default="hard", choices=["hard", "soft", "topk"], help="routing for model 'auto'"),
        arg("--max-prompt-tokens", type=int, default=2048),
        arg("--max-new-tokens", type=int, default=512, help="largest max_tokens a request may ask for"),
        arg("--max-body-bytes", type=int, default=1_000_000),
        arg("--max-concurrency", type=int, default=32, help="requests in progress before 429s"),
        arg("--max-batch", type=int, default=8, help="sequences decoded together"),
        arg("--engine", default="torch", choices=["torch", "llama-cpp", "auto"],
            help="local generation: torch (the reference), llama-cpp (pip install 'temporal-lora[cpu-engine]'; "
                 "Llama bases), auto = llama-cpp at --max-batch 1 when it can run the bundle, else torch"),
        arg("--engine-weights", default="f32", choices=["f32", "q8_0", "q4_1"],
            help="llama-cpp base weights: f32 = exact (ours, as GGUF); q8_0/q4_1 = faster, not exact"),
        arg("--engine-threads", type=int, default=1, help="llama-cpp CPU threads"),
        arg("--backend", default="local", choices=["local", "openai-compatible"],
            help="generate here, or forward to a multi-LoRA engine after routing"),
        arg("--backend-url", default=None, help="e.g. http://gpu-host:8001/v1 (vLLM, LoRAX, SGLang, tlora)"),
        arg("--backend-api-key", default=Env("TLORA_BACKEND_API_KEY"),
            help="the engine's API key (default: $TLORA_BACKEND_API_KEY)"),
        arg("--backend-base-model", default="base", help="the engine's name for the plain base model"),
        arg("--backend-lora-updates", default="vllm", choices=["vllm", "off"],
            help="after a reload, load new adapters into the engine with its /v1/load_lora_adapter "
                 "(vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), or not (off)"),
        arg("--reload-poll", type=float, default=2.0, metavar="SECONDS",
            help="check the bundle's manifest.json for a new version this often; 0 = only on "
                 "POST /admin/reload (default 2)"),
        arg("--runtime-lora-updates", action="store_true",
            help="offer vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (to act as the engine "
                 "of a forwarding front-end)"),
        THRESHOLD,
    )),
    "export": Command("export adapters for a multi-LoRA engine and print its serve command", cmd_export, (
        arg("target", choices=["vllm"]),
        BUNDLE,
        arg("--out", required=True, type=Path),
        arg("--port", type=int, default=8001, help="port in the printed vllm command"),
    )),
}


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    if isinstance(out.get("help"), Doc):
        doc = out["help"]
        out["help"] = doc.prefix + field_docs(doc.module, doc.cls)[doc.name]
    if isinstance(out.get("default"), Env):
        out["default"] = os.environ.get(out["default"].name)
    return out


def _add_command(parser: argparse.ArgumentParser, command: Command) -> None:
    for item in command.args:
        if isinstance(item, OneOf):
            group = parser.add_mutually_exclusive_group(required=item.required)
            for a in item.args:
                group.add_argument(*a.names, **_resolve(a.kwargs))
        else:
            parser.add_argument(*item.names, **_resolve(item.kwargs))
    if command.actions:
        sub = parser.add_subparsers(dest=command.dest, required=True, metavar="ACTION")
        for name, action in command.actions.items():
            _add_command(sub.add_parser(name, help=action.help, add_help=action.add_help), action)


def build_parser() -> argparse.ArgumentParser:
    """The `tlora` parser: one subcommand per entry of COMMANDS."""
    parser = argparse.ArgumentParser(prog="tlora", description=(
        "Temporal LoRA: one frozen base model, one LoRA adapter per domain, a router that picks or mixes them."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        _add_command(sub.add_parser(name, help=command.help, add_help=command.add_help), command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":
        args.argv = argv[1:]  # the command is always the first word: tlora has no options of its own
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Quieter library logs; our own progress bars and messages say what is happening.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A deprecation notice that PEFT/accelerate trigger inside transformers on every training run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        if args.command not in ("fetch", "bench"):  # fetch prints its own progress; elsewhere the load bar is noise
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        code = COMMANDS[args.command].run(args)
    except TemporalLoRAError as exc:
        print(f"tlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlora: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
