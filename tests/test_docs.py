"""The README and docs/ have no dead references: every relative link resolves (its #anchor to a
heading of the page it points at), and every project path they mention exists."""

import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# a path into the project's own folders, wherever it is written (prose, inline code, code blocks)
PATH = re.compile(
    r"(?<![\w/.$<-])((?:pipeline|assets|resources|tests|bench|docs|\.ci|data/raw)/[\w./-]*[\w/]|"
    r"(?:Makefile|pyproject\.toml|constraints\.txt|workspace\.yaml)\b)"
)
MODULE = re.compile(r"`((?:pipeline|assets|resources)(?:\.\w+)+)`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def test_the_slug_follows_github():
    assert slug("Training (`lora_adapter`)") == "training-lora_adapter"
    assert (
        slug("Living with it: `make ui`, the sensor, the schedule, presets")
        == "living-with-it-make-ui-the-sensor-the-schedule-presets"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT)))
def test_every_project_path_and_module_mentioned_exists(page):
    text = re.sub(r"https?://\S+", "", page.read_text())
    missing = sorted({p for p in PATH.findall(text) if not (PROJECT / p).exists()})
    for module in MODULE.findall(text):
        base = PROJECT / module.replace(".", "/")
        if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
            missing.append(module)
    assert not missing, f"{page.name} mentions what does not exist: {missing}"


def test_the_readme_is_a_front_door():
    """What it is, the two commands, a picture, today's figures, where to read on: short by
    content, so a generous guard on its length; no history (dates, commits) and no packed lines."""
    lines = (PROJECT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: reference material belongs in docs/"
    assert all(len(line) <= 200 for line in lines), [i for i, line in enumerate(lines, 1) if len(line) > 200]
    text = "\n".join(lines)
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b|\b[0-9a-f]{7}[0-9a-f]*\b", text), (
        "a date or a commit in README.md: history lives in git"
    )
    assert "make run" in text and "make test" in text and "![" in text
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"


def test_the_settings_reference_is_written_from_the_declarations():
    """docs/configuration.md's tables are what `make docs` writes from the settings as declared now."""
    from pipeline.ops.settings_doc import DOC, rewritten

    assert rewritten(DOC.read_text()) == DOC.read_text(), "docs/configuration.md is stale: run `make docs`"


HISTORY = re.compile(r"\b[Ii]ssues? \d+|\b[Ss]ession \d+|closing note|\bwork period|\b20\d\d-\d\d-\d\d\b")


def test_no_words_of_how_the_project_was_made():
    """The project's text speaks of the project: no issue numbers, work periods, closing notes or
    dates in the docs, the code, the tests or the benchmarks (history lives in git)."""
    code = (p for d in ("pipeline", "assets", "resources", "tests", "bench") for p in (PROJECT / d).rglob("*.py"))
    files = [*PAGES, *(p for p in code if p.name != "test_docs.py")]  # this file names the words
    found = [
        f"{p.relative_to(PROJECT)}:{i}: {m.group(0)}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        for m in [HISTORY.search(line)]
        if m
    ]
    assert not found, found
