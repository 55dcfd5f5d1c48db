"""The docs a newcomer reads stay whole: every relative link and image in README.md,
docs/*.md and examples/**/README.md names a file in the repository (and, with `#anchor`, a
heading there), none leaves the repository, and the README stays short enough to read."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

README_MAX_LINES = 320
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def documents() -> list[Path]:
    """The Markdown a reader follows links through."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "examples").rglob("README.md"))]


def links(text: str) -> list[str]:
    """Link and image targets outside code (a `](x)` in a code block is not a link)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose.replace("\n", " "))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file's headings give (outside code blocks), GitHub's way:
    repeated headings get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken(doc: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link in one document of the repository at `root`,
    one line each."""
    problems = []
    for target in links(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
            continue
        where, _, anchor = target.partition("#")
        path = (doc.parent / where).resolve() if where else doc
        name = f"{doc.relative_to(root)}: {target}"
        if not path.is_relative_to(root.resolve()):
            problems.append(f"{name} leaves the repository")
        elif not path.exists():
            problems.append(f"{name} names no file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{name} names no heading of {path.relative_to(root.resolve())}")
    return problems


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc):
    assert broken(doc) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text())}
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked] == []


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_the_checker_catches_what_it_is_for(tmp_path):
    """A check that cannot fail is no check: in a small repository of real files, a missing
    file, an escape from the repository and a wrong anchor are caught; a good anchor, an
    image, a link back to the README and a link inside code pass."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "README.md").write_text("# Title\n\n## Quick start\n")
    (repo / "docs" / "native.md").write_text("# Native\n\n## The coder\n\n```\n# not a heading\n```\n")
    (repo / "docs" / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "outside.md").write_text("# Outside\n")
    probe = repo / "docs" / "probe.md"
    probe.write_text("[a](missing.md) [b](../../outside.md) [c](native.md#no-such-heading)\n"
                     "[d](native.md#the-coder) ![e](pic.png) [f](../README.md#quick-start)\n"
                     "[g](native.md#not-a-heading) `[h](nowhere.md)`\n\n```\n[i](nowhere.md)\n```\n")
    assert broken(probe, repo) == [
        "docs/probe.md: missing.md names no file",
        "docs/probe.md: ../../outside.md leaves the repository",
        "docs/probe.md: native.md#no-such-heading names no heading of docs/native.md",
        "docs/probe.md: native.md#not-a-heading names no heading of docs/native.md",
    ]
    assert slug("Conv heads everywhere a head goes") == "conv-heads-everywhere-a-head-goes"
    assert slug("Set-up: two commands on a fresh machine (Debian, Python 3.11, root)") == \
        "set-up-two-commands-on-a-fresh-machine-debian-python-311-root"
