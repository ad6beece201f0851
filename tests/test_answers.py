"""Answer evaluation (`tlora eval --questions`): the scores, one clear error per bad input with nothing
written, the three arms against the library's own generate and router, and resuming from the cache."""

import json

import pytest
from support.serving import TINY_CHAT_TEMPLATE

from temporal_lora import answers
from temporal_lora.answers import CACHE_FILE, evaluate_answers, summarize
from temporal_lora.cli import main
from temporal_lora.errors import FetchError, InputError
from temporal_lora.model import TemporalLoRA
from temporal_lora.scoring import facts_found, normalize_answer, token_f1

QUESTIONS = [
    {"id": "q1", "question": "How do I define a function in Python?", "domain": "code",
     "answer": "Use def followed by the name.", "facts": ["def", "name"]},
    {"question": "What does the court decide about the contract?", "domain": "legal",
     "answer": "The court voids the contract."},
    {"id": 7, "question": "Shall I compare thee to a summer's day?", "domain": "literature",
     "facts": ["summer"]},
    {"question": "What is the weather like?"},
]


@pytest.fixture(scope="module")
def tl(tiny_bundle):
    model = TemporalLoRA.from_pretrained(tiny_bundle)
    model.tokenizer.chat_template = TINY_CHAT_TEMPLATE  # the tiny test tokenizer has none
    return model


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ scores
def test_token_f1_is_squads():
    assert normalize_answer("The Cat, sat on  a mat… (again)!") == "cat sat on mat again"
    assert token_f1("The cat sat on the mat.", "a cat sat on a mat") == 1.0
    assert token_f1("cat sat", "cat sat on mat") == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert token_f1("dog dog", "dog dog cat") == pytest.approx(0.8)  # a bag of tokens, not a set
    assert token_f1("dog dog cat", "dog cat cat") == pytest.approx(2 / 3)  # a shared token counts min(times)
    assert token_f1("nothing shared", "cat sat") == 0.0
    assert token_f1("", "the") == 1.0 and token_f1("the", "cat") == 0.0  # empty after normalising


def test_facts_are_case_insensitive_regexes_and_recall_needs_all_of_them():
    assert facts_found("Set SESSION_COOKIE_DOMAIN in settings.py", [r"session_cookie_domain", r"settings\.py",
                                                                    r"\bmiddleware\b"]) == [True, True, False]
    q = answers.Question("q", "Where is the session cookie domain set?", answer="In settings.py.",
                         facts=(r"session_cookie_domain", r"settings\.py"))
    assert answers.score_answer("SESSION_COOKIE_DOMAIN, in settings.py", q) == {
        "token_f1": 0.8, "facts_found": [True, True], "all_facts": True}  # "_" and "." are punctuation
    assert answers.score_answer("In settings", q) == {"token_f1": 0.5, "facts_found": [False, False],
                                                      "all_facts": False}
    assert answers.score_answer("session_cookie_domain", q)["all_facts"] is False  # every fact, not any
    rows = [{"domain": "a", "route": {"domain": "a", "abstained": False},
             "answers": {"base": {"token_f1": 0.5, "facts_found": [True, True], "all_facts": True}}},
            {"domain": "a", "route": {"domain": None, "abstained": True},
             "answers": {"base": {"token_f1": 0.25, "facts_found": [True, False], "all_facts": False}}},
            {"domain": None, "route": {"domain": "a", "abstained": False},
             "answers": {"base": {}}}]
    s = summarize(rows, ["base"])
    assert s["overall"]["arms"]["base"] == {"answered": 3, "with_answer": 2, "token_f1": 0.375,
                                            "with_facts": 2, "fact_recall": 0.5}
    assert s["overall"]["routing"] == {"questions_with_domain": 2, "accuracy": 0.5, "abstained": 0.3333}
    assert list(s["by_domain"]) == ["a", answers.NO_DOMAIN]
    assert s["by_domain"][answers.NO_DOMAIN]["routing"]["accuracy"] is None


# ------------------------------------------------------------------------------------------ bad input
BAD = [
    (['{"question": "fine"}', "not json"], "q.jsonl:2: not valid JSON"),
    (['{"domain": "code"}'], "q.jsonl:1: 'question' must be a non-empty string"),
    (['{"question": "   "}'], "q.jsonl:1: 'question' must be a non-empty string"),
    (['["a list"]'], "q.jsonl:1: expected an object"),
    (['{"question": "q", "domain": "cooking"}'], "q.jsonl:1: unknown domain 'cooking'; this bundle has code"),
    (['{"question": "q"}', '{"question": "q", "facts": ["(unclosed"]}'],
     "q.jsonl:2: fact 0 '(unclosed' is not a valid regular expression"),
    (['{"question": "q", "facts": "one"}'], "q.jsonl:1: 'facts' must be a list"),
    (['{"question": "q", "answer": ""}'], "q.jsonl:1: 'answer' must be a non-empty string"),
    (['{"id": "x", "question": "q"}', '{"id": "x", "question": "r"}'], "q.jsonl:2: id 'x' is already used"),
    (['{"question": "\\ud800"}'], "q.jsonl:1: the question is not valid Unicode text"),
    ([""], "holds no questions"),
]


