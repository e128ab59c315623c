"""Health checks within the host's descriptors (issue 29): probes in flight
capped overall and per container.

Real sockets on 127.0.0.1 (tests/check_servers.py)."""

from ipaddress import ip_address

import pytest

from dockerlb.adapters.health import HealthChecker
from dockerlb.core.model import CheckState, CheckTarget, HealthCheck
from tests.check_servers import healthy_server, stalling_server, started
from tests.dockerlab import wait_for

pytestmark = pytest.mark.unit
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
            wait_for(lambda: checker.states().get("good") is CheckState.UP, 60, what="healthy server up")
            wait_for(lambda: stuck.peak() == 8, 30, what="the cap's 8 probes stalled at once")
            assert ("good", "check up") in changes
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
