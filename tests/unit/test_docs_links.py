"""Every relative link in the project's Markdown (README.md, docs/*.md,
the compose and examples READMEs, ...) resolves: the file (or folder) it
names exists, and a #fragment names a heading of that file, as GitHub
makes its anchors. Links to the web are not followed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).exists()]


def prose(path: Path) -> str:
    """The file without its fenced code blocks (a link there is an example)."""
    kept, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return "\n".join(kept)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, spaces
    to dashes, punctuation other than - and _ dropped, repeats numbered."""
    found: set[str] = set()
    for line in prose(path).splitlines():
        if not line.startswith("#"):
            continue
        title = line.lstrip("#").strip()
        title = re.sub(r"`|\*\*|\*", "", title)
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    out = []
    for target in LINK.findall(prose(path)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        where = (path.parent / file_part).resolve() if file_part else path
        if not where.exists():
            out.append(f"{path.relative_to(root)}: {target}: no such file")
        elif fragment and where.suffix == ".md" and fragment not in anchors(where):
            out.append(f"{path.relative_to(root)}: {target}: no heading #{fragment}")
    return out


def test_every_relative_link_in_the_projects_markdown_resolves():
    files = markdown_files()
    assert ROOT / "README.md" in files
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs and set(docs) <= set(files)  # the docs/ pages are checked too
    assert [b for f in files for b in broken_links(f)] == []


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n## Two words\n[ok](#two-words) [bad](#nope) [gone](missing.md)\n")
    assert broken_links(page, tmp_path) == [
        "page.md: #nope: no heading #nope",
        "page.md: missing.md: no such file",
    ]
