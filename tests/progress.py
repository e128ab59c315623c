"""A pytest plugin: one line per finished test, "OUTCOME NODEID", appended
to the file named by DOCKERLB_PROGRESS as soon as the test's teardown ends.

The UML kernel tier loads it (`-p tests.progress`): the guest writes the
file through hostfs, so the host knows which tests finished even when the
guest dies or stalls mid-run, and what is left to run in a new guest.
"""

from __future__ import annotations

import os

import pytest

_outcome: dict[str, str] = {}


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
