"""Answer evaluation: ask a bundle questions and score its answers (`tlora eval --questions FILE`).

A questions file is JSONL, one question per line:

    {"question": "...", "domain": "legal"?, "answer": "reference answer"?, "facts": ["regex", ...]?, "id": ...?}

Each question is asked the way a chatbot is used: as one user turn in the base model's chat
template (the bare question where the base model has no template), greedy, by up to three *arms*:

- `base`: no adapter (the plain base model);
- `routed`: the router reads the bare question and picks the adapter; abstained: the base model
  answers (as served);
- `oracle`: the question's own `domain` forced (questions without a domain are skipped);
- `routed:STYLE`, `oracle:STYLE`: the same with a style (plain, formal, auto, none, ...), in bundles
  with style adapters (routing/styles.py); plain `routed` and `oracle` use each domain's default style.

In a bundle with grounded domains (grounding.py) the routed and oracle answers get the answering
domain's passages in their prompt, as the server gives them, and the report keeps each answer's
`sources`; `grounded=False` (`--no-grounding`) asks the adapters alone.

Per arm, per domain and overall: fact recall (the share of questions with `facts` whose every fact
regex occurs in the answer, ignoring case), token F1 against `answer` (SQuAD's), and for the
router its accuracy on questions with a `domain` and how often it abstained.

An answer is a function of its prompt, the adapter weights applied and the settings, and it is
generated once: an (arm, question) pair whose weights equal another's (routed where the router picks
the question's domain is the oracle; abstained is the base model) shares its generation. Finished
generations are appended to OUT/answers.cache.jsonl after every batch, keyed by that content and the
bundle's identity, so a rerun (after an interruption, or with more questions or arms) generates only
what is missing. A resumed run batches the missing prompts differently, which can move a float in
the last place; answers.json itself never holds timings, so the same inputs give the same file.

The built-in example `django-faq`: Django's FAQ (question headings and their answers, held out of
the `technical` documents). Where a domain of the bundle was trained on the FAQ's conversations,
its *held-out test* conversations (recorded in the bundle at training time) are the questions, with
that domain; otherwise every FAQ conversation is a question, with domain `technical` where the
bundle has that domain (which never read the FAQ), else without a domain (no oracle, no routing
accuracy).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from temporal_lora.cache import atomic_write_text
from temporal_lora.config import RunContext
from temporal_lora.conversations import BUILTIN_CONVERSATIONS, Conversation, builtin_conversations
from temporal_lora.errors import InputError
from temporal_lora.evaluate import held_out_conversations
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.decisions import plan_routes
from temporal_lora.routing.hierarchy import display_name
from temporal_lora.routing.styles import AUTO, NONE
from temporal_lora.scoring import facts_found, token_f1
from temporal_lora.text import read_jsonl, tokenize

ARMS = ("base", "routed", "oracle")
DEFAULT_ARMS = "base,routed,oracle"
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_BATCH_SIZE = 16
BUILTIN_QUESTIONS = ("django-faq",)
BUILTIN_FAQ_DOMAIN = "technical"  # the built-in domain whose documents exclude the Django FAQ
CACHE_FILE = "answers.cache.jsonl"
CACHE_VERSION = 1
NO_DOMAIN = "(no domain)"
SAMPLES_PER_DOMAIN = 3


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    domain: str | None = None
    answer: str | None = None
    facts: tuple[str, ...] = ()
    where: str = ""  # file:line (or the built-in set and the conversation's id), for errors

    def to_dict(self) -> dict:
        return {"id": self.id, "where": self.where, "question": self.question, "domain": self.domain,
                "answer": self.answer, "facts": list(self.facts)}


@dataclass(frozen=True)
class Arm:
    name: str  # as given: base, routed, oracle, routed:plain, ...
    kind: str  # base, routed or oracle
    style: str | None = None


# ------------------------------------------------------------------------------------------ questions
def parse_question(record: object, where: str, domains: Sequence[str], default_id: str) -> Question:
    """One questions-file record as a Question, or one clear InputError naming `where`."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with a 'question' string")
    text = record.get("question")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: 'question' must be a non-empty string")
    domain = record.get("domain")
    if domain is not None and (not isinstance(domain, str) or domain not in domains):
        raise InputError(f"{where}: unknown domain {domain!r}; this bundle has {', '.join(domains)}")
    answer = record.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise InputError(f"{where}: 'answer' must be a non-empty string (or left out)")
    facts = record.get("facts")
    if facts is None:
        facts = []
    if not isinstance(facts, list):
        raise InputError(f"{where}: 'facts' must be a list of regular expressions")
    for i, fact in enumerate(facts):
        if not isinstance(fact, str) or not fact.strip():
            raise InputError(f"{where}: fact {i} must be a non-empty string (a regular expression)")
        try:
            re.compile(fact, re.IGNORECASE)
        except re.error as exc:
            raise InputError(f"{where}: fact {i} {fact!r} is not a valid regular expression ({exc})") from None
    qid = record.get("id")
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, str | int)):
        raise InputError(f"{where}: 'id' must be a string or an integer")
    return Question(str(qid) if qid is not None and str(qid) else default_id, text, domain, answer,
                    tuple(facts), where)


