"""The repository speaks of the project alone: no tracked text file refers to
how a contributor's own machines are obtained, scheduled or handed back, or to
work left for a later sitting. Those belong in a team's tracker, not in code,
docs or notes an outside contributor reads."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Each a word or phrase that only makes sense inside one team's workflow.
PATTERNS = [
    r"\blent\b",
    r"\bowed\b",
    r"give_back",
    r"\bdevice tool\b",
    r"\bgpu machine\b",
    r"\b(this|next|previous|work) session\b",
    r"budget_left",
    r"can_start_another",
    r"\bnot drawn\b",
]
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".txt",
    ".toml",
    ".cfg",
    ".sh",
    ".h",
    ".cpp",
    ".cu",
    ".cuh",
    ".csv",
    ".log",
    ".yml",
    ".yaml",
    ".json",
    "",
}


def tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout, so no list of tracked files ({err})")
    return [f for f in out.splitlines() if Path(f).suffix in TEXT_SUFFIXES and f != THIS]


def test_tracked_text_speaks_of_the_project_alone():
    files = tracked_text_files()
    assert "README.md" in files and len(files) > 50
    pattern = re.compile("|".join(PATTERNS), re.IGNORECASE)
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not hits, "workflow words in tracked files:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_are_for():
    pattern = re.compile("|".join(PATTERNS), re.IGNORECASE)
    for line in ("run it on the lent GPU machine", "the GPU run owed", "next session"):
        assert pattern.search(line), line
    for line in ("the student's gradient", "a silent failure", "lentil", "borrowed"):
        assert not pattern.search(line), line


# A reference to a section of the docs: `docs/design.md, "The loss"`.
SECTION_REF = re.compile(r'(docs/(?:design|usage)\.md), "([^"]+)"')


def _headings(doc: Path) -> set[str]:
    return {
        line.lstrip("#").strip()
        for line in doc.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }


def test_every_docs_reference_names_a_real_section():
    """Code, docs and error messages point into docs/design.md and
    docs/usage.md by section title; each title must be a heading there, and
    nothing may point to a design file the repository does not hold."""
    headings = {doc: _headings(ROOT / doc) for doc in ("docs/design.md", "docs/usage.md")}
    bad, refs = [], 0
    for name in tracked_text_files():
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if "DESIGN.md" in line:
                bad.append(f"{name}:{number}: points to DESIGN.md, not in the repository")
            for doc, title in SECTION_REF.findall(line):
                refs += 1
                if title not in headings[doc]:
                    bad.append(f'{name}:{number}: {doc} has no section "{title}"')
    assert refs > 10, "the references were not found: has their form changed?"
    assert not bad, "\n".join(bad)
