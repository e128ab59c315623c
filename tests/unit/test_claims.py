"""tests/claims.py, the kernel tier's sharing of modules between guests:
two real pytest processes at once, one claims directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
# Each test appends "MODULE::TEST PID" to ran.txt and sleeps a little, so
# both processes are likely running while modules are still unclaimed.
MODULE = """
import os, time
import pytest
def _ran(name):
    with open(os.environ["RAN"], "a") as f:
        f.write(f"{{__name__}}::{{name}} {{os.getpid()}}\\n")
    time.sleep(0.05)
@pytest.fixture(scope="module", autouse=True)
def _module_fixture():
    _ran("setup")
    yield
    _ran("teardown")
{tests}
"""


def _suite(tmp_path: Path, modules: int, tests: int) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    for m in range(modules):
        body = "".join(f"def test_{t}():\n    _ran('test_{t}')\n" for t in range(tests))
        (suite / f"test_m{m}.py").write_text(MODULE.format(tests=body))
    return suite


def _pytest(suite: Path, claims: Path, owner: str, ran: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env |= {"PYTHONPATH": str(ROOT), "DOCKERLB_CLAIMS": str(claims), "RAN": str(ran)}
    env["DOCKERLB_CLAIMS_OWNER"] = owner
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.claims", "-p", "no:cacheprovider", str(suite)],
        cwd=suite,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _runs(ran: Path) -> dict[str, set[str]]:
    """Test -> the pids that ran it."""
    by_test: dict[str, set[str]] = {}
    for line in ran.read_text().splitlines():
        test, pid = line.split()
        by_test.setdefault(test, set()).add(pid)
    return by_test


def test_two_guests_at_once_run_every_test_exactly_once_and_each_module_in_one_guest(tmp_path):
    suite, claims, ran = _suite(tmp_path, modules=6, tests=3), tmp_path / "claims", tmp_path / "ran.txt"
    guests = [_pytest(suite, claims, owner, ran) for owner in ("a", "b")]
    outputs = [g.communicate(timeout=120)[0].decode() for g in guests]
    assert [g.returncode for g in guests] == [0, 0], outputs
    runs = _runs(ran)
    steps = ["setup", "test_0", "test_1", "test_2", "teardown"]
    assert sorted(runs) == sorted(f"test_m{m}::{step}" for m in range(6) for step in steps)
    assert all(len(pids) == 1 for pids in runs.values())  # none twice, fixtures set up once
    for m in range(6):  # a module whole in one guest
        assert len(set().union(*(p for t, p in runs.items() if t.startswith(f"test_m{m}::")))) == 1
    # In each guest, a module's fixture is torn down before the next module's is set up.
    for pid in {p for pids in runs.values() for p in pids}:
        mine = [line.split()[0] for line in ran.read_text().splitlines() if line.endswith(f" {pid}")]
        for i in range(0, len(mine), 5):
            module = mine[i].split("::")[0]
            assert mine[i : i + 5] == [f"{module}::{step}" for step in steps]
    # Which guest took how many is the machine's timing: not asserted.


def test_a_module_claimed_by_another_owner_is_left_and_its_own_owners_next_guest_takes_it_back(tmp_path):
    suite, claims, ran = _suite(tmp_path, modules=2, tests=1), tmp_path / "claims", tmp_path / "ran.txt"
    first = _pytest(suite, claims, "a", ran)
    assert first.communicate(timeout=120) and first.returncode == 0
    assert sorted(t for t in _runs(ran) if "test_0" in t) == ["test_m0::test_0", "test_m1::test_0"]

    ran.unlink()
    other = _pytest(suite, claims, "b", ran)
    out = other.communicate(timeout=120)[0].decode()
    assert other.returncode == 0 and not ran.exists(), out  # both were a's: b ran none
    again = _pytest(suite, claims, "a", ran)  # a's guest after a stall
    assert again.communicate(timeout=120) and again.returncode == 0
    assert sorted(t for t in _runs(ran) if "test_0" in t) == ["test_m0::test_0", "test_m1::test_0"]
