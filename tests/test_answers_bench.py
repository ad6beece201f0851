"""The worked example (examples/kestrel) as data a newcomer copies, and the answers benchmark's
bookkeeping (benchmarks/answers.py): which training questions a bundle was taught, the table."""

import json
import re
from pathlib import Path

from benchmarks import answers as bench
from temporal_lora.conversations import load_user_texts

ROOT = Path(__file__).resolve().parents[1] / "examples" / "kestrel"


def test_every_department_folder_gives_a_handbook_conversations_and_questions():
    for name in bench.DEPARTMENTS:
        docs, convs = load_user_texts(ROOT / name)
        handbooks = [d for d in docs if d.id == "handbook.md"]
        assert len(handbooks) == 1 and len(handbooks[0].text.split()) > 600
        assert len([d for d in docs if d.id.startswith("questions.txt:")]) == 15
        assert len(convs) == 25 and all(c.id.startswith(f"conversations.jsonl:{name}-") for c in convs)


def test_the_evaluation_questions_state_facts_of_their_own_handbook():
    data, domains, sets = bench.kestrel_example(ROOT)
    assert domains == list(bench.DEPARTMENTS) and set(data) == set(domains)
    assert [len(sets[k]) for k in ("held_out", "training", "off_topic")] == [30, 24, 10]
    firsts = {}
    for name in domains:
        for conv in load_user_texts(ROOT / name)[1]:
            firsts[conv.messages[0]["content"]] = name
    for q in sets["held_out"] + sets["training"]:
        handbook = (ROOT / q["domain"] / "handbook.md").read_text(encoding="utf-8")
        assert q["facts"] and all(re.search(f, q["answer"], re.I) and re.search(f, handbook, re.I)
                                  for f in q["facts"]), q["id"]
    # training questions are training conversations' questions verbatim; held-out ones are not
    assert all(firsts.get(q["question"]) == q["domain"] for q in sets["training"])
    assert not any(q["question"] in firsts for q in sets["held_out"])
    assert all("domain" not in q for q in sets["off_topic"])


class _Bundle:
    def __init__(self, info):
        self.info = info


def test_taught_keeps_the_training_questions_whose_conversation_trained():
    _, _, sets = bench.kestrel_example(ROOT)
    first_hr = json.loads((ROOT / "hr" / "conversations.jsonl").read_text().splitlines()[0])
    held = {"hr": {"conversations": {"val_ids": [f"conversations.jsonl:{first_hr['id']}"], "test_ids": []}}}
    data = {d: ROOT / d for d in bench.DEPARTMENTS}
    kept = bench.taught(_Bundle({"data": held}), data, sets["training"])
    assert first_hr["messages"][0]["content"] in {q["question"] for q in sets["training"]}
    assert {q["question"] for q in sets["training"]} - {q["question"] for q in kept} == {
        first_hr["messages"][0]["content"]}


def test_the_table_has_a_row_per_lever_and_question_set():
    entry = {"questions": 30, "routing": 0.9, "abstained": 0.0, "eval_seconds": 12.0,
             "fact_recall": {"base": 0.0, "routed": 0.7, "oracle": 0.73}, "token_f1": {"base": 0.1}}
    md = bench.markdown({"settings": {"budget": "quick", "seed": 0, "max_new_tokens": 48, "hardware": "cpu"},
                         "examples": {"kestrel": {"grounded": {"train_seconds": 1, "held_out": entry}}}})
    assert "| grounded | held_out | 30 | 90.0% | 0.0% | 0.0% | 70.0% | 73.0% | 0.100 | – | – | 12 |" in md


def test_the_out_of_scope_training_texts_are_not_the_off_topic_test_questions():
    texts = bench.out_of_scope("kestrel")
    _, _, sets = bench.kestrel_example(ROOT)
    assert len(texts) >= 20 and not set(texts) & {q["question"] for q in sets["off_topic"]}
    assert bench.out_of_scope("django-faq") == []
