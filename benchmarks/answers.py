"""Answers judged by what they state (issue 27): a department chatbot trained from the data a department
has, asked questions worded differently from its training ones.

Two examples, each trained once per *lever* (a bundle per lever, quick budget unless `--budget`):

- `kestrel`: the worked example of the README (examples/kestrel: a fictional company's HR, IT and
  finance departments, each a folder with a handbook, ~25 answered conversations and a question
  list). Questions: 30 held-out paraphrases (eval/*.heldout.jsonl), the first question of 24
  training conversations verbatim (eval/*.training.jsonl), and 10 off-topic ones (eval/off-topic.jsonl,
  no department). Scored by fact recall: every fact regex found in the answer.
- `django-faq`: the public example. A `technical` department whose folder holds Django's documents
  (the built-in technical corpus, which never contains the FAQ) and 60% of Django's FAQ as answered
  conversations, beside the built-in `code` and `legal` domains; the other 40% of the FAQ are the
  held-out questions. The FAQ has reference answers, not fact lists: scored by token F1.

Levers: `adapters` (grounding off: the adapter learns the handbook and the conversations, as before
this issue), `grounded` (the default: per-department FTS5 passages in the prompt, the adapter trained
on prompts of that shape), `grounded+written` (also questions the base model wrote from the handbook's
fact sentences and rewordings of the training questions, synthesis.py). Arms per question set: base
(no adapter, no passages), routed, oracle.

Everything resumes: bundles, answer caches (`tlora eval`'s) and finished phases live under `--work`.
Writes answers.json and answers.md to `--out`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.common import Phases, check_recipe, hardware
from benchmarks.flags import flag
from temporal_lora.answers import evaluate_answers, num, pct
from temporal_lora.cache import atomic_write_text
from temporal_lora.config import budget_config
from temporal_lora.conversations import (
    builtin_conversations,
    conversation_record,
    split_conversations,
)
from temporal_lora.corpora import load_builtin
from temporal_lora.model import TemporalLoRA
from temporal_lora.train import train_bundle

KESTREL = Path("examples/kestrel")
DEPARTMENTS = ("hr", "it", "finance")
# Each lever is a bundle trained with these settings over the budget's preset.
LEVERS = {"adapters": {"grounding": "off"},
          "grounded": {"grounding": "auto", "synthetic_questions": 0, "paraphrase_questions": False},
          "grounded+written": {"grounding": "auto", "synthetic_questions": 64, "paraphrase_questions": True}}
KEPT = "grounded+written"  # the default recipe (TrainConfig's defaults)
ARMS = "base,routed,oracle"
FAQ_TEST_FRAC = 0.4
FAQ_DOMAINS = ("technical", "code", "legal")
GOALS = {"held_out_routed": 0.70, "routed_vs_oracle": 0.05, "training_routed": 0.90}


@dataclass
class AnswersSettings:
    """The flags of `python -m benchmarks answers`."""

    examples: tuple[str, ...] = flag(("kestrel", "django-faq"), "which examples to run",
                                     choices=("kestrel", "django-faq"))
    levers: tuple[str, ...] = flag(tuple(LEVERS), "which levers to train and ask", choices=tuple(LEVERS))
    budget: str = flag("quick", "training budget of every bundle", choices=("quick", "full"))
    seed: int = flag(0, "seed of the bundles and of the FAQ's held-out share")
    max_new_tokens: int = flag(48, "tokens per answer (greedy)")
    work: Path = flag(Path("runs/answers"), "bundles, answer caches, phases (resume point)")
    out: Path = flag(Path("benchmarks/results/answers"), "answers.json, answers.md")


# ------------------------------------------------------------------------------------------ examples
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def kestrel_example(root: Path = KESTREL) -> tuple[dict[str, Path], list[str], dict[str, list[dict]]]:
    """(data folders, domains, question sets) of the worked example (its out-of-scope training texts:
    `out_of_scope`)."""
    sets = {"held_out": [q for d in DEPARTMENTS for q in read_jsonl(root / "eval" / f"{d}.heldout.jsonl")],
            "training": [q for d in DEPARTMENTS for q in read_jsonl(root / "eval" / f"{d}.training.jsonl")],
            "off_topic": read_jsonl(root / "eval" / "off-topic.jsonl")}
    return {d: root / d for d in DEPARTMENTS}, list(DEPARTMENTS), sets


def out_of_scope(example: str) -> list[str]:
    """Texts no department should answer, which choose the abstain threshold (`--out-of-scope`): the
    worked example has them, the public one does not (its bundle never abstains)."""
    if example != "kestrel":
        return []
    return [line.strip() for line in (KESTREL / "out-of-scope.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def faq_example(work: Path, seed: int) -> tuple[dict[str, Path], list[str], dict[str, list[dict]]]:
    """The public example: a `technical` folder of Django's documents and 60% of the FAQ as answered
    conversations; the other 40% as held-out questions with their reference answers."""
    folder = work / "data" / "technical"
    convs = builtin_conversations("django-faq")
    sp = split_conversations(convs, seed, "django-faq", val_frac=0.0, test_frac=FAQ_TEST_FRAC)
    held = sp.val + sp.test
    if not (folder / "faq.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        docs = load_builtin("technical")
        atomic_write_text(folder / "documents.jsonl", "".join(
            json.dumps({"id": d.id, "text": d.text, "group": d.group}, ensure_ascii=False) + "\n" for d in docs))
        atomic_write_text(folder / "faq.jsonl", "".join(
            json.dumps(conversation_record(c), ensure_ascii=False) + "\n" for c in sp.train))
    return {"technical": folder}, list(FAQ_DOMAINS), {"held_out": _faq_questions(held),
                                                      "training": _faq_questions(sp.train)}


def _faq_questions(convs) -> list[dict]:
    """Questions with the FAQ's reference answers; ids made unique (two FAQ headings share a slug)."""
    out, seen = [], set()
    for c in convs:
        qid = c.id if c.id not in seen else f"{c.id}#{len(out)}"
        seen.add(qid)
        out.append({"id": qid, "question": _first(c, "user"), "domain": "technical", "answer": _first(c, "assistant")})
    return out