def read_questions(path: str | Path, domains: Sequence[str]) -> list[Question]:
    """Every question of a JSONL file (blank lines skipped); one clear InputError on a bad line."""
    rows = [(where, record, f"line-{where.rsplit(':', 1)[1]}")
            for where, record in read_jsonl(path, InputError, "questions")]
    questions = _parse_all(rows, domains)
    if not questions:
        raise InputError(f"{path} holds no questions")
    return questions


def _parse_all(rows: list[tuple[str, object, str]], domains: Sequence[str]) -> list[Question]:
    out: list[Question] = []
    seen: dict[str, str] = {}
    for where, record, default_id in rows:
        q = parse_question(record, where, domains, default_id)
        if q.id in seen:
            raise InputError(f"{where}: id {q.id!r} is already used at {seen[q.id]}")
        seen[q.id] = where
        out.append(q)
    return out


def conversation_question(conv: Conversation, domain: str | None, where: str) -> Question:
    """A conversation's first user turn as the question, the assistant turn after it as the answer."""
    first = next(i for i, m in enumerate(conv.messages) if m["role"] == "user")
    answer = next((m["content"] for m in conv.messages[first + 1:] if m["role"] == "assistant"), None)
    return Question(conv.id, conv.messages[first]["content"], domain, answer, (), where)


def builtin_questions(tl: TemporalLoRA, name: str) -> tuple[list[Question], str]:
    """A built-in question set for this bundle and a line saying where its questions come from.

    `django-faq`: the held-out test conversations of the bundle's domains trained on the FAQ, else
    the whole FAQ with domain `technical` (if the bundle has it; else no domain). See the module doc.
    """
    if name not in BUILTIN_QUESTIONS:
        raise InputError(f"unknown built-in questions {name!r}; choose from {', '.join(BUILTIN_QUESTIONS)}")
    faq = builtin_conversations(name)
    ids = {c.id for c in faq}
    held = {d: [c for c in convs if c.id in ids] for d, convs in held_out_conversations(tl).items()}
    held = {d: convs for d, convs in held.items() if convs}
    if held:
        pairs = [(d, c) for d, convs in held.items() for c in convs]
        note = (f"{name}: the held-out test conversations of {', '.join(held)} (recorded in the bundle at "
                "training time)")
    else:
        domain = BUILTIN_FAQ_DOMAIN if BUILTIN_FAQ_DOMAIN in tl.domains else None
        pairs = [(domain, c) for c in faq]
        note = (f"{name}: {BUILTIN_CONVERSATIONS[name][0]}; domain {domain}" if domain else
                f"{name}: {BUILTIN_CONVERSATIONS[name][0]}; no domain (the bundle has no "
                f"'{BUILTIN_FAQ_DOMAIN}' domain): no oracle arm, no routing accuracy")
    questions, seen = [], {}
    for domain, conv in pairs:  # ids are the answers' keys: a repeated one gets a suffix (#2, #3, ...)
        seen[conv.id] = seen.get(conv.id, 0) + 1
        qid = conv.id if seen[conv.id] == 1 else f"{conv.id}#{seen[conv.id]}"
        questions.append(replace(conversation_question(conv, domain, f"{name}:{qid}"), id=qid))
    return questions, note


