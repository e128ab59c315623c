"""A pytest plugin: one line per finished test, "OUTCOME NODEID", appended
to the file named by DOCKERLB_PROGRESS as soon as the test's teardown ends.

The UML kernel tier loads it (`-p tests.progress`): the guest writes the
file through hostfs, so the host knows which tests finished even when the
guest dies or stalls mid-run, and what is left to run in a new guest.

A new guest is given those lines back (the file named by DOCKERLB_FINISHED)
and leaves out exactly the tests they name: pytest's own `--deselect` takes
a prefix, so deselecting `test_a` would also drop a `test_a_b` never run.

Beside it, "BUSY IDLE NODEID" per test in the same file's `.cpu`: the
machine's (a guest's one CPU's) busy and idle seconds over the test, setup
to teardown, and at the end the tests that left the CPU idle longest: a
guest idle is CI time spent waiting on timers, not on its CPU.
"""

from __future__ import annotations

import os

import pytest

_outcome: dict[str, str] = {}
_cpu_at_start: dict[str, tuple[float, float]] = {}
_cpu: list[tuple[float, float, str]] = []  # (busy, idle, nodeid)


def machine_cpu_seconds() -> tuple[float, float]:
    """The machine's busy and idle CPU-seconds so far (/proc/stat, USER_HZ)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, idle / hz


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


def pytest_runtest_logstart(nodeid: str) -> None:
    if os.environ.get("DOCKERLB_PROGRESS"):
        _cpu_at_start[nodeid] = machine_cpu_seconds()


def pytest_runtest_logfinish(nodeid: str) -> None:
    path = os.environ.get("DOCKERLB_PROGRESS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{_outcome.get(nodeid, 'failed')} {nodeid}\n")
            f.flush()
            os.fsync(f.fileno())
        (busy0, idle0), (busy1, idle1) = _cpu_at_start.pop(nodeid, (0.0, 0.0)), machine_cpu_seconds()
        _cpu.append((busy1 - busy0, idle1 - idle0, nodeid))
        with open(f"{path}.cpu", "a", encoding="utf-8") as f:
            f.write(f"{busy1 - busy0:.1f} {idle1 - idle0:.1f} {nodeid}\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _cpu:
        return
    busy, idle = sum(c[0] for c in _cpu), sum(c[1] for c in _cpu)
    terminalreporter.section(f"CPU over the tests: busy {busy:.0f} s, idle {idle:.0f} s; the most idle")
    for b, i, nodeid in sorted(_cpu, key=lambda c: -c[1])[:10]:
        terminalreporter.write_line(f"idle {i:6.1f} s  busy {b:6.1f} s  {nodeid}")