def _first(conv, role: str) -> str:
    return next(m["content"] for m in conv.messages if m["role"] == role)


def taught(bundle: TemporalLoRA, data: dict[str, Path], questions: list[dict]) -> list[dict]:
    """The training questions whose conversation is in its domain's training split (the bundle holds
    some conversations out for validation and test: those it was never taught)."""
    from temporal_lora.conversations import load_user_texts

    held = {f"{d}:{cid}" for d, info in bundle.info.get("data", {}).items()
            for cid in (info.get("conversations") or {}).get("val_ids", []) +
            (info.get("conversations") or {}).get("test_ids", [])}
    first = {}
    for domain, path in data.items():
        for conv in load_user_texts(path)[1]:
            first.setdefault((domain, _first(conv, "user")), f"{domain}:{conv.id}")
    return [q for q in questions if first.get((q["domain"], q["question"])) not in held
            and (q["domain"], q["question"]) in first]


# ------------------------------------------------------------------------------------------ the run
def summary_of(report: dict) -> dict:
    overall = report["summary"]["overall"]
    arms = overall["arms"]
    return {"questions": overall["questions"], "routing": overall["routing"]["accuracy"],
            "abstained": overall["routing"]["abstained"],
            "fact_recall": {a: arms[a]["fact_recall"] for a in arms},
            "token_f1": {a: arms[a]["token_f1"] for a in arms},
            "by_domain": {d: {"routing": g["routing"]["accuracy"],
                              "fact_recall": {a: g["arms"][a]["fact_recall"] for a in g["arms"]}}
                          for d, g in report["summary"]["by_domain"].items()}}


