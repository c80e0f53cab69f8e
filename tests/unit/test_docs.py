"""The Markdown a reader opens renders as written: every code block is closed (one left
open turns the rest of the page into code) and every link to a heading of the repo's
own pages lands on one."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").rglob("*.md")],
    key=str,
)
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\]\(([^)\s]*?)#([^)\s]+)\)")
ANCHOR = re.compile(r'<a id="([^"]+)">')


def _anchors(page: Path) -> set[str]:
    """Explicit `<a id>`s and GitHub's heading slugs (a repeated one gets `-1`, `-2`...);
    a `#` line inside a code block is no heading."""
    text = page.read_text()
    slugs: collections.Counter[str] = collections.Counter()
    found = set(ANCHOR.findall(text))
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            title = line.lstrip("#").strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            found.add(f"{slug}-{slugs[slug]}" if slugs[slug] else slug)
            slugs[slug] += 1
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_is_closed(page: Path) -> None:
    fences = [n for n, line in enumerate(page.read_text().splitlines(), 1) if FENCE.match(line)]
    assert len(fences) % 2 == 0, f"a code block opened at line {fences[-1]} is never closed"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_to_a_heading_lands(page: Path) -> None:
    missing = []
    for target, anchor in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        linked = (page.parent / target).resolve() if target else page
        if not linked.is_file() or anchor not in _anchors(linked):
            missing.append(f"{target}#{anchor}")
    assert not missing
