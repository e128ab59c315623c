"""Health checks within the host's descriptors (issue 29): probes in flight
capped overall and per container, and a host out of descriptors checks
nothing rather than marking healthy servers down.

Real sockets on 127.0.0.1 (tests/check_servers.py); the one real way to run
out of descriptors is a process of its own with a low soft limit."""

import json
import os
import resource
import subprocess
import sys
import textwrap
from ipaddress import ip_address
from pathlib import Path

import pytest

from dockerlb.adapters.health import HealthChecker
from dockerlb.core.model import CheckState, CheckTarget, HealthCheck
from harness.dockerlab import wait_for
from tests.check_servers import healthy_server, stalling_server, started

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ip_address("127.0.0.1")
STEADY = {"interval": 0.3, "timeout": 1, "rise": 2, "fall": 3}  # no flap on a busy machine


def test_stalled_probes_past_the_overall_cap_never_hold_more_sockets_than_it_and_a_healthy_server_rises():
    # 12 containers whose server accepts and never answers, each probe
    # failing after its 1 s timeout; at most 8 probes in flight. The
    # longest overdue probe starts first, so the healthy one gets its turns.
    stalled = {"interval": 0.2, "timeout": 1, "rise": 1, "fall": 1}
    with stalling_server() as stuck, healthy_server() as good:
        stalls = [
            CheckTarget(f"s{n}", f"s{n}", LOOPBACK, stuck.port, HealthCheck("http", "/", **stalled))
            for n in range(12)
        ]
        healthy = CheckTarget("good", "good", LOOPBACK, good, HealthCheck("http", "/", **STEADY))
        checker = HealthChecker(None, max_probes=8)
        with started(checker) as changes:
            checker.watch([*stalls, healthy])
            # The report, not states(): a state is set before on_change runs (issue 34).
            wait_for(lambda: ("good", "check up") in changes, 60, what="healthy server reported up")
            assert checker.states().get("good") is CheckState.UP
            wait_for(lambda: stuck.peak() == 8, 30, what="the cap's 8 probes stalled at once")
        # Old code: all 12 at once.
        assert stuck.peak() == 8


def test_one_containers_stalled_probes_hold_four_sockets_at_most():
    # One container, ten checks on a server that never answers, for an
    # hour; another container is still checked (the overall cap is 256).
    hour = {"interval": 3600, "timeout": 3600, "rise": 1, "fall": 1}
    with stalling_server() as stuck, healthy_server() as good:
        stalls = [
            CheckTarget("stuck", "stuck", LOOPBACK, stuck.port, HealthCheck("http", f"/{n}", **hour))
            for n in range(10)
        ]
        healthy = CheckTarget("good", "good", LOOPBACK, good, HealthCheck("http", "/", **STEADY))
        checker = HealthChecker(None)
        with started(checker):
            checker.watch([*stalls, healthy])
            wait_for(lambda: stuck.live() == 4, 30, what="4 of the container's checks stalled")
            wait_for(lambda: checker.states().get("good") is CheckState.UP, 60, what="healthy server up")
            assert checker.states() == {"stuck": CheckState.PENDING, "good": CheckState.UP}
        # Old code: all 10.
        assert stuck.peak() == 4


# Runs in a process of its own: it lowers its open files limit and takes
# every descriptor left, for real. Prints what it saw, as JSON.
OUT_OF_DESCRIPTORS = textwrap.dedent(
    """
    import errno, json, os, resource, sys, time
    from ipaddress import ip_address
    from loguru import logger
    from dockerlb.adapters.health import HealthChecker
    from dockerlb.core.model import CheckTarget, HealthCheck
    from harness.dockerlab import wait_for

    lines = []
    logger.remove()
    logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="INFO")
    port, here = int(sys.argv[1]), ip_address("127.0.0.1")
    hourly = HealthCheck("tcp", interval=3600, timeout=5, rise=1, fall=1)
    quick = HealthCheck("tcp", interval=0.2, timeout=5, rise=1, fall=1)
    warm = CheckTarget("warm", "warm", here, port, hourly)
    serving = CheckTarget("serving", "serving", here, port, quick)
    new = CheckTarget("new", "new", here, port, quick)
    changes = []
    checker = HealthChecker(None)
    checker.start(lambda cid, why: changes.append([cid, why]))
    checker.watch([warm])  # its one probe done, none is in flight for an hour
    wait_for(lambda: changes, 30, what="the checker running")
    lines.clear()

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    taken = []
    try:
        while True:
            taken.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE, e
    # Up at start, down after one failure; pending until one pass.
    checker.watch([warm, serving, new], serving=[serving])
    wait_for(lambda: lines or len(changes) > 1, 30, what="a line or a change")
    time.sleep(1)  # five more intervals out of descriptors
    during = checker.states()
    for fd in taken:
        os.close(fd)
    wait_for(lambda: len(changes) > 1 and checker.states()["new"] == "up", 30, what="new up")
    print(json.dumps({"during": during, "after": checker.states(), "changes": changes, "lines": lines}))
    checker.close()
    """
)


def test_a_host_out_of_descriptors_checks_nothing_and_marks_no_server_down():
    with healthy_server() as port:
        done = subprocess.run(
            [sys.executable, "-c", OUT_OF_DESCRIPTORS, str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # Old code: every probe failed with EMFILE, "serving" went down.
    assert seen["during"] == {"warm": "up", "serving": "up", "new": "pending"}
    assert seen["after"] == {"warm": "up", "serving": "up", "new": "up"}
    assert seen["changes"] == [["warm", "check up"], ["new", "check up"]]
    assert seen["lines"] == [
        "WARNING health checks: cannot open sockets (EMFILE: Too many open files): checks are not run, "
        "and no check's state changes, until they can (see --max-probes and the open files limit)",
        "INFO health checks: sockets open again; checks run",
        f"INFO container 'new': check tcp on 127.0.0.1:{port} passes: up",
    ]


def test_run_raises_the_open_files_soft_limit_to_the_hard_one():
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))

    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKERLB_")}
    # No Docker engine there: `run` raises the limit first, then fails.
    env |= {"DOCKER_HOST": "unix:///nonexistent.sock", "DOCKERLB_LOG_LEVEL": "DEBUG"}
    env |= {"DOCKERLB_RETRY_ATTEMPTS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dockerlb.app.cli", "run"],
        env=env,
        preexec_fn=low_limit,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "DEBUG   open files limit 64 raised to the hard limit, 4096\n" in done.stderr
