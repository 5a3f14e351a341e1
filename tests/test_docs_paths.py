"""Every project path that README.md and docs/*.md name in backticks exists, so that the docs keep pointing at
real files as the code moves. History pages (dated records of runs) are left as they were written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "finesam"
HISTORY = {"docs/benchmarks.md", "docs/performance-history.md"}  # dated records: they name what existed then
PAGES = [
    p
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    if p.relative_to(ROOT).as_posix() not in HISTORY
]

# a span is a project path when it starts with a folder of the project or of the package (or is a bare source
# or docs file name); spans that name user files (`OUT/metrics.csv`, `labels/`) start elsewhere
FOLDERS = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} | {".ci", "finesam"}
FOLDERS |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("_")}
FOLDERS -= {"tmp", "out"}
SPAN = re.compile(r"`([^`\s]+)`")
NOT_A_PATH = re.compile(r"[*{}<>$:|()=,]")
SEARCHED = [ROOT, ROOT / "src", PACKAGE]


def named_paths(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # commands in code blocks: user paths
    paths = []
    for span in SPAN.findall(text):
        span = span.split("#")[0]  # a link's anchor
        if not span or NOT_A_PATH.search(span) or span.startswith(("/", "~", "http")):
            continue
        first = span.split("/")[0]
        if ("/" in span and first in FOLDERS) or ("/" not in span and re.fullmatch(r"\w+\.(py|md|toml)", span)):
            paths.append(span)
    return paths


def exists(span: str, page: Path) -> bool:
    if "/" not in span:  # a bare file name: anywhere in the project's own folders
        return any(p for p in ROOT.rglob(span) if ".venv" not in p.parts and "node_modules" not in p.parts)
    return any((base / span).exists() for base in [*SEARCHED, page.parent])


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_path_named_in_the_docs_exists(page):
    missing = [span for span in named_paths(page) if not exists(span, page)]
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize(
    "page", [*PAGES, ROOT / "docs" / "benchmarks.md"], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_every_local_link_of_the_docs_exists(page):
    """Links to files of the project, and to headings of its pages, lead somewhere."""
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = page if not path else page.parent / path
        assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_the_check_sees_paths():
    """The patterns find the paths they are meant to find (a check that matches nothing passes vacuously)."""
    named = {span for page in PAGES for span in named_paths(page)}
    assert {"benchmarks/bench.py", "configs/hq_sam.toml"} <= named
