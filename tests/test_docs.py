"""The manual stays true to the code: the flag reference is regenerated from the real parser and
compared, and no relative link in the README or docs/ points at a missing file."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img [^>]*src=\"([^\"]+)\"")


def test_the_reference_page_is_what_the_parser_and_the_config_say():
    render = runpy.run_path(str(ROOT / "scripts" / "reference.py"))["render"]
    assert (DOCS / "reference.md").read_text() == render(), \
        "docs/reference.md is out of date: run `python scripts/reference.py`"


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page that are files of this repository (no URL, no bare anchor)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)   # code blocks hold no links
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_in_the_readme_and_the_manual_points_at_a_file():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in [ROOT / "README.md", *PAGES]
              for target in relative_links(page) if not (page.parent / target.split("#")[0]).exists()]
    assert not broken, "links to missing files: " + "; ".join(broken)


def nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_site_lists_every_page_of_the_manual():
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == [page.name for page in PAGES]
