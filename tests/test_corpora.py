import io
import json
from pathlib import Path, PurePosixPath

import pytest

from temporal_lora import corpora
from temporal_lora.corpora import Document, sources
from temporal_lora.corpora.legal import licence_family
from temporal_lora.corpora.literature import clean_markdown
from temporal_lora.corpora.medline import articles
from temporal_lora.corpora.sources import SOURCES, Source, derive_views, sources_of
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
    assert corpora.parse_data_spec("notes=./my notes") == ("notes", Path("my notes"))
    assert corpora.parse_data_spec("case-law_2=/data/a=b.jsonl") == ("case-law_2", Path("/data/a=b.jsonl"))


@pytest.mark.parametrize("spec", ["notes", "=./x", "notes=", "notes=  "])
def test_parse_data_spec_rejects_malformed(spec):
    with pytest.raises(CorpusError, match="expected NAME=PATH"):
        corpora.parse_data_spec(spec)


@pytest.mark.parametrize("spec", ["Notes=./x", "my notes=./x", "-x=./x", "naïve=./x", "a.b=./x"])
def test_parse_data_spec_rejects_bad_names(spec):
    with pytest.raises(CorpusError, match="lowercase letters, digits"):
        corpora.parse_data_spec(spec)


# --- user corpora -----------------------------------------------------------------------------


def test_folder_corpus_reads_txt_and_md_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(PARAGRAPHS[0])
    (tmp_path / "sub" / "b.md").write_text("# Title\n\n" + PARAGRAPHS[1])
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / "notes.rst").write_text(PARAGRAPHS[2])  # not a corpus suffix
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text(PARAGRAPHS[2])  # hidden: ignored
    docs = corpora.load_user_corpus(tmp_path)
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
    docs = corpora.load_user_corpus(path)
    assert [(d.id, d.group) for d in docs] == [("line-1", "line-1"), ("p2", "flood"), ("7", "7")]
    assert docs[2].text == PARAGRAPHS[2]


def test_user_corpus_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        corpora.load_user_corpus(tmp_path / "nope")


def test_user_corpus_folder_without_text_files(tmp_path):
    (tmp_path / "a.rst").write_text(PARAGRAPHS[0])
    with pytest.raises(CorpusError, match=r"no \.txt, \.md or \.jsonl files"):
        corpora.load_user_corpus(tmp_path)


def test_user_corpus_only_empty_texts(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="are empty"):
        corpora.load_user_corpus(tmp_path)
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(CorpusError, match="no non-empty"):
        corpora.load_user_corpus(path)


def test_user_corpus_undecodable_file_is_named(tmp_path):
    (tmp_path / "good.txt").write_text(PARAGRAPHS[0])
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(CorpusError, match=r"bad\.txt is not UTF-8"):
        corpora.load_user_corpus(tmp_path)
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        CorpusError, match=r"c\.jsonl is not UTF-8 text \(undecodable byte at line 2\)"
    ):
        corpora.load_user_corpus(path)


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
        corpora.load_user_corpus(path)


def test_user_corpus_rejects_other_files(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="folder of .txt/.md/.jsonl files, a .jsonl file or a .txt file"):
        corpora.load_user_corpus(path)


# --- the source table and the built-in corpora ------------------------------------------------


def test_views_are_derived_from_the_one_table():
    views = derive_views(SOURCES)
    assert (sources.BUILTIN_DOMAINS, sources.PRIMARY, sources.SOURCES_BY_DOMAIN) == views
    # In the table's order (the CLI's default --domains): the first source of a domain places it.
    assert corpora.BUILTIN_DOMAINS == ("medical", "legal", "technical", "code", "literature")
    assert corpora.DEFAULT_DOMAINS.split(",") == list(corpora.BUILTIN_DOMAINS) == list(views.domains)
    assert corpora.PRIMARY is sources.PRIMARY and corpora.SOURCES is SOURCES
    for source in SOURCES:  # every entry shows in every view, and only where it belongs
        assert source.domain in corpora.BUILTIN_DOMAINS
        assert source in sources.SOURCES_BY_DOMAIN[source.domain]
        assert source in sources_of(source.domain, held_out=source.held_out)
        assert (corpora.PRIMARY[source.domain] == source.name) == source.primary
    everything = [s for d in corpora.BUILTIN_DOMAINS for s in sources_of(d, held_out=None)]
    assert sorted(s.name for s in everything) == sorted(s.name for s in SOURCES)


