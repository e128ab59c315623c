"""A pytest plugin: one line per finished test, "OUTCOME NODEID", appended
to the file named by DOCKERLB_PROGRESS as soon as the test's teardown ends.

The UML kernel tier loads it (`-p tests.progress`): the guest writes the
file through hostfs, so the host knows which tests finished even when the
guest dies or stalls mid-run, and what is left to run in a new guest.

A new guest is given those lines back (the file named by DOCKERLB_FINISHED)
and leaves out exactly the tests they name: pytest's own `--deselect` takes
a prefix, so deselecting `test_a` would also drop a `test_a_b` never run.
"""

from __future__ import annotations

import os

import pytest

_outcome: dict[str, str] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = os.environ.get("DOCKERLB_FINISHED")
    if not path:
        return
    with open(path, encoding="utf-8") as f:
        finished = {line.split(" ", 1)[1] for line in f.read().splitlines() if " " in line}
    kept = [item for item in items if item.nodeid not in finished]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in finished])
        items[:] = kept


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # The worst phase wins: a passed call with a failed teardown is a failure.
    if report.failed:
        _outcome[report.nodeid] = "failed"
    elif report.skipped:
        _outcome.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        _outcome.setdefault(report.nodeid, "passed")


def pytest_runtest_logfinish(nodeid: str) -> None:
    path = os.environ.get("DOCKERLB_PROGRESS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{_outcome.get(nodeid, 'failed')} {nodeid}\n")
            f.flush()
            os.fsync(f.fileno())
