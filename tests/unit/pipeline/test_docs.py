"""The README is a front door (at most 220 lines) and every relative link in it and in docs/
resolves to a file of the repository; the README's headline picture exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(path.read_text()) if not target.startswith(("http://", "https://", "mailto:"))]


def test_readme_is_short_and_every_relative_link_resolves() -> None:
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 220
    pages = [readme, *sorted((REPO / "docs").glob("*.md")), REPO / "models" / "README.md"]
    missing = [f"{page.relative_to(REPO)} -> {target}" for page in pages for target in links(page)
               if not (page.parent / target).exists()]
    assert missing == []
    assert {"docs/usage.md", "docs/serving.md", "docs/architecture.md", "docs/training.md", "docs/RESULTS.md",
            "docs/wer_latency.png"} <= set(links(readme))


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("see [there](missing.md) and [here](page.md#top) and [web](https://example.org)\n")
    assert links(page) == ["missing.md", "page.md"]
    assert not (page.parent / "missing.md").exists()
