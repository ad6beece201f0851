"""A department's data as it exists (a folder of handbook, conversations and question lists) and
grounded answers: passages cut from the handbook, found with SQLite FTS5 / BM25, stored per domain in
the bundle, put into the prompt the adapter trained on, cited in the answers."""

import json
import shutil
from dataclasses import replace

import pytest
from support.departments import CONVERSATIONS, HANDBOOKS, department, grounded_config

from temporal_lora.conversations import load_user_texts
from temporal_lora.corpora import Document
from temporal_lora.data import split_by_kind
from temporal_lora.errors import BundleError
from temporal_lora.grounding import (
    PassageIndex,
    conversation_passage,
    document_passages,
    fts_query,
    grounded_conversations,
    grounded_messages,
)


# ------------------------------------------------------------------------------------------ passages, search
def test_a_handbook_is_cut_at_headings_and_paragraphs_and_found_by_its_words():
    doc = Document("handbook.md", HANDBOOKS["hr"], "handbook.md")
    passages = document_passages(doc, passage_words=40)
    assert [p.title for p in passages] == ["Annual leave", "Annual leave", "Sick leave", "Parental leave"]
    assert passages[0].text.startswith("Full-time employees get 27 days") and "HR-12" in passages[1].text
    assert all(len(p.text.split()) <= 40 for p in passages)
    assert len(document_passages(doc, passage_words=200)) == 3  # a section's paragraphs joined
    index = PassageIndex.build(passages)
    top = index.search("Do I need a doctor's note when I'm sick?", 2)
    assert top[0].passage.title == "Sick leave" and top[0].score > 0
    # stemming (porter): "requesting" finds "requests"; a question sharing no word finds nothing
    assert index.search("requesting days off", 1)[0].passage.text == passages[1].text
    assert index.search("zebra quantum", 3) == []
    assert index.search("the and of", 3) == []  # stopwords only: no query at all


def test_any_question_is_a_safe_fts5_query():
    index = PassageIndex.build(document_passages(Document("h", HANDBOOKS["it"], "h"), 60))
    for text in ['what "is" NEAR(vpn) OR *', "passwords -- AND ( )", "^printer: col:x", "'; DROP TABLE passages; --"]:
        index.search(text, 2)  # never an FTS5 syntax error
    assert fts_query('VPN "host" NEAR') == '"vpn" OR "host" OR "near"'
    assert index.search("'; DROP TABLE passages; --", 5) == []  # words, not SQL: none is in the handbook
    assert index.size == 3 and index.search("password printer", 5)


def test_the_index_round_trips_as_bytes_and_a_broken_one_is_a_clear_error():
    index = PassageIndex.build(document_passages(Document("h", HANDBOOKS["it"], "h"), 60))
    again = PassageIndex.from_bytes(index.to_bytes())
    assert again.passages() == index.passages()
    assert [h.to_dict() for h in again.search("VPN host", 2)] == [h.to_dict() for h in index.search("VPN host", 2)]
    with pytest.raises(BundleError, match="not a readable FTS5 index"):
        PassageIndex.from_bytes(b"not a database" * 100)


