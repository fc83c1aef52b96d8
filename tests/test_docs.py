"""The Markdown files: every relative link and image resolves from the file that holds it (a link written as if
from the repository root breaks in docs/ and cluster/)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

OUTPUTS = {"runs", "out"}  # what the jobs write here (.gitignore): their summaries link nothing
MARKDOWN = sorted(
    str(path.relative_to(REPO))
    for path in REPO.rglob("*.md")
    if not any(part.startswith(".") or part in OUTPUTS for part in path.relative_to(REPO).parts)
)
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


@pytest.mark.parametrize("name", MARKDOWN)
def test_every_relative_link_resolves(name):
    path = REPO / name
    targets = [match[1].split("#")[0] for match in LINK.finditer(path.read_text())]
    local = [target for target in targets if target and not re.match(r"[a-z]+:", target)]
    broken = [target for target in local if not (path.parent / target).exists()]
    assert not broken, f"{name} links to {broken}, which is not there relative to the file's own folder"
