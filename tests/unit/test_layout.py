"""Where code may reach: the product, the benchmarks and the lab never
import the tests (what they share lives in harness/), and the product
imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def imported(path: Path) -> set[str]:
    """The top-level packages a file imports (its own statements, as written)."""
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def files(*folders: str) -> list[Path]:
    found = [p for folder in folders for p in (ROOT / folder).rglob("*.py")]
    assert found, folders
    return found


def test_nothing_outside_the_tests_imports_them():
    outside = files("dockerlb", "harness", "bench", "scripts")
    assert [str(p.relative_to(ROOT)) for p in outside if "tests" in imported(p)] == []


def test_the_product_imports_neither_the_harness_nor_the_benchmarks():
    product = files("dockerlb")
    assert [str(p.relative_to(ROOT)) for p in product if imported(p) & {"harness", "bench", "tests"}] == []


def test_the_check_sees_an_import_of_the_tests(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom tests.memory_ports import MemoryIpvs\n")
    assert imported(sample) == {"os", "tests"}