def run_lever(settings: AnswersSettings, phases: Phases, example: str, lever: str, data: dict[str, Path],
              domains: list[str], sets: dict[str, list[dict]]) -> dict:
    """Train (or reuse) one lever's bundle of an example and ask it every question set."""
    work = settings.work / example / lever
    bundle = work / "bundle"

    def trained() -> dict:
        t0 = time.perf_counter()
        if not (bundle / "manifest.json").is_file():
            cfg = replace(budget_config(settings.budget, settings.seed), **LEVERS[lever])
            texts = out_of_scope(example)
            train_bundle(domains, bundle, data=data, config=cfg, out_of_scope=texts or None,
                         abstain_threshold="auto" if texts else None)
        return {"seconds": round(time.perf_counter() - t0, 1)}

    entry = {"train_seconds": phases.run(f"{example}/{lever}/train", trained)["seconds"]}
    loaded: list[TemporalLoRA] = []
    # A bundle that abstains is also asked its held-out questions with abstention off: what the
    # threshold costs the routed answers.
    asks = [(name, questions, None) for name, questions in sets.items()]
    asks += [("held_out_no_abstain", sets["held_out"], 0.0)] if out_of_scope(example) else []
    for name, questions, threshold in asks:
        def asked(name: str = name, questions: list[dict] = questions, threshold: float | None = threshold) -> dict:
            if not loaded:
                loaded.append(TemporalLoRA.from_pretrained(bundle))
            tl = loaded[0]
            kept = tl.router_config.abstain_threshold
            if threshold is not None:
                tl.router_config.abstain_threshold = threshold
            chosen = taught(tl, data, questions) if name == "training" else questions
            try:
                report = evaluate_answers(tl, chosen, work / name, arms=ARMS, max_new_tokens=settings.max_new_tokens)
            finally:
                tl.router_config.abstain_threshold = kept
            return summary_of(report) | {"eval_seconds": report["timing"]["seconds"], "abstain_threshold": (
                kept if threshold is None else threshold), "generated": report["timing"]["generated"],
                                         "of_given": len(questions)}
        entry[name] = phases.run(f"{example}/{lever}/{name}", asked)
    return entry


def retrieval_signal(data: dict[str, Path], sets: dict[str, list[dict]], oos: list[str]) -> dict:
    """Measured, not wired in: the departments' passage indexes as a router and as an out-of-scope
    signal. Route each question to the department whose index gives its best passage the highest
    BM25 score; report that accuracy and the best score's spread per question set."""
    import statistics

    from temporal_lora.config import TrainConfig
    from temporal_lora.train import grounding_index, load_domain_data

    cfg = replace(TrainConfig(), synthetic_questions=0, paraphrase_questions=False)
    indexes = {d: grounding_index(load_domain_data(d, data, cfg.seed), cfg, True) for d in data}

    def best(text: str) -> dict[str, float]:
        return {d: max((h.score for h in index.search(text, 1)), default=0.0) for d, index in indexes.items()}

    out = {}
    for name, texts, domains in [*((n, [q["question"] for q in qs], [q.get("domain") for q in qs])
                                   for n, qs in sets.items()), ("out_of_scope_training", oos, [None] * len(oos))]:
        scores = [best(t) for t in texts]
        tops = sorted(max(s.values()) for s in scores)
        routed = [max(s, key=s.get) for s in scores]
        labelled = [(r, d) for r, d in zip(routed, domains, strict=True) if d]
        out[name] = {"questions": len(texts),
                     "routing_accuracy": round(sum(r == d for r, d in labelled) / len(labelled), 4) if labelled else None,
                     "best_score": {"min": round(tops[0], 2), "median": round(statistics.median(tops), 2),
                                    "max": round(tops[-1], 2)}}
    return out


def timed_eval(settings: AnswersSettings, work: Path, data: dict[str, Path], sets: dict[str, list[dict]]) -> dict:
    """`tlora eval --questions` on 100 questions from nothing (a fresh answer cache), on the kept
    lever's bundle: the held-out, training and off-topic questions, then the departments' question lists."""
    import shutil

    listed = [{"id": f"{d}:{i}", "question": line.strip(), "domain": d}
              for d, folder in data.items()
              for i, line in enumerate((folder / "questions.txt").read_text(encoding="utf-8").splitlines())
              if line.strip()]
    questions = (sets["held_out"] + sets["training"] + sets["off_topic"] + listed)[:100]
    out = work / "eval-100"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    tl = TemporalLoRA.from_pretrained(work / "bundle")
    report = evaluate_answers(tl, questions, out, arms=ARMS, max_new_tokens=settings.max_new_tokens)
    return {"questions": len(questions), "arms": ARMS, "generated": report["timing"]["generated"],
            "seconds_with_loading": round(time.perf_counter() - t0, 1), "seconds": report["timing"]["seconds"]}


