"""More sources per built-in domain, for the router: other publishers and registers of each domain.

The loaders of the non-primary sources in the table (corpora/sources.py). Each reads a registry
package (PyPI via pip, Debian via `apt-get download`) or files on the machine. They take the
`progress` flag every loader takes but show no bar (they never did: each reads one archive or folder).
"""

from __future__ import annotations

import gzip
import importlib.util
import re
import subprocess
import sysconfig
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from temporal_lora.cache import cache_dir, fetch_package
from temporal_lora.corpora.document import Document
from temporal_lora.corpora.medline import all_articles
from temporal_lora.errors import CorpusError, FetchError

FLASK = "flask==3.1.0"
CLICK = "click==8.1.8"
ICD10CM = "simple-icd-10-cm==1.5.0"
DEBIAN_FORTUNES = "fortunes"
NODEJS_DOC, PERL_DOC, GIT_DOC, PERL_MODULES = "nodejs-doc", "perl-doc", "git-doc", "perl-modules-5.36"
LIBRARY_CODE = ("transformers", "peft", "accelerate")
_RST_MIN_WORDS = 60


def _sdist_members(requirement: str, keep: Callable[[PurePosixPath], bool]) -> list[tuple[PurePosixPath, str]]:
    out = []
    with tarfile.open(fetch_package(requirement, sdist=True)) as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if member.isfile() and len(path.parts) > 1 and keep(PurePosixPath(*path.parts[1:])):
                out.append((PurePosixPath(*path.parts[1:]),
                            tar.extractfile(member).read().decode("utf-8", errors="replace")))
    return sorted(out)


def _pallets_docs(requirement: str, prefix: str) -> list[Document]:
    """reStructuredText pages of a Pallets project's docs (changelog and licence pages left out)."""
    skip = {"changes.rst", "license.rst", "contributing.rst"}
    pages = _sdist_members(requirement, lambda p: p.parts[0] == "docs" and p.suffix == ".rst" and p.name not in skip)
    return [Document(id=f"{prefix}/{p.as_posix()}", text=t.strip(), group=f"{prefix}/{p.parent.as_posix()}/{p.stem}")
            for p, t in pages if len(t.split()) >= _RST_MIN_WORDS]


def _pallets_code(requirement: str, prefix: str) -> list[Document]:
    files = _sdist_members(requirement, lambda p: p.parts[0] == "src" and p.suffix == ".py")
    return [Document(id=f"{prefix}/{p.as_posix()}", text=t, group=f"{prefix}/{p.as_posix()}")
            for p, t in files if t.count("\n") >= 40]


def flask_docs(*, progress: bool = False) -> list[Document]:
    return _pallets_docs(FLASK, "flask")


def click_docs(*, progress: bool = False) -> list[Document]:
    return _pallets_docs(CLICK, "click")


def pallets_code(*, progress: bool = False) -> list[Document]:
    return _pallets_code(FLASK, "flask") + _pallets_code(CLICK, "click")


def python_reference(*, progress: bool = False) -> list[Document]:
    """The Python language reference as pydoc ships it (stdlib `pydoc_data/topics.py`): documentation
    prose about a programming language, one document per topic."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise CorpusError(f"{path} is missing: this Python has no pydoc topics")
    namespace: dict = {}
    # The file is the interpreter's own data module (a dict literal); read it without importing pydoc.
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)  # noqa: S102
    return [Document(id=f"pydoc/{k}", text=v.strip(), group=f"pydoc/{k}")
            for k, v in sorted(namespace["topics"].items()) if len(v.split()) >= _RST_MIN_WORDS]


def numpy_code(*, progress: bool = False) -> list[Document]:
    """numpy's own Python source (long numpydoc docstrings), from the installed package; tests skipped."""
    spec = importlib.util.find_spec("numpy")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("numpy is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    docs = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if {"tests", "testing", "_examples", "f2py"} & set(rel.parts) or rel.name.startswith("test_"):
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.count("\n") >= 40:
            docs.append(Document(id=f"numpy/{rel.as_posix()}", text=text, group=f"numpy/{rel.parts[0]}"))
    return docs


def common_licenses(*, progress: bool = False) -> list[Document]:
    """Debian's copies of the common licences (/usr/share/common-licenses), plus the licence files
    that installed Python packages carry in their dist-info (copyright lines, NOTICE files)."""
    docs = []
    root = Path("/usr/share/common-licenses")
    for file in sorted(root.glob("*")) if root.is_dir() else []:
        if file.is_file() and not file.is_symlink():
            docs.append(Document(id=f"debian-licences/{file.name}", text=file.read_text(errors="replace").strip(),
                                 group=f"debian-licences/{file.name.split('-')[0]}"))
    site = Path(sysconfig.get_paths()["purelib"])
    for file in sorted(site.glob("*.dist-info/**/*")):
        name = file.name.upper()
        if file.is_file() and (name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE"))):
            text = file.read_text(errors="replace").strip()
            if len(text.split()) >= 80:
                dist = file.relative_to(site).parts[0].split("-")[0].lower()
                docs.append(Document(id=f"dist-info/{dist}/{file.name}", text=text, group=f"dist-info/{dist}"))
    return docs


def debian_copyright(*, progress: bool = False) -> list[Document]:
    """Debian packages' machine-readable copyright files (/usr/share/doc/*/copyright)."""
    docs = []
    for file in sorted(Path("/usr/share/doc").glob("*/copyright")):
        if file.is_symlink():
            continue
        text = file.read_text(errors="replace").strip()
        if len(text.split()) >= 80:
            docs.append(Document(id=f"debian-copyright/{file.parent.name}", text=text,
                                 group=f"debian-copyright/{file.parent.name}"))
    return docs


def icd10cm(*, progress: bool = False) -> list[Document]:
    """The ICD-10-CM tabular list (CDC/CMS), one document per block of categories: code titles with
    their inclusion terms and notes, one line each."""
    archive = fetch_package(ICD10CM)
    with zipfile.ZipFile(archive) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".xml") and "tabular" in n)
        root = ET.fromstring(zf.read(name))
    docs = []
    for section in root.iter("section"):
        lines = [section.findtext("desc", "").strip()]
        for diag in section.iter("diag"):
            lines.append(f"{diag.findtext('name', '')} {diag.findtext('desc', '')}".strip())
            for note in diag.iterfind("./*/note"):
                if note.text:
                    lines.append(note.text.strip())
        text = "\n".join(x for x in lines if x)
        sid = section.get("id", str(len(docs)))
        if len(text.split()) >= 40:
            docs.append(Document(id=f"icd10cm/{sid}", text=text, group=f"icd10cm/{sid}"))
    return docs