def load_questions(tl: TemporalLoRA, source: str | Path | Sequence[dict], *,
                   limit: int | None = None) -> tuple[list[Question], str]:
    """Questions from a JSONL file, a built-in set's name (`django-faq`; a file of that name wins)
    or a list of records as in the file; the first `limit`. Returns them and where they came from."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, not {limit}")
    if isinstance(source, str | Path):
        if str(source) in BUILTIN_QUESTIONS and not Path(source).exists():
            questions, note = builtin_questions(tl, str(source))
        else:
            questions, note = read_questions(source, tl.domains), str(source)
    else:
        questions = _parse_all([(f"questions[{i}]", r, f"q{i}") for i, r in enumerate(source)], tl.domains)
        note = "questions given in Python"
        if not questions:
            raise InputError("no questions given")
    return (questions[:limit] if limit else questions), note


def parse_arms(spec: str | Sequence[str], tl: TemporalLoRA) -> list[Arm]:
    """'base,routed,oracle' (or a list of names) as Arms; routed:STYLE / oracle:STYLE in bundles with styles."""
    names = [a.strip() for a in spec.split(",")] if isinstance(spec, str) else [str(a).strip() for a in spec]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"no arms given; choose from {', '.join(ARMS)}")
    styles = sorted({s for e in (tl.styles.entries.values() if tl.styles else []) for s in e.get("adapters", {})})
    arms: list[Arm] = []
    for name in names:
        kind, colon, style = name.partition(":")
        if kind not in ARMS:
            raise InputError(f"unknown arm {name!r}; choose from {', '.join(ARMS)} (and routed:STYLE, "
                             "oracle:STYLE in bundles with styles)")
        if colon:
            if kind == "base":
                raise InputError("the base arm has no style (it uses no adapter)")
            if not styles:
                raise InputError(f"arm {name!r}: this bundle has no style adapters")
            if style not in (*styles, AUTO, NONE):
                raise InputError(f"arm {name!r}: unknown style {style!r}; this bundle has "
                                 f"{', '.join(styles)} (and {AUTO}, {NONE})")
        if any(a.name == name for a in arms):
            raise InputError(f"arm {name!r} is given twice")
        arms.append(Arm(name, kind, style or None))
    return arms


# ------------------------------------------------------------------------------------------ the run
@dataclass
class _Job:
    ids: list[int]
    weights: torch.Tensor  # one row over the mixer's adapters


def evaluate_answers(tl: TemporalLoRA, questions: str | Path | Sequence[dict], out_dir: str | Path | None = None,
                     *, arms: str | Sequence[str] = DEFAULT_ARMS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     limit: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     repetition_penalty: float = 1.0, chat: bool | None = None, grounded: bool = True,
                     run: RunContext | None = None, progress: bool | None = None) -> dict:
    """Ask every question by every arm (greedy), score the answers; write answers.json and answers.md
    (and the generation cache answers.cache.jsonl, reused by a rerun) to `out_dir` if given.

    `questions`: a JSONL file, `django-faq` (the built-in example) or a list of records. `chat`:
    None = the base model's chat template where it has one, else the bare question. `grounded`: the
    routed and oracle answers of grounded domains get their domain's passages (grounding.py), as
    served; False asks the adapters alone. Bad input
    (a line that is not JSON or lacks a question, an unknown domain, a fact that is not a regex,
    an unknown arm) raises one InputError before anything is written. Returns the report (as
    answers.json, plus "timing")."""
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    arm_list = parse_arms(arms, tl)
    qs, source = load_questions(tl, questions, limit=limit)
    has_template = bool(getattr(tl.tokenizer, "chat_template", None))
    chat = has_template if chat is None else chat
    if chat and not has_template:
        raise InputError(f"base model {tl.base_id!r} has no chat template; evaluate with chat=False")
    route_ids = []
    for q in qs:
        ids = tokenize(tl.tokenizer, q.question, f"{q.where}: the question")
        if not ids:
            raise InputError(f"{q.where}: the question has no tokens")
        route_ids.append(ids)

    started = time.perf_counter()
    decisions = tl.decisions(tl.route_probs(route_ids))
    identity = _bundle_identity(tl)
    settings = [max_new_tokens, round(float(repetition_penalty), 6)]
    jobs: dict[str, _Job] = {}
    planned: dict[str, dict[int, tuple[str, dict, dict | None, list]]] = {}  # arm -> {question: (key, adapters, style, hits)}
    for arm in arm_list:
        planned[arm.name] = {}
        for index, plan in _arm_plans(tl, arm, qs, route_ids):
            for i, row, named, style in zip(index, plan.weights, plan.named, plan.styles or [None] * len(index),
                                            strict=True):
                # The answer is grounded in the passages of the domain that answers it (as served).
                domain = None if arm.kind == "base" else qs[i].domain if arm.kind == "oracle" else \
                    None if decisions[i].abstained or not decisions[i].domain else decisions[i].domain.split("/")[0]
                prompt, hits = tl.grounded_chat([{"role": "user", "content": qs[i].question}],
                                                domain if grounded else None, max_new_tokens) if chat \
                    else (qs[i].question, [])
                key = _key(identity, settings, prompt, row)
                if key not in jobs:
                    full = tokenize(tl.tokenizer, prompt, f"{qs[i].where}: the question")
                    if len(full) + max_new_tokens > tl.context_length:
                        raise InputError(f"{qs[i].where}: the prompt has {len(full)} tokens; with {max_new_tokens} "
                                         f"new tokens that exceeds the context of {tl.context_length}")
                    jobs[key] = _Job(full, row)
                used = {a: w for a, w in named.items() if w}
                planned[arm.name][i] = (key, used, style.to_dict() if style is not None else None, hits)

    out = Path(out_dir) if out_dir is not None else None
    cache = _read_cache(out / CACHE_FILE) if out is not None else {}
    pending = sorted((k for k in jobs if k not in cache), key=lambda k: len(jobs[k].ids))  # stable: first-seen order
    reused = len(jobs) - len(pending)
    _generate(tl, jobs, pending, cache, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
              repetition_penalty=repetition_penalty, progress=RunContext.of(run, progress=progress).progress)
    seconds = time.perf_counter() - started

    rows = []
    for i, q in enumerate(qs):
        d = decisions[i]
        row = {**q.to_dict(), "route": {"domain": d.domain, "confidence": round(d.confidence, 4),
                                        "abstained": d.abstained}, "answers": {}}
        for arm in arm_list:
            if i not in planned[arm.name]:
                continue
            key, used, style, hits = planned[arm.name][i]
            text = cache[key]
            answer = {"text": text, "adapters": used, **({"style": style} if style is not None else {}),
                      **({"sources": [h.to_dict() for h in hits]} if hits else {})}
            row["answers"][arm.name] = answer | score_answer(text, q)
        rows.append(row)
    report = {
        "source": source,
        "settings": {"base_model": tl.base_id, "domains": tl.domains, "arms": [a.name for a in arm_list],
                     "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty,
                     "decoding": "greedy", "chat_template": chat,
                     "grounded": sorted(tl.grounding) if grounded and chat else [],
                     "abstain_threshold": tl.router_config.abstain_threshold, "limit": limit},
        "summary": summarize(rows, [a.name for a in arm_list]),
        "questions": rows,
    }
    timing = {"seconds": round(seconds, 2), "generations": len(jobs), "generated": len(pending), "reused": reused}
    if out is not None:
        write_answers(report, out, timing)
    return {**report, "timing": timing}


def _arm_plans(tl: TemporalLoRA, arm: Arm, qs: list[Question], route_ids: list[list[int]]):
    """(question indices, RoutePlan) for an arm: one plan for base and routed, one per domain for oracle."""
    if arm.kind != "oracle":
        domain = "base" if arm.kind == "base" else None
        yield list(range(len(qs))), plan_routes(tl, route_ids, mode="hard", domain=domain, style=arm.style)
        return
    for domain in tl.domains:
        index = [i for i, q in enumerate(qs) if q.domain == domain]
        if index:
            yield index, plan_routes(tl, [route_ids[i] for i in index], mode="hard", domain=domain, style=arm.style)


def _bundle_identity(tl: TemporalLoRA) -> list:
    version = (tl.info.get("history") or [{}])[-1].get("version")
    return [tl.base_id, tl.base_fingerprint, tl.info.get("created"), version,
            [display_name(a) for a in tl.mixer.adapter_names]]


def _key(identity: list, settings: list, prompt: str, row: torch.Tensor) -> str:
    payload = [CACHE_VERSION, identity, settings, prompt, [round(float(w), 6) for w in row]]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read_cache(path: Path) -> dict[str, str]:
    """{key: text} of finished generations; a line cut short by an interruption is skipped."""
    cache: dict[str, str] = {}
    if not path.is_file():
        return cache
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("text"), str):
            cache[entry["key"]] = entry["text"]
    return cache


def _generate(tl: TemporalLoRA, jobs: dict[str, _Job], pending: list[str], cache: dict[str, str],
              out: Path | None, *, batch_size: int, max_new_tokens: int, repetition_penalty: float,
              progress: bool) -> None:
    """Generate the pending jobs in batches (rows of a batch may use different adapters), appending
    each finished batch to the cache file."""
    from tqdm.auto import tqdm

    if not pending:
        return
    handle = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        handle = (out / CACHE_FILE).open("a", encoding="utf-8")
    try:
        with tqdm(total=len(pending), desc="answers", unit="answer", disable=not progress) as bar:
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                texts = tl.generate_ids([jobs[k].ids for k in batch], torch.stack([jobs[k].weights for k in batch]),
                                        max_new_tokens, repetition_penalty=repetition_penalty)
                for key, text in zip(batch, texts, strict=True):
                    cache[key] = text
                    if handle is not None:
                        handle.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
                if handle is not None:
                    handle.flush()
                bar.update(len(batch))
    finally:
        if handle is not None:
            handle.close()


# ------------------------------------------------------------------------------------------ scores
def score_answer(text: str, q: Question) -> dict:
    """One answer's scores: token F1 against the reference (if the question has one); which facts
    were found and whether all were (if it has facts)."""
    scores: dict = {}
    if q.answer is not None:
        scores["token_f1"] = round(token_f1(text, q.answer), 4)
    if q.facts:
        found = facts_found(text, list(q.facts))
        scores |= {"facts_found": found, "all_facts": all(found)}
    return scores


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize(rows: list[dict], arms: list[str]) -> dict:
    """Scores overall and per domain (questions without one under NO_DOMAIN): routing accuracy on
    questions with a domain, abstention rate, and per arm token F1 and fact recall."""
    by_domain = _by_domain(rows)
    return {"overall": _group(rows, arms), "by_domain": {d: _group(r, arms) for d, r in by_domain.items()}}


def _by_domain(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by their question's domain, in first-seen order, questions without one last."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["domain"] or NO_DOMAIN, []).append(row)
    return {d: groups[d] for d in sorted(groups, key=lambda d: d == NO_DOMAIN)}


def _group(rows: list[dict], arms: list[str]) -> dict:
    with_domain = [r for r in rows if r["domain"]]
    out = {"questions": len(rows),
           "routing": {"questions_with_domain": len(with_domain),
                       "accuracy": _mean([float(r["route"]["domain"] == r["domain"]) for r in with_domain]),
                       "abstained": _mean([float(r["route"]["abstained"]) for r in rows])},
           "arms": {}}
    for arm in arms:
        answered = [r["answers"][arm] for r in rows if arm in r["answers"]]
        f1 = [a["token_f1"] for a in answered if "token_f1" in a]
        facts = [float(a["all_facts"]) for a in answered if "all_facts" in a]
        out["arms"][arm] = {"answered": len(answered), "with_answer": len(f1), "token_f1": _mean(f1),
                            "with_facts": len(facts), "fact_recall": _mean(facts)}
    return out


# ------------------------------------------------------------------------------------------ the report
def pct(value: float | None) -> str:
    """A share as a percentage with one decimal, '–' for none."""
    return "–" if value is None else f"{value:.1%}"


def num(value: float | None) -> str:
    """A score with three decimals, '–' for none."""
    return "–" if value is None else f"{value:.3f}"


def markdown_table(report: dict) -> str:
    """One row per domain and one overall: questions, routing, and per arm token F1 / fact recall
    (columns only for what the questions have)."""
    arms = report["settings"]["arms"]
    summary = report["summary"]
    overall = summary["overall"]["arms"]
    show_f1 = any(overall[a]["with_answer"] for a in arms)
    show_facts = any(overall[a]["with_facts"] for a in arms)
    head = ["domain", "questions", "routed to its domain", "abstained"]
    head += [f"F1 {a}" for a in arms] if show_f1 else []
    head += [f"facts {a}" for a in arms] if show_facts else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, group in [*summary["by_domain"].items(), ("**overall**", summary["overall"])]:
        cells = [name, str(group["questions"]), pct(group["routing"]["accuracy"]), pct(group["routing"]["abstained"])]
        cells += [num(group["arms"][a]["token_f1"]) for a in arms] if show_f1 else []
        cells += [pct(group["arms"][a]["fact_recall"]) for a in arms] if show_facts else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _one_line(text: str | None, limit: int = 400) -> str:
    if text is None:
        return "–"
    flat = " ".join(text.split())
    return (flat[:limit] + " …" if len(flat) > limit else flat) or "(empty)"


def samples_markdown(report: dict, per_domain: int = SAMPLES_PER_DOMAIN) -> str:
    """The first `per_domain` questions of each domain: the question, the reference and every arm's answer."""
    arms = report["settings"]["arms"]
    parts = []
    for domain, rows in _by_domain(report["questions"]).items():
        parts.append(f"### {domain}\n")
        for row in rows[:per_domain]:
            route = row["route"]
            routed = "abstained (base model)" if route["abstained"] else f"{route['domain']} ({route['confidence']:.2f})"
            lines = [f"**Q** (`{row['id']}`): {_one_line(row['question'])}", "",
                     f"- reference: {_one_line(row['answer'])}"]
            if row["facts"]:
                lines.append("- facts: " + ", ".join(f"`{f}`" for f in row["facts"]))
            for arm in arms:
                if arm not in row["answers"]:
                    continue
                a = row["answers"][arm]
                score = [f"F1 {a['token_f1']:.2f}"] if "token_f1" in a else []
                score += [f"facts {sum(a['facts_found'])}/{len(a['facts_found'])}"] if "facts_found" in a else []
                label = f"{arm} (→ {routed})" if arm.startswith("routed") else arm
                cited = f" (cited: {'; '.join(h['title'] for h in a['sources'])})" if a.get("sources") else ""
                lines.append(f"- {label}{' [' + ', '.join(score) + ']' if score else ''}: {_one_line(a['text'])}{cited}")
            parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def write_answers(report: dict, out_dir: Path, timing: dict | None = None) -> None:
    """answers.json (the report, without timings: the same inputs give the same file) and answers.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "answers.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    s = report["settings"]
    when = (f"\n\n{timing['generated']} answers generated, {timing['reused']} reused from {CACHE_FILE}, "
            f"in {timing['seconds']:.0f} s." if timing else "")
    md = (f"# Answer evaluation\n\nQuestions: {report['source']}. Base model `{s['base_model']}`; arms "
          f"{', '.join(s['arms'])}; greedy, at most {s['max_new_tokens']} new tokens"
          f"{', chat template' if s['chat_template'] else ', bare questions (no chat template)'}.\n\n"
          "Routed to its domain: the router's accuracy on questions with a domain. F1: token F1 against "
          "the reference answer (SQuAD). Facts: share of questions with facts whose every fact is found."
          f"{when}\n\n{markdown_table(report)}\n\n## Samples\n\n{samples_markdown(report)}")
    atomic_write_text(out_dir / "answers.md", md)