def run(settings: AnswersSettings) -> dict:
    settings.work.mkdir(parents=True, exist_ok=True)
    check_recipe(settings.work, {"budget": settings.budget, "seed": settings.seed,
                                 "max_new_tokens": settings.max_new_tokens})
    phases = Phases(settings.work, print)
    results: dict = {}
    for example in settings.examples:
        data, domains, sets = kestrel_example() if example == "kestrel" else \
            faq_example(settings.work / example, settings.seed)
        results[example] = {lever: run_lever(settings, phases, example, lever, data, domains, sets)
                            for lever in settings.levers}
        if example == "kestrel":
            results[example]["retrieval_signal"] = phases.run(f"{example}/retrieval-signal", lambda data=data, sets=sets: (
                retrieval_signal(data, sets, out_of_scope("kestrel"))))
        if example == "kestrel" and KEPT in settings.levers:
            work = settings.work / example / KEPT
            results[example]["eval_100"] = phases.run(
                f"{example}/eval-100", lambda work=work, data=data, sets=sets: timed_eval(settings, work, data, sets))
    out = {"settings": {"budget": settings.budget, "seed": settings.seed, "max_new_tokens": settings.max_new_tokens,
                        "arms": ARMS, "levers": LEVERS,
                        "hardware": hardware()},
           "goals": GOALS, "examples": results}
    settings.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.out / "answers.json", json.dumps(out, indent=2) + "\n")
    atomic_write_text(settings.out / "answers.md", markdown(out))
    print(markdown(out))
    return out


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# Answers judged by their facts", "",
             f"`python -m benchmarks answers` ({s['budget']} budget, seed {s['seed']}, greedy, at most "
             f"{s['max_new_tokens']} new tokens, chat template; {s['hardware']}).", "",
             "Fact recall: the share of questions whose every fact regex is in the answer. Training questions: "
             "those whose conversation is in the bundle's training split. Routing: routed to the question's own "
             "department.", ""]
    for example, levers in r["examples"].items():
        lines += [f"## {example}", "", "| lever | questions | n | routing | abstained | base | routed | oracle | "
                  "F1 base | F1 routed | F1 oracle | eval s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for lever, entry in levers.items():
            if lever in ("eval_100", "retrieval_signal"):
                continue
            for name in ("held_out", "held_out_no_abstain", "training", "off_topic"):
                e = entry.get(name)
                if not e:
                    continue
                fr, f1 = e["fact_recall"], e["token_f1"]
                lines.append(f"| {lever} | {name} | {e['questions']} | {pct(e['routing'])} | {pct(e['abstained'])} | "
                             f"{pct(fr.get('base'))} | {pct(fr.get('routed'))} | {pct(fr.get('oracle'))} | "
                             f"{num(f1.get('base'))} | {num(f1.get('routed'))} | {num(f1.get('oracle'))} | "
                             f"{e['eval_seconds']:.0f} |")
        lines.append("")
        if "retrieval_signal" in levers:
            lines += ["Measured, not wired in: each department's passage index as a router (the department whose "
                      "best passage scores highest, BM25) and its best score as an out-of-scope signal.", "",
                      "| questions | n | routed to its department | best score min / median / max |",
                      "|---|---:|---:|---|"]
            for name, r in levers["retrieval_signal"].items():
                b = r["best_score"]
                lines.append(f"| {name} | {r['questions']} | {pct(r['routing_accuracy'])} | "
                             f"{b['min']} / {b['median']} / {b['max']} |")
            lines.append("")
        if "eval_100" in levers:
            t = levers["eval_100"]
            lines += [f"`tlora eval --questions` on {t['questions']} questions ({t['arms']}, {t['generated']} answers "
                      f"generated, the {KEPT} bundle): {t['seconds']:.0f} s ({t['seconds_with_loading']:.0f} s with "
                      "loading the bundle).", ""]
    return "\n".join(lines) + "\n"