def medline_titles(per_doc: int = 15, *, progress: bool = False) -> list[Document]:
    """PubMed article titles with their major MeSH topics, one line each, 15 articles per document:
    the short, heading-like register of the same literature (titles that are questions included)."""
    lines = []
    for article in all_articles():
        if article.title:
            topics = "; ".join(article.major_topics[:4])
            lines.append(article.title + (f"\nMeSH: {topics}" if topics else ""))
    lines = list(dict.fromkeys(lines))
    return [Document(id=f"medline-titles/{i // per_doc}", text="\n\n".join(lines[i:i + per_doc]),
                     group=f"medline-titles/{i // per_doc}") for i in range(0, len(lines), per_doc)]


def _debian_members(package: str, keep: Callable[[PurePosixPath], bool]) -> list[tuple[PurePosixPath, str]]:
    """Files of a Debian package (fetched with `apt-get download` into the cache) whose path inside
    the package `keep` accepts, as (path, text); `.gz` files are decompressed."""
    dest = cache_dir() / "packages" / "debian"
    dest.mkdir(parents=True, exist_ok=True)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            try:
                proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            except OSError as exc:  # no apt-get on this machine
                raise FetchError(f"could not download Debian package {package}: {exc}") from exc
            got = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if proc.returncode != 0 or not got:
                raise FetchError(f"could not download Debian package {package}: {proc.stderr.strip()[-200:]}")
            got[0].replace(dest / got[0].name)
        debs = sorted(dest.glob(f"{package}_*.deb"))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), tmp], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise FetchError(f"could not unpack Debian package {package}: {exc}") from exc
        for file in sorted(Path(tmp).rglob("*")):
            rel = PurePosixPath(file.relative_to(tmp).as_posix())
            if file.is_file() and not file.is_symlink() and keep(rel):
                data = file.read_bytes()
                out.append((rel, (gzip.decompress(data) if rel.suffix == ".gz" else data)
                            .decode("utf-8", errors="replace")))
    return out


def _debian_file(package: str, member: str) -> str:
    """One file of a Debian package."""
    found = _debian_members(package, lambda p: p.as_posix() == member.lstrip("/"))
    if not found:
        raise CorpusError(f"Debian package {package} has no {member}")
    return found[0][1]


def _sections(text: str, min_words: int = 60, max_words: int = 600) -> list[str]:
    """A long page cut at blank lines into pieces of about `max_words` words (short ones dropped):
    documents of the size the other sources have, so that one huge page does not dominate a split."""
    pieces, current, words = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        current.append(para.strip("\n"))
        words += len(para.split())
        if words >= max_words:
            pieces.append("\n\n".join(current))
            current, words = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return [p.strip() for p in pieces if len(p.split()) >= min_words]


def _paged(prefix: str, pages: list[tuple[PurePosixPath, str]]) -> list[Document]:
    """Each page's sections as documents grouped by page (a page's sections share a split)."""
    docs = []
    for path, text in pages:
        name = path.name.removesuffix(".gz")
        for i, piece in enumerate(_sections(text)):
            docs.append(Document(id=f"{prefix}/{name}/{i}", text=piece, group=f"{prefix}/{name}"))
    return docs


