"""The repository explains itself: every document it cites is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml"}


def repository_texts():
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.suffix in TEXT_SUFFIXES and path.is_file() and not parts & {".git", "build", "runs"}:
            if not any(part.endswith(".egg-info") for part in parts):
                yield path, path.read_text(errors="replace")


def test_every_cited_document_is_in_the_repository():
    cited = set()
    for path, text in repository_texts():
        assert not re.search(r"DESIGN \d", text), f"{path} cites a design document not in the repository"
        cited |= {(path, name) for name in re.findall(r"\bdocs/[\w.-]+\.md\b", text)}
    assert cited
    missing = [f"{path.relative_to(ROOT)}: {name}" for path, name in cited if not (ROOT / name).is_file()]
    assert not missing


def test_method_sections_cited_exist():
    sections = set(re.findall(r"^## (§[\d.]+)", (ROOT / "docs" / "method.md").read_text(), re.MULTILINE))
    for path, text in repository_texts():
        for section in re.findall(r"docs/method\.md (§[\d.]*\d)", text):
            assert section in sections, f"{path} cites {section}, which docs/method.md does not have"
