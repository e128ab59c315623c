"""The docs say what the code does: docs/labels.md's table lists exactly
the label keys (as the oracle has them), docs/operating.md's settings table
every option of `dockerlb run` with its variable, and the README's test
command is the one CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dockerlb.app.cli import _OPTIONS, _field
from tests.unit.label_oracle import KEYS

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def table_rows(path: Path, heading: str) -> list[list[str]]:
    """The rows of the first table under ``heading`` (a line of the file),
    each as its cells (``\\|`` is a pipe inside a cell)."""
    lines = path.read_text().splitlines()
    at = lines.index(heading)
    rows = []
    for line in lines[at + 1 :]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return [re.split(r"(?<!\\)\|", row)[1:-1] for row in rows[2:]]  # past the header and its rule


def test_the_label_table_lists_exactly_the_contracts_keys():
    named: set[str] = set()
    for row in table_rows(ROOT / "docs" / "labels.md", "## Every label"):
        named |= set(re.findall(r"`dockerlb\.([a-z_]+)`", row[0]))
    assert named == KEYS | {"owner"}


def test_the_settings_table_names_every_option_and_its_variable():
    rows = table_rows(ROOT / "docs" / "operating.md", "## Settings")
    missing = []
    for flag, _ in _OPTIONS:
        name = _field(flag)
        option, variable = flag.split("/")[0], f"`DOCKERLB_{name.upper()}`"
        if not any(f"`{option}" in row[0] and variable in row[1] for row in rows):
            missing.append(f"{option} {variable}")
    assert missing == []
    assert len(rows) == len(_OPTIONS)


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["scripts/lab", "tests/run"]
    ran = [
        shlex.split(line)
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert ran == [["exec", "bash", "tests/run"]]  # tests/run, as the README has it