def test_one_table_entry_adds_a_domain_everywhere():
    def loader(progress):
        return []

    reports = Source("met-office", "arctic", loader, "forecasts", "nowhere", "CC0-1.0", primary=True)
    logs = Source("ship-logs", "arctic", loader, "logs", "nowhere", "CC0-1.0", held_out=True)
    views = derive_views((*SOURCES, logs, reports))  # the primary need not come first
    assert views.domains == (*corpora.BUILTIN_DOMAINS, "arctic")  # last, as declared
    assert views.primary == {**corpora.PRIMARY, "arctic": "met-office"}
    assert views.by_domain["arctic"] == (logs, reports)
    assert views.by_domain["legal"] == sources.SOURCES_BY_DOMAIN["legal"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "spdx"}, "appear twice"),  # a second entry with a taken name
        ({"primary": False}, "exactly one primary"),  # a domain without its primary
        ({"held_out": True}, "exactly one primary"),  # a primary never trained on
    ],
)
def test_a_malformed_table_is_refused(change, message):
    entry = dict(name="spare", domain="weather", loader=corpora.load_builtin, description="d", origin="o",
                 licence="l", primary=True)
    with pytest.raises(ValueError, match=message):
        derive_views((*SOURCES, Source(**{**entry, **change})))
    with pytest.raises(ValueError, match="exactly one primary"):  # two primaries in one domain
        derive_views((*SOURCES, Source(**{**entry, "domain": "legal"})))


def test_cache_files_keep_their_paths(cache):
    # Users' caches predate the table: these paths must never change (or everything is refetched).
    found = {s.name: s.cache_file().relative_to(cache / "corpora").as_posix() for s in SOURCES}
    assert found["spdx"] == "legal.v1.jsonl"
    assert found["django-docs"] == "technical.v2.jsonl"
    assert found["icd10cm"] == "sources/icd10cm.v1.jsonl"
    primaries = {f"{d}.v{2 if d == 'technical' else 1}.jsonl" for d in corpora.BUILTIN_DOMAINS}
    assert {found[name] for name in corpora.PRIMARY.values()} == primaries
    assert all(found[s.name] == f"sources/{s.name}.v1.jsonl" for s in SOURCES if not s.primary)


def test_unknown_builtin_lists_choices(cache):
    with pytest.raises(CorpusError) as err:
        corpora.load_builtin("finance")
    assert str(err.value) == (
        "unknown built-in domain 'finance'; choose from medical, legal, technical, code, literature"
    )


def test_fetch_builtin_checks_all_names_before_downloading(cache, monkeypatch):
    monkeypatch.setattr(sources, "_extract", lambda *a, **k: pytest.fail("should not extract"))
    with pytest.raises(CorpusError, match="unknown built-in domain 'nope'"):
        corpora.fetch_builtin(["legal", "nope"])


def test_builtin_is_extracted_once_then_read_from_cache(cache, monkeypatch):
    calls = []
    docs = [Document(id="a", text="ünïcode text\nwith lines", group="g"), Document("b", "x", "h")]

    def fake_extract(source, progress):
        calls.append(source.name)
        return docs

    monkeypatch.setattr(sources, "_extract", fake_extract)
    assert corpora.load_builtin("legal", progress=False) == docs
    assert corpora.load_builtin("legal", progress=False) == docs
    assert corpora.load_source("spdx") == docs  # the primary source is the built-in corpus
    assert calls == ["spdx"]
    folder = cache / "corpora"
    assert [p.name for p in folder.iterdir()] == ["legal.v1.jsonl"]  # no temp files left behind
    lines = (folder / "legal.v1.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"id": "a", "text": "ünïcode text\nwith lines", "group": "g"}

    corpora.fetch_builtin(["legal"])
    assert calls == ["spdx"]
    assert corpora.load_source("flask-docs") == docs
    assert calls == ["spdx", "flask-docs"]
    assert (folder / "sources" / "flask-docs.v1.jsonl").is_file()


def test_a_source_that_yields_nothing_is_an_error(cache, monkeypatch):
    monkeypatch.setattr(sources.Source, "cache_file", lambda self: cache / f"{self.name}.jsonl")
    empty = Source("nothing", "legal", lambda progress: [], "d", "o", "l")
    with pytest.raises(CorpusError, match="source 'nothing' produced no documents"):
        sources._cached(empty, progress=False)


def test_load_domain_prefers_user_data(cache, monkeypatch, tmp_path):
    (tmp_path / "a.txt").write_text(PARAGRAPHS[0])
    monkeypatch.setattr(sources, "_extract", lambda source, progress: [Document("b", source.domain, "b")])
    assert corpora.load_domain("legal", {"legal": tmp_path})[0].id == "a.txt"
    assert corpora.load_domain("legal", {})[0].text == "legal"
    assert corpora.load_domain("floods", {"floods": tmp_path})[0].id == "a.txt"
    with pytest.raises(CorpusError, match="unknown domain 'floods'"):
        corpora.load_domain("floods", {})


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

    for name in corpora.BUILTIN_DOMAINS:
        docs = corpora.load_builtin(name, progress=False)
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
