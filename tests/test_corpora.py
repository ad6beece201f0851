import io
import json
from pathlib import Path, PurePosixPath

import pytest

from temporal_lora.corpora import (
    BUILTIN_DOMAINS,
    Document,
    fetch_builtin,
    load_builtin,
    load_domain,
    load_user_corpus,
    parse_data_spec,
    registry,
)
from temporal_lora.corpora.legal import licence_family
from temporal_lora.corpora.literature import clean_markdown
from temporal_lora.corpora.medline import articles
from temporal_lora.corpora.technical import section_of, without_most_release_notes
from temporal_lora.errors import CorpusError

PARAGRAPHS = [
    "The river rose slowly through the night, and by morning the lower fields were under water.",
    "Nobody in the village remembered a flood like it, though the oldest told stories of one.",
    "By noon the rain had stopped, and children were floating paper boats along the lane.",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("TLORA_CACHE", str(path))
    return path


# --- data specs -------------------------------------------------------------------------------


def test_parse_data_spec():
    assert parse_data_spec("notes=./my notes") == ("notes", Path("my notes"))
    assert parse_data_spec("case-law_2=/data/a=b.jsonl") == ("case-law_2", Path("/data/a=b.jsonl"))


@pytest.mark.parametrize("spec", ["notes", "=./x", "notes=", "notes=  "])
def test_parse_data_spec_rejects_malformed(spec):
    with pytest.raises(CorpusError, match="expected NAME=PATH"):
        parse_data_spec(spec)


@pytest.mark.parametrize("spec", ["Notes=./x", "my notes=./x", "-x=./x", "naïve=./x", "a.b=./x"])
def test_parse_data_spec_rejects_bad_names(spec):
    with pytest.raises(CorpusError, match="lowercase letters, digits"):
        parse_data_spec(spec)


# --- user corpora -----------------------------------------------------------------------------


def test_folder_corpus_reads_txt_and_md_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(PARAGRAPHS[0])
    (tmp_path / "sub" / "b.md").write_text("# Title\n\n" + PARAGRAPHS[1])
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / "notes.rst").write_text(PARAGRAPHS[2])  # not a corpus suffix
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text(PARAGRAPHS[2])  # hidden: ignored
    docs = load_user_corpus(tmp_path)
    assert docs == [
        Document(id="a.txt", text=PARAGRAPHS[0], group="a.txt"),
        Document(id="sub/b.md", text="# Title\n\n" + PARAGRAPHS[1], group="sub/b.md"),
    ]


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        {"text": PARAGRAPHS[0]},
        {"text": PARAGRAPHS[1], "id": "p2", "group": "flood"},
        {"text": "   "},
        {"text": PARAGRAPHS[2], "id": 7},
    ]
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
    )
    docs = load_user_corpus(path)
    assert [(d.id, d.group) for d in docs] == [("line-1", "line-1"), ("p2", "flood"), ("7", "7")]
    assert docs[2].text == PARAGRAPHS[2]


def test_user_corpus_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_user_corpus(tmp_path / "nope")


def test_user_corpus_folder_without_text_files(tmp_path):
    (tmp_path / "a.rst").write_text(PARAGRAPHS[0])
    with pytest.raises(CorpusError, match=r"no \.txt or \.md files"):
        load_user_corpus(tmp_path)


def test_user_corpus_only_empty_texts(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="are empty"):
        load_user_corpus(tmp_path)
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(CorpusError, match="no non-empty"):
        load_user_corpus(path)