def test_training_conversations_get_the_passages_their_question_finds_but_never_their_own():
    from temporal_lora.conversations import Conversation

    convs = [Conversation(f"c{i}", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
             for i, (q, a) in enumerate(CONVERSATIONS["hr"])]
    passages = document_passages(Document("handbook.md", HANDBOOKS["hr"], "handbook.md"), 40)
    index = PassageIndex.build(passages + [conversation_passage(c.id, *[m["content"] for m in c.messages])
                                           for c in convs])
    grounded = grounded_conversations(convs, index, "hr", k=2)
    system = grounded[1].messages[0]
    assert system["role"] == "system" and "hr department" in system["content"]
    assert "third day of absence" in system["content"]  # the handbook's sick-leave passage
    assert "When do I need a sick note?" not in system["content"]  # its own Q/A passage is left out
    assert grounded[1].messages[1:] == convs[1].messages  # the turns themselves are unchanged
    # a system message of the user's own is kept, the passages follow it
    msgs = grounded_messages([{"role": "system", "content": "Be brief."}, *convs[0].messages], "hr",
                             index.search("vacation days", 1))
    assert msgs[0]["content"].startswith("Be brief.\n\nYou answer questions for the hr department")
    assert grounded_messages(convs[0].messages, "hr", []) == convs[0].messages


# ------------------------------------------------------------------------------------------ a department's folder
def test_a_department_folder_mixes_handbook_conversations_and_question_lists(tmp_path):
    folder = department(tmp_path, "hr", question_answer_lines=True)
    (folder / "notes.txt").write_text("Our office plants are watered on Mondays.\nThe kitchen closes at six.\n",
                                      encoding="utf-8")  # a .txt that is not a question list: one document
    (folder / "more.jsonl").write_text(json.dumps({"text": "Where is the staff canteen?"}) + "\n"
                                       + json.dumps({"question": "Who signs my contract?"}) + "\n", encoding="utf-8")
    docs, convs = load_user_texts(folder)
    ids = {d.id: d.text for d in docs}
    assert ids["handbook.md"] == HANDBOOKS["hr"].strip()
    assert ids["questions.txt:line-1"] == "Is there a bonus for referrals?" and len(
        [i for i in ids if i.startswith("questions.txt:")]) == 3
    assert "notes.txt" in ids  # a plain .txt is a document
    from temporal_lora.corpora.user import is_question_list

    prose = "Be kind.\nShare the kitchen.\nClean up after yourself.\n"
    assert [is_question_list(tmp_path / n, prose) for n in ("faq-questions.txt", "requests.txt", "guidelines.txt",
                                                             "Questions_2024.txt")] == [True, True, False, True]
    assert is_question_list(tmp_path / "notes.txt", "Where is it?\nWho pays?\nWhen?\n")
    assert ids["more.jsonl:line-1"] == "Where is the staff canteen?"
    assert ids["more.jsonl:line-2"] == "Who signs my contract?"  # a question without an answer: a short text
    assert len(convs) == len(CONVERSATIONS["hr"]) and convs[0].id == "conversations.jsonl:hr-0"
    assert convs[0].messages == [{"role": "user", "content": CONVERSATIONS["hr"][0][0]},
                                 {"role": "assistant", "content": CONVERSATIONS["hr"][0][1]}]
    # the one handbook is never held out: it trains, the short texts and conversations give val/test
    for seed in range(5):
        splits = split_by_kind(docs, seed=seed, validated_elsewhere=True)
        assert "handbook.md" in {d.id for d in splits.train}
        assert splits.val and splits.test and all(len(d.text) < 400 for d in splits.val + splits.test)


def test_one_kind_of_documents_splits_exactly_as_before():
    from temporal_lora.data import split_documents

    docs = [Document(f"d{i}", "word " * (100 + i), f"g{i % 7}") for i in range(30)]
    assert split_by_kind(docs, seed=3) == split_documents(docs, seed=3)
    assert split_by_kind(docs, seed=3, validated_elsewhere=True) == split_documents(docs, seed=3)


# ------------------------------------------------------------------------------------------ a grounded bundle
@pytest.fixture(scope="module")
def grounded_bundle(chat_llama, tmp_path_factory):
    from temporal_lora.train import train_bundle

    root = tmp_path_factory.mktemp("departments")
    data = {name: department(root, name) for name in ("hr", "it")}
    out = root / "bundle"
    tl = train_bundle(["hr", "it"], out, base=str(chat_llama), data=data, config=grounded_config(),
                      progress=False, log=lambda *a: None)
    return tl, out, root


def test_a_bundle_grounds_its_departments_and_keeps_their_indexes(grounded_bundle):
    from temporal_lora.model import TemporalLoRA

    tl, out, _ = grounded_bundle
    assert sorted(tl.grounding) == ["hr", "it"] and tl.grounding_passages == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["grounding"]["passages"] == 1
    assert set(manifest["grounding"]["domains"]) == {"hr", "it"}
    assert "grounding/hr.sqlite" in manifest["files"]
    loaded = TemporalLoRA.from_pretrained(out)
    assert loaded.grounding["it"].passages() == tl.grounding["it"].passages()
    hits = loaded.passages_for("it", "what is the VPN host?")
    assert hits and "vpn.kestrel.example" in hits[0].passage.text
    assert loaded.passages_for(None, "what is the VPN host?") == []  # abstained: the base model, no passages
    # held-out conversations are never passages (they would hand the answer to the evaluation)
    held = {c for split in ("val_ids", "test_ids") for c in loaded.info["data"]["hr"]["conversations"][split]}
    sources = {p.source for p in loaded.grounding["hr"].passages()}
    assert held and not held & {s.removeprefix("conversation:") for s in sources}
    assert "handbook.md" in sources
    # a changed index file is caught by the manifest's checksums
    broken = out.parent / "broken"
    shutil.copytree(out, broken)
    (broken / "grounding" / "hr.sqlite").write_bytes(b"x" * 64)
    with pytest.raises(BundleError):
        TemporalLoRA.from_pretrained(broken)


def test_grounding_off_trains_without_indexes(chat_llama, grounded_bundle, tmp_path):
    from temporal_lora.train import train_bundle

    _, _, root = grounded_bundle
    tl = train_bundle(["hr", "it"], tmp_path / "b", base=str(chat_llama), data={n: root / n for n in ("hr", "it")},
                      config=grounded_config(), grounding="off", progress=False, log=lambda *a: None)
    assert tl.grounding == {} and not (tmp_path / "b" / "grounding").exists()


def test_answers_are_grounded_and_cite_their_passages(grounded_bundle, tmp_path):
    from temporal_lora.answers import evaluate_answers
    from temporal_lora.model import TemporalLoRA

    _, out, _ = grounded_bundle
    tl = TemporalLoRA.from_pretrained(out)
    questions = [{"id": "vpn", "question": "Which VPN host do I connect to?", "domain": "it", "facts": ["vpn"]},
                 {"id": "sick", "question": "From which day of absence is a sick note needed?", "domain": "hr"}]
    report = evaluate_answers(tl, questions, tmp_path / "a", max_new_tokens=4, progress=False)
    assert report["settings"]["grounded"] == ["hr", "it"]
    oracle = {r["id"]: r["answers"]["oracle"] for r in report["questions"]}
    assert "vpn.kestrel.example" in oracle["vpn"]["sources"][0]["text"]
    assert oracle["sick"]["sources"][0]["title"] == "Sick leave"
    assert "sources" not in report["questions"][0]["answers"]["base"]  # the base model is asked bare
    assert "(cited: Remote access)" in (tmp_path / "a" / "answers.md").read_text()
    plain = evaluate_answers(tl, questions, tmp_path / "b", max_new_tokens=4, grounded=False, progress=False)
    assert plain["settings"]["grounded"] == []
    assert all("sources" not in r["answers"]["oracle"] for r in plain["questions"])
    # the grounded prompt is the one the adapter trained on: the passages in the system turn
    question = [{"role": "user", "content": "Which VPN host do I connect to?"}]
    prompt, hits = tl.grounded_chat(question, "it", room=4)
    assert prompt.startswith("<system>You answer questions for the it department") and "vpn.kestrel.example" in prompt
    assert [h.to_dict() for h in hits] == oracle["vpn"]["sources"]
    # passages that would not leave room for the answer are dropped, the weakest first
    assert tl.grounded_chat(question, "it", room=tl.context_length - 20) == (tl.render_chat(question), [])
    assert tl.grounded_chat(question, None) == (tl.render_chat(question), [])


def test_adding_a_department_keeps_the_others_indexes_byte_identical(grounded_bundle, tmp_path):
    from temporal_lora.evolve import add_domain, remove_domain
    from temporal_lora.model import TemporalLoRA

    _, src, root = grounded_bundle
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    before = {d: (bundle / "grounding" / f"{d}.sqlite").read_bytes() for d in ("hr", "it")}
    questions = [{"id": "vpn", "question": "Which VPN host do I connect to?", "domain": "it"},
                 {"id": "sick", "question": "From which day of absence is a sick note needed?", "domain": "hr"}]

    def oracle_answers():
        from temporal_lora.answers import evaluate_answers

        report = evaluate_answers(TemporalLoRA.from_pretrained(bundle), questions, None, arms="oracle",
                                  max_new_tokens=6, progress=False)
        return [(r["answers"]["oracle"]["text"], r["answers"]["oracle"]["sources"]) for r in report["questions"]]

    answered = oracle_answers()
    it2 = tmp_path / "data"
    department(it2, "it")
    (it2 / "it" / "handbook.md").write_text(HANDBOOKS["it"].replace("vpn.kestrel", "gate.kestrel"), encoding="utf-8")
    add_domain(bundle, "helpdesk", data=it2 / "it", config=grounded_config(), progress=False, log=lambda *a: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["grounding"]["domains"]) == {"hr", "it", "helpdesk"}
    for d, raw in before.items():
        assert (bundle / "grounding" / f"{d}.sqlite").read_bytes() == raw
    assert oracle_answers() == answered  # the old departments answer exactly as before (greedy)
    tl = TemporalLoRA.from_pretrained(bundle)
    assert "gate.kestrel.example" in tl.passages_for("helpdesk", "VPN host")[0].passage.text
    remove_domain(bundle, "hr")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["grounding"]["domains"]) == {"it", "helpdesk"}
    assert not (bundle / "grounding" / "hr.sqlite").exists()
    assert (bundle / "grounding" / "it.sqlite").read_bytes() == before["it"]


