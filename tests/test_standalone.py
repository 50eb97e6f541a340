"""The repository stands alone: nothing points outside it, and its documents' links resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Spelled in pieces so that this file does not match its own check.
OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "CONTAINERS" + ".md")
VENDORED = {"tests/compose-spec.json"}  # the Compose Specification's schema, kept as published
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf", ".whl", ".gz", ".zip"}
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.decode().split("\0") if name]


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary or a file gone from the working tree."""
    if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def relative_links(markdown: str) -> list[str]:
    """Link targets that are paths in the repository (not URLs, not in-page anchors)."""
    prose = FENCE.sub("", markdown)
    targets = LINK.findall(prose) + REFERENCE.findall(prose)
    return [
        t
        for t in targets
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith(("#", "//"))
    ]


@pytest.mark.timeout(60)
def test_nothing_refers_outside_the_repository():
    offenders = []
    for path in {*tracked_files(), *documents()}:
        name = path.relative_to(ROOT).as_posix()
        text = None if name in VENDORED else text_of(path)
        for number, line in enumerate((text or "").splitlines(), 1):
            if any(word in line for word in OUTSIDE):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "references to files outside the repository:\n" + "\n".join(
        sorted(offenders)
    )


@pytest.mark.timeout(60)
def test_the_design_and_the_container_setup_are_in_the_repository():
    for name in ("docs/design.md", "docs/containers.md"):
        assert (ROOT / name).is_file(), f"{name} is missing"
    readme = (ROOT / "README.md").read_text()
    assert "docs/design.md" in relative_links(readme)
    assert "docs/containers.md" in relative_links(readme)


@pytest.mark.timeout(60)
def test_document_links_point_at_files_in_the_repository():
    broken = []
    for doc in documents():
        for target in relative_links(doc.read_text()):
            path = target.split("#", 1)[0]
            if not path:
                continue
            resolved = (doc.parent / path).resolve()
            inside = resolved == ROOT or ROOT in resolved.parents
            if not inside or not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that the repository does not have:\n" + "\n".join(broken)


def test_relative_links_are_recognised():
    text = (
        "See [a](docs/a.md), [web](https://x.y/z), [top](#top) and\n"
        '[t](docs/t.md "title").\n\n[ref]: ../outside.md\n\n```\n[no](code.md)\n```\n'
    )
    assert relative_links(text) == ["docs/a.md", "docs/t.md", "../outside.md"]
