"""The benchmark docs point only at files that exist, and every file in docs/results is cited."""

from __future__ import annotations

import glob
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = ("benchmarks.md", "lab-notebook.md")
LINK = re.compile(r"\]\(([^)#\s]+)\)")
RESULT = re.compile(r"(?:docs/)?results/([\w.{},*…-]+)")
BARE = re.compile(r"`([\w{},*-]+\.[\w{},]*(?:json|txt|png|md|log)[\w{},]*)`")  # a results file named alone


def expand(pattern: str) -> list[str]:
    """`a_run{1,2}.json` -> a_run1.json, a_run2.json (brace lists as the docs write them)."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def cited(page: str) -> list[str]:
    """Every path a page links to or names under results/, relative to docs/."""
    text = (DOCS / page).read_text()
    links = [m for m in LINK.findall(text) if "://" not in m]
    named = [m.rstrip(".,") for m in RESULT.findall(text) if "…" not in m and "." in m]
    bare = [m for m in BARE.findall(text) if (DOCS / "results" / expand(m)[0]).exists()]
    return links + [f"results/{p}" for m in named + bare for p in expand(m)]


def test_every_link_and_results_path_exists():
    missing = [
        (page, p) for page in PAGES for p in cited(page) if not glob.glob(str(DOCS / p)) and not (DOCS / p).exists()
    ]
    assert not missing


def test_every_results_file_is_cited_somewhere():
    found = {Path(f).name for page in PAGES for p in cited(page) for f in glob.glob(str(DOCS / p))}
    others = " ".join(p.read_text() for p in DOCS.glob("*.md") if p.name not in PAGES)
    uncited = [f.name for f in (DOCS / "results").iterdir() if f.name not in found and f.name not in others]
    assert not uncited


def test_scorecard_stays_short():
    assert len((DOCS / "benchmarks.md").read_text().splitlines()) <= 300