# ------------------------------------------------------------------------------------------ written questions
def test_written_questions_are_kept_only_when_they_find_their_passage(monkeypatch):
    from temporal_lora import synthesis
    from temporal_lora.conversations import Conversation

    passages = document_passages(Document("handbook.md", HANDBOOKS["it"], "handbook.md"), 40)
    index = PassageIndex.build(passages + document_passages(Document("hr.md", HANDBOOKS["hr"], "hr.md"), 40))
    facts = synthesis.fact_sentences(index, 20)
    assert facts[0] == (passages[0].text, "The VPN host is vpn.kestrel.example and it needs the authenticator "
                                          "app on your phone.")
    assert [s for _, s in facts].index("Passwords must be at least 14 characters long.") == 1  # spread over passages
    written = {"The VPN host is": "Which VPN host do I connect to?",  # kept: finds the remote-access passage
               "Passwords must": "How long must my password be?",  # kept
               "Reset a forgotten": "How do I reset the library password?",  # borrows the examples' words
               # shares "days" with its sentence, but finds HR's passages
               "They expire": "How many days of annual leave do full-time employees get per calendar year?",
               "Every floor has": "What is the printer called? And where?"}  # two questions
    monkeypatch.setattr(synthesis, "complete", lambda model, tok, prompts: [
        next((q for k, q in written.items() if f"Sentence: {k}" in p), "Printer?") for p in prompts])
    convs = synthesis.synthesised_conversations(None, None, index, "it", 20, k=2)
    assert [(c.messages[0]["content"], c.messages[1]["content"][:16]) for c in convs] == [
        ("Which VPN host do I connect to?", "The VPN host is "), ("How long must my password be?", "Passwords must b")]
    assert synthesis.well_formed("Which VPN host do I use?", "The VPN host is vpn.kestrel.example.")
    assert not synthesis.well_formed("Which host?", "The VPN host is vpn.kestrel.example.")  # too short
    assert not synthesis.well_formed("What is the capital of France?", "The VPN host is vpn.kestrel.example.")

    original = Conversation("c1", [{"role": "user", "content": "What's the VPN address?"},
                                   {"role": "assistant", "content": "vpn.kestrel.example"}])
    rewordings = iter(["Which server do I use for VPN access from home?", "What is the printer on my floor?"])
    monkeypatch.setattr(synthesis, "complete", lambda model, tok, prompts: [next(rewordings) for _ in prompts])
    kept = synthesis.paraphrased_conversations(None, None, [original, replace(original, id="c2")], index)
    assert [(c.id, c.messages[0]["content"], c.messages[1]) for c in kept] == [
        ("c1~paraphrase", "Which server do I use for VPN access from home?", original.messages[1])]