_POD_CODE = re.compile(r"[A-Z]<<+\s(.*?)\s>+>|[A-Z]<([^<>]*)>")


def _pod_to_text(pod: str) -> str:
    """Perl's POD as plain text: headings kept as lines, other commands dropped, C<...>-style
    formatting codes replaced by their content (verbatim code paragraphs stay indented)."""
    lines = []
    for line in pod.splitlines():
        if line.startswith("=head"):
            lines.append(line.split(None, 1)[1] if " " in line else "")
        elif line.startswith("=item"):
            lines.append(line[5:].strip())
        elif line.startswith("="):
            continue
        else:
            lines.append(line)
    text = "\n".join(lines)
    for _ in range(3):  # formatting codes nest (B<C<...>>)
        text = _POD_CODE.sub(lambda m: (m.group(1) or m.group(2) or "").split("|")[-1], text)
    return text


def _strip_pod(code: str) -> str:
    """Perl source without its embedded POD blocks (`=head1 ... =cut`): code, not documentation."""
    return re.sub(r"^=[a-zA-Z].*?(^=cut\b.*?$|\Z)", "", code, flags=re.M | re.S)


def nodejs_docs(*, progress: bool = False) -> list[Document]:
    """Node.js API documentation (Markdown; Debian nodejs-doc), cut into sections."""
    pages = _debian_members(NODEJS_DOC, lambda p: p.parent.name == "api" and p.name.endswith(".md.gz"))
    return _paged("nodejs", [(p, re.sub(r"<!--.*?-->", "", t, flags=re.S)) for p, t in pages])


def perl_docs(*, progress: bool = False) -> list[Document]:
    """Perl's manual (POD: perlintro, perlsyn, perlop, perlfaq, ...; Debian perl-doc); the per-release
    change logs (perl*delta) left out."""
    pages = _debian_members(PERL_DOC, lambda p: p.parent.name == "pod" and p.suffix == ".pod"
                            and not p.stem.endswith("delta"))
    return _paged("perl-doc", [(p, _pod_to_text(t)) for p, t in pages])


def git_docs(*, progress: bool = False) -> list[Document]:
    """Git's manual pages and guides (AsciiDoc text; Debian git-doc)."""
    pages = _debian_members(GIT_DOC, lambda p: p.parent.name == "git-doc" and p.suffix == ".txt")
    return _paged("git-doc", pages)


def perl_code(*, progress: bool = False) -> list[Document]:
    """Perl core modules' source with the embedded POD removed (Debian perl-modules)."""
    files = _debian_members(PERL_MODULES, lambda p: p.suffix == ".pm")
    docs = []
    for path, text in files:
        code = _strip_pod(text)
        if code.count("\n") >= 40:
            rel = path.as_posix().split("/5.36.0/")[-1]
            docs.append(Document(id=f"perl/{rel}", text=code.strip(), group=f"perl/{rel.split('/')[0]}"))
    return docs


def library_code(per_package: int = 150, *, progress: bool = False) -> list[Document]:
    """Python source with long docstrings from the installed transformers, PEFT and accelerate (pinned
    dependencies), every k-th file in path order so all parts of each library appear."""
    docs = []
    for package in LIBRARY_CODE:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CorpusError(f"{package} is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        files = [f for f in sorted(root.rglob("*.py")) if "test" not in f.name and f.stat().st_size > 4000]
        step = max(1, len(files) // per_package)
        for file in files[::step][:per_package]:
            rel = file.relative_to(root).as_posix()
            # The licence header comment is legal text, not code: dropped.
            text = re.sub(r"\A(#.*\n|\s*\n)+", "", file.read_text(encoding="utf-8", errors="replace"))
            docs.append(Document(id=f"{package}/{rel}", text=text, group=f"{package}/{rel.rsplit('/', 1)[0]}"))
    return docs


def _fortunes(files: tuple[str, ...], prefix: str, per_doc: int = 12) -> list[Document]:
    docs = []
    for fname in files:
        entries = [e.strip("\n") for e in _debian_file(DEBIAN_FORTUNES, f"usr/share/games/fortunes/{fname}")
                   .split("\n%\n") if len(e.split()) >= 8]
        for i in range(0, len(entries), per_doc):
            docs.append(Document(id=f"{prefix}/{fname}/{i // per_doc}", text="\n\n".join(entries[i:i + per_doc]),
                                 group=f"{prefix}/{fname}/{i // per_doc}"))
    return docs


def fortunes_poems(*, progress: bool = False) -> list[Document]:
    return _fortunes(("songs-poems",), "fortunes")


def fortunes_quotations(*, progress: bool = False) -> list[Document]:
    """Quotations of writers (Debian `fortunes`: love, wisdom, humorists)."""
    return _fortunes(("love", "wisdom", "humorists"), "fortunes")
