"""Every relative link and image in README.md and docs/ resolves, and README links every docs page.

Plain text parsing only: no model, no torch.
"""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKDOWN = [README, *sorted(DOCS.rglob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; <target> may hold spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, ...


def relative_targets(md: Path) -> list[str]:
    """The relative link/image targets of one Markdown file, without #anchors; code is skipped."""
    text = FENCE.sub("", md.read_text(encoding="utf-8"))
    # Blank out inline code but keep its length, so that `code` inside link text keeps the link.
    text = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), text)
    targets = []
    for match in LINK.finditer(text):
        target = match.group(1).strip("<>").strip()
        if not target or target.startswith("#") or EXTERNAL.match(target):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if path:
            targets.append(path)
    return targets


def test_readme_and_docs_exist():
    assert README.is_file()
    assert DOCS.is_dir() and any(DOCS.rglob("*.md")), "docs/ has no Markdown pages"


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path):
    broken = [t for t in relative_targets(md) if not (md.parent / t).exists()]
    assert not broken, f"{md.relative_to(ROOT)}: links to missing files: {broken}"


def test_every_docs_page_is_linked_from_readme():
    linked = {(README.parent / t).resolve() for t in relative_targets(README)}
    pages = sorted(DOCS.rglob("*.md"))
    orphans = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not orphans, f"docs pages not linked from README.md: {orphans}"


def test_parser_finds_links_and_skips_code_and_external(tmp_path: Path):
    sample = tmp_path / "sample.md"
    sample.write_text(
        '[a](docs/x.md#part) ![img](../y.png "title") [`code` text](<with space.md>)\n'
        "[web](https://example.org) [mail](mailto:a@b.c) [anchor](#top)\n"
        "`[not](a-link.md)`\n```\n[inside](fence.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_targets(sample) == ["docs/x.md", "../y.png", "with space.md"]