def test_training_with_written_questions_runs_on_a_tiny_model(chat_llama, grounded_bundle, tmp_path):
    from temporal_lora.train import train_bundle

    _, _, root = grounded_bundle
    lines = []
    cfg = replace(grounded_config(), synthetic_questions=8, paraphrase_questions=True)
    tl = train_bundle(["hr", "it"], tmp_path / "b", base=str(chat_llama), data={n: root / n for n in ("hr", "it")},
                      config=cfg, progress=False, log=lines.append)
    assert sorted(tl.grounding) == ["hr", "it"]
    assert sum(line.startswith("grounding '") for line in lines) == 2


def test_written_questions_train_and_become_passages(monkeypatch, tmp_path):
    from temporal_lora import synthesis
    from temporal_lora.train import grounding_index, load_domain_data, with_written_questions

    folder = department(tmp_path, "it")
    cfg = replace(grounded_config(), grounding_passages=2, synthetic_questions=4)
    dd = load_domain_data("it", {"it": folder}, seed=0)
    index = grounding_index(dd, cfg, user_data=True)
    monkeypatch.setattr(synthesis, "complete", lambda model, tok, prompts: [
        "Which VPN host do I connect to?" if "Sentence: The VPN host" in p else "Nothing?" for p in prompts])
    more, bigger = with_written_questions(dd, index, cfg, None, None)
    written = [c for c in more.conversations.train if c.id.startswith("synthesised:")]
    assert [c.messages[0]["content"] for c in written] == ["Which VPN host do I connect to?"]
    assert len(more.conversations.train) == len(dd.conversations.train) + 1
    assert bigger.size == index.size + 1 and f"conversation:{written[0].id}" in {p.source for p in bigger.passages()}
    assert with_written_questions(dd, index, grounded_config(), None, None) == (dd, index)  # nothing asked for