@pytest.mark.parametrize(("lines", "message"), BAD)
def test_bad_questions_give_one_clear_error_and_write_nothing(tl, tmp_path, lines, message):
    path = _write(tmp_path / "q.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(InputError) as exc:
        evaluate_answers(tl, path, out, max_new_tokens=2, progress=False)
    assert message in str(exc.value)
    assert not out.exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"arms": "base,teleport"}, "unknown arm 'teleport'"),
    ({"arms": "oracle:plain"}, "this bundle has no style adapters"),
    ({"arms": "base,base"}, "arm 'base' is given twice"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"max_new_tokens": 10_000}, "exceeds the context"),
    ({"limit": 0}, "limit must be at least 1"),
])
def test_bad_settings_give_one_clear_error_and_write_nothing(tl, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        evaluate_answers(tl, _write(tmp_path / "q.jsonl", QUESTIONS), out, **{"max_new_tokens": 2, **kwargs},
                         progress=False)
    assert not out.exists()


def test_a_missing_file_is_a_clear_error(tl, tmp_path):
    with pytest.raises(InputError, match="cannot read questions from .*nope.jsonl"):
        evaluate_answers(tl, tmp_path / "nope.jsonl", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ a run
def test_arms_match_generate_and_the_router_and_a_rerun_reuses_the_answers(tl, tmp_path, monkeypatch):
    path = _write(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    report = evaluate_answers(tl, path, out, max_new_tokens=8, batch_size=3, progress=False)
    saved = json.loads((out / "answers.json").read_text())
    assert "timing" not in saved and saved == {k: v for k, v in report.items() if k != "timing"}
    rows = saved["questions"]
    assert [r["id"] for r in rows] == ["q1", "line-2", "7", "line-4"]
    assert saved["settings"]["arms"] == ["base", "routed", "oracle"] and saved["settings"]["chat_template"]
    assert [sorted(r["answers"]) for r in rows] == [["base", "oracle", "routed"]] * 3 + [["base", "routed"]]

    texts = [q["question"] for q in QUESTIONS]
    # Oracle: the question's domain forced; base: no adapter - each exactly the library's greedy chat answer.
    for row, q in zip(rows, QUESTIONS, strict=True):
        (base,) = tl.generate([q["question"]], domain="base", chat=True, max_new_tokens=8)
        assert row["answers"]["base"]["text"] == base.text and row["answers"]["base"]["adapters"] == {}
        if "domain" in q:
            (oracle,) = tl.generate([q["question"]], domain=q["domain"], chat=True, max_new_tokens=8)
            assert row["answers"]["oracle"]["text"] == oracle.text
            assert row["answers"]["oracle"]["adapters"] == {q["domain"]: 1.0}
    # Routed: as served (the router reads the bare question); its answer is that adapter's (or the base model's).
    routes = tl.route(texts)
    served = tl.generate(texts, chat=True, max_new_tokens=8)
    for row, route, g in zip(rows, routes, served, strict=True):
        assert row["route"]["domain"] == route.domain and row["route"]["abstained"] == route.abstained
        assert row["answers"]["routed"]["adapters"] == {k: v for k, v in g.weights.items() if v}
        if route.domain == row["domain"]:
            assert row["answers"]["routed"]["text"] == row["answers"]["oracle"]["text"]
    right = [r.domain == q["domain"] for r, q in zip(routes, QUESTIONS, strict=True) if "domain" in q]
    assert saved["summary"]["overall"]["routing"]["accuracy"] == round(sum(right) / 3, 4)
    assert saved["summary"]["by_domain"]["code"]["routing"]["accuracy"] == float(right[0])

    # Scores: computed from the answers; the literature question has facts but no reference answer.
    first = rows[0]["answers"]["oracle"]
    assert first["token_f1"] == round(token_f1(first["text"], QUESTIONS[0]["answer"]), 4)
    assert first["facts_found"] == facts_found(first["text"], ["def", "name"])
    assert "token_f1" not in rows[2]["answers"]["base"] and "facts_found" not in rows[1]["answers"]["base"]
    md = (out / "answers.md").read_text()
    assert "| **overall** | 4 |" in md and "## Samples" in md and "### code" in md and QUESTIONS[1]["answer"] in md

    # A rerun generates nothing: every answer comes from the cache, and answers.json is the same file.
    before = (out / "answers.json").read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(tl, "generate_ids", no_generation)
    again = evaluate_answers(tl, path, out, max_new_tokens=8, batch_size=3, progress=False)
    assert again["timing"]["generated"] == 0 and again["timing"]["reused"] == report["timing"]["generations"]
    assert (out / "answers.json").read_bytes() == before
    # Other settings are other answers: nothing is taken from the cache for them.
    with pytest.raises(AssertionError, match="generated again"):
        evaluate_answers(tl, path, out, max_new_tokens=7, progress=False)


def test_an_interrupted_run_resumes_where_it_stopped(tl, tmp_path, monkeypatch):
    path = _write(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    real = tl.generate_ids
    calls = []

    def dies_on_the_second_batch(ids, *args, **kwargs):
        calls.append(len(ids))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(tl, "generate_ids", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_answers(tl, path, out, arms="base", max_new_tokens=4, batch_size=2, progress=False)
    assert not (out / "answers.json").exists()
    with (out / CACHE_FILE).open("a") as fh:
        fh.write('{"key": "cut sho')  # a line an interruption cut short is skipped
    monkeypatch.setattr(tl, "generate_ids", real)
    report = evaluate_answers(tl, path, out, arms="base", max_new_tokens=4, batch_size=2, progress=False)
    assert report["timing"] == {**report["timing"], "generations": 4, "generated": 2, "reused": 2}


# ------------------------------------------------------------------------------------------ built-in
def test_django_faq_without_a_faq_domain_asks_every_question_without_a_domain(tl, tmp_path):
    try:
        report = evaluate_answers(tl, "django-faq", tmp_path / "out", max_new_tokens=2, limit=2, progress=False)
    except FetchError:
        pytest.skip("the Django FAQ is not in the cache and cannot be downloaded here")
    assert "no 'technical' domain" in report["source"]
    assert [r["domain"] for r in report["questions"]] == [None, None]
    assert all(r["id"].startswith("faq/") and r["answer"] for r in report["questions"])
    questions, _ = answers.load_questions(tl, "django-faq")
    assert len({q.id for q in questions}) == len(questions)  # two FAQ headings share a slug: ids stay unique
    assert all("oracle" not in r["answers"] and "token_f1" in r["answers"]["base"] for r in report["questions"])


def test_django_faq_uses_the_held_out_conversations_of_a_domain_trained_on_it(tl, tmp_path, monkeypatch):
    from temporal_lora.conversations import builtin_conversations

    try:
        faq = builtin_conversations("django-faq")
    except FetchError:
        pytest.skip("the Django FAQ is not in the cache and cannot be downloaded here")
    held = faq[3:5]
    monkeypatch.setattr(answers, "held_out_conversations", lambda _tl: {"code": held})
    questions, note = answers.load_questions(tl, "django-faq")
    assert [(q.id, q.domain, q.question, q.answer) for q in questions] == [
        (c.id, "code", c.messages[0]["content"], c.messages[1]["content"]) for c in held]
    assert "held-out test conversations of code" in note


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_eval_questions_prints_the_table_and_where_it_wrote(capsys, tiny_bundle, tmp_path):
    path = _write(tmp_path / "q.jsonl", QUESTIONS[:2])
    out = tmp_path / "out"
    code = main(["eval", "--bundle", str(tiny_bundle), "--questions", str(path), "--out", str(out),
                 "--max-new-tokens", "3", "--arms", "base,oracle"])
    stdout, _ = capsys.readouterr()
    assert code == 0
    assert "| **overall** | 2 |" in stdout and f"{out}/answers.json" in stdout
    saved = json.loads((out / "answers.json").read_text())
    assert saved["settings"]["arms"] == ["base", "oracle"] and not saved["settings"]["chat_template"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--questions", "QFILE", "--arms", "teleport"], "unknown arm 'teleport'"),
    (["--questions", "QFILE", "--limit", "0"], "limit must be at least 1"),
    (["--arms", "base"], "--arms go with --questions"),
])
def test_cli_eval_questions_bad_input_is_one_error_line(capsys, tiny_bundle, tmp_path, extra, message):
    path = _write(tmp_path / "q.jsonl", QUESTIONS[:1])
    out = tmp_path / "out"
    code = main(["eval", "--bundle", str(tiny_bundle), "--out", str(out),
                 *[str(path) if a == "QFILE" else a for a in extra]])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("tlora: error:") == 1 and message in err, err
    assert not out.exists()