def test_user_corpus_undecodable_file_is_named(tmp_path):
    (tmp_path / "good.txt").write_text(PARAGRAPHS[0])
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(CorpusError, match=r"bad\.txt is not UTF-8"):
        load_user_corpus(tmp_path)
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        CorpusError, match=r"c\.jsonl is not UTF-8 text \(undecodable byte at line 2\)"
    ):
        load_user_corpus(path)


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"body": "no text field"}', "line 2: needs a string 'text' field"),
        ('{"text": 42}', "line 2: needs a string 'text' field"),
        ('["text"]', "line 2: needs a string 'text' field"),
        ('{"text": "x", "group": [1]}', "line 2: 'group' must be a string"),
    ],
)
def test_jsonl_bad_lines_are_reported_with_line_number(tmp_path, second_line, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": PARAGRAPHS[0]}) + "\n" + second_line + "\n")
    with pytest.raises(CorpusError, match=message):
        load_user_corpus(path)


def test_user_corpus_rejects_other_files(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="folder of .txt/.md files or a .jsonl file"):
        load_user_corpus(path)


# --- built-in registry ------------------------------------------------------------------------


def test_unknown_builtin_lists_choices(cache):
    with pytest.raises(CorpusError) as err:
        load_builtin("finance")
    assert str(err.value) == (
        "unknown built-in domain 'finance'; choose from medical, legal, technical, code, literature"
    )


def test_fetch_builtin_checks_all_names_before_downloading(cache, monkeypatch):
    monkeypatch.setattr(registry, "_extract", lambda *a, **k: pytest.fail("should not extract"))
    with pytest.raises(CorpusError, match="unknown built-in domain 'nope'"):
        fetch_builtin(["legal", "nope"])


def test_builtin_is_extracted_once_then_read_from_cache(cache, monkeypatch):
    calls = []
    docs = [Document(id="a", text="ünïcode text\nwith lines", group="g"), Document("b", "x", "h")]

    def fake_extract(name, progress):
        calls.append(name)
        return docs

    monkeypatch.setattr(registry, "_extract", fake_extract)
    assert load_builtin("legal", progress=False) == docs
    assert load_builtin("legal", progress=False) == docs
    assert calls == ["legal"]
    folder = cache / "corpora"
    assert [p.name for p in folder.iterdir()] == [f"legal.v{registry.EXTRACT_VERSION}.jsonl"]  # no temp files left behind
    lines = (folder / f"legal.v{registry.EXTRACT_VERSION}.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"id": "a", "text": "ünïcode text\nwith lines", "group": "g"}

    fetch_builtin(["legal"])
    assert calls == ["legal"]


def test_load_domain_prefers_user_data(cache, monkeypatch, tmp_path):
    (tmp_path / "a.txt").write_text(PARAGRAPHS[0])
    monkeypatch.setattr(registry, "_extract", lambda name, progress: [Document("b", name, "b")])
    assert load_domain("legal", {"legal": tmp_path})[0].id == "a.txt"
    assert load_domain("legal", {})[0].text == "legal"
    assert load_domain("floods", {"floods": tmp_path})[0].id == "a.txt"
    with pytest.raises(CorpusError, match="unknown domain 'floods'"):
        load_domain("floods", {})


def test_documents_are_frozen():
    d = Document(id="a", text="t", group="g")
    with pytest.raises(AttributeError):
        d.text = "changed"  # type: ignore[misc]


# --- extractor details ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("licence", "family"),
    [
        ("GPL-2.0-only", "GPL"),
        ("GPL-3.0-or-later", "GPL"),
        ("deprecated_GPL-2.0-with-GCC-exception", "GPL"),
        ("GPL-2.0+", "GPL"),
        ("LGPL-2.1", "LGPL"),
        ("CC-BY-NC-SA-4.0", "CC"),
        ("Zlib", "ZLIB"),
        ("zlib-acknowledgement", "ZLIB"),
        ("0BSD", "0BSD"),
    ],
)
def test_licence_family(licence, family):
    assert licence_family(licence) == family


def test_django_sections_and_release_notes():
    assert section_of(PurePosixPath("howto/csrf.txt")) == "howto/csrf"
    assert section_of(PurePosixPath("ref/models/fields.txt")) == "ref/models"
    assert section_of(PurePosixPath("ref/contrib/gis/install/postgis.txt")) == "ref/contrib/gis"
    assert section_of(PurePosixPath("releases/5.2.txt")) == "releases"
    pages = [
        PurePosixPath(p) for p in ["intro/install.txt", "releases/index.txt", "releases/1.0.1.txt"]
    ]
    pages += [
        PurePosixPath(f"releases/{major}.{minor}.txt")
        for major in range(1, 6)
        for minor in range(10)
    ]
    kept = without_most_release_notes(pages)
    assert PurePosixPath("intro/install.txt") in kept
    releases = [p for p in kept if p.parts[0] == "releases"]
    assert len(releases) == 20
    assert PurePosixPath("releases/5.9.txt") in releases
    assert PurePosixPath("releases/1.0.1.txt") not in releases


def test_play_markdown_is_cleaned():
    md = (
        "# The Tempest\n\n## ACT I\n\n### SCENE I. On a ship at sea.\n\n"
        "_Enter a Master and a Boatswain_\n\n**MASTER**  \nBoatswain!\n\n"
        "**BOATSWAIN**  \n_\\[Within]_  \nHere, master: what cheer?\\--Good.  \n"
    )
    assert clean_markdown(md) == (
        "The Tempest\n\nACT I\n\nSCENE I. On a ship at sea.\n\nEnter a Master and a Boatswain\n\n"
        "MASTER\nBoatswain!\n\nBOATSWAIN\n[Within]\nHere, master: what cheer?--Good."
    )


def test_pubmed_abstract_parts_are_joined():
    xml = b"""<?xml version="1.0"?><PubmedArticleSet>
    <PubmedArticle><MedlineCitation><PMID Version="1">123</PMID><Article><Abstract>
      <AbstractText Label="BACKGROUND">Drugs of <i>abuse</i>  share a property.</AbstractText>
      <AbstractText Label="RESULTS">We present evidence.</AbstractText>
    </Abstract></Article>
    <CommentsCorrectionsList><CommentsCorrections><PMID>999</PMID></CommentsCorrections></CommentsCorrectionsList>
    </MedlineCitation></PubmedArticle>
    <PubmedArticle><MedlineCitation><PMID>124</PMID><Article/></MedlineCitation></PubmedArticle>
    </PubmedArticleSet>"""
    found = [(a.pmid, a.abstract()) for a in articles(io.BytesIO(xml)) if a.abstract()]
    assert found == [("123", "Drugs of abuse share a property.\nWe present evidence.")]


# --- the real corpora -------------------------------------------------------------------------


@pytest.mark.real
def test_real_builtin_corpora():
    from temporal_lora.data import dedupe, split_documents

    for name in BUILTIN_DOMAINS:
        docs = load_builtin(name, progress=False)
        assert len(docs) >= 30, name
        assert all(d.text.strip() and d.id and d.group for d in docs), name
        assert len({d.id for d in docs}) == len(docs), name

        kept = dedupe(docs)
        splits = split_documents(kept, seed=0)
        train_groups = {d.group for d in splits.train}
        assert splits.val and splits.test, name
        assert not train_groups & {d.group for d in splits.test}, name
        assert not train_groups & {d.group for d in splits.val}, name

        if name == "legal":
            ids = {d.id for d in kept}
            assert len(kept) < len(docs) - 30  # many versions collapse
            assert len(ids & {"GPL-2.0", "GPL-2.0+"}) == 1  # identical texts under two ids
            assert len(ids & {f"CC-BY-SA-{v}" for v in ("1.0", "2.0", "2.5", "3.0", "4.0")}) < 5
