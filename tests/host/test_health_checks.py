"""Host tier: dockerlb's own health checks against real containers, probing
from another container's network namespace (the director's, in real use)."""

from ipaddress import ip_address

import pytest
from loguru import logger

from dockerlb.adapters.health import HealthChecker
from dockerlb.core.model import CheckState, CheckTarget, HealthCheck
from harness.dockerlab import http_server_cmd, pid_of, wait_for
from tests.check_servers import healthy_server, refused_port, stalling_server, started

pytestmark = pytest.mark.host
QUICK = {"interval": 0.3, "timeout": 0.25, "rise": 2, "fall": 2}
LOOPBACK = ip_address("127.0.0.1")


def test_checks_run_from_the_directors_namespace_rise_fall_and_report_each_change(lab):
    net = lab.network("chk", subnet="172.30.8.0/24")
    # The director answers on its own loopback only: a check of 127.0.0.1
    # passes only if it really runs inside the director's namespace.
    inside_only = "mkdir -p /w && echo ok > /w/index.html && exec httpd -f -p 127.0.0.1:9000 -h /w"
    director = lab.run("director", ["sh", "-c", inside_only], network=net)
    web = lab.run("web", http_server_cmd(8000), network=net)
    web_ip = ip_address(lab.ip(web, net))
    targets = [
        CheckTarget("web", "web", web_ip, 8000, HealthCheck("http", "/", **QUICK)),
        CheckTarget("web", "web", web_ip, 8000, HealthCheck("tcp", **QUICK)),
        CheckTarget("missing", "missing", web_ip, 8000, HealthCheck("http", "/nope", **QUICK)),
        CheckTarget("inside", "in", ip_address("127.0.0.1"), 9000, HealthCheck("http", status=200, **QUICK)),
    ]
    changes: list[tuple[str, str]] = []
    checker = HealthChecker(f"/proc/{pid_of(director)}/ns/net")
    try:
        # Watched before the thread starts, so nothing can have been checked yet.
        checker.watch(targets)
        assert checker.states()["web"] is CheckState.PENDING  # nothing passed yet
        checker.start(lambda cid, why: changes.append((cid, why)))
        # Wait on the reports, not on states(): the checker sets the state,
        # then calls on_change, so a state seen up may not be reported yet
        # (issue 34). A report is made after its state, so the states hold then.
        wait_for(
            lambda: {("web", "check up"), ("inside", "check up")} <= set(changes),
            30,
            what="web and the director's loopback reported up",
        )
        assert checker.states()["web"] is CheckState.UP and checker.states()["inside"] is CheckState.UP
        # A 404 never rises: the container stays pending (never a server).
        assert checker.states()["missing"] is CheckState.PENDING
        assert not any(cid == "missing" for cid, _ in changes)

        web.kill()
        wait_for(lambda: ("web", "check down") in changes, 30, what="web down")
        assert changes.count(("web", "check down")) == 1 and checker.states()["web"] is CheckState.DOWN

        checker.watch(targets[:1])  # no longer watched: no longer reported
        assert set(checker.states()) == {"web"}
    finally:
        checker.close()


def test_a_target_the_kernel_already_serves_starts_up_and_still_goes_down_after_its_falls(lab):
    # After a controller restart: no working server is pulled before its
    # first check, and a dead one is still found out.
    net = lab.network("chk2", subnet="172.30.10.0/24")
    web = lab.run("web", ["sleep", "3600"], network=net)  # nothing listens
    target = CheckTarget("web", "web", ip_address(lab.ip(web, net)), 8000, HealthCheck("tcp", **QUICK))
    changes: list[tuple[str, str]] = []
    checker = HealthChecker(None)
    try:
        checker.watch([target], serving=[target])
        assert checker.states() == {"web": CheckState.UP}
        checker.start(lambda cid, why: changes.append((cid, why)))
        wait_for(lambda: changes, 30, what="a change reported")
        assert changes == [("web", "check down")] and checker.states()["web"] is CheckState.DOWN
    finally:
        checker.close()


# -- stalls (issue 15): real servers on 127.0.0.1, no Docker -------------------------


def test_eight_checks_stalled_for_an_hour_starve_neither_a_healthy_server_nor_a_dead_one():
    # The reviewer's repro: 8 groups, check=http:/N, interval and timeout
    # 3600, on a port that accepts and never answers. A healthy server still
    # rises and a dead one (serving, refused) still goes down. One
    # container's probes in flight are 4 at most (issue 29): 4 stall.
    hour = {"interval": 3600, "timeout": 3600, "rise": 1, "fall": 1}
    quick = {"interval": 0.3, "timeout": 0.25, "rise": 2, "fall": 2}
    with stalling_server() as stuck, healthy_server() as good, refused_port() as dead_port:
        stalls = [
            CheckTarget("stuck", "stuck", LOOPBACK, stuck.port, HealthCheck("http", f"/{n}", **hour))
            for n in range(1, 9)
        ]
        healthy = CheckTarget("good", "good", LOOPBACK, good, HealthCheck("http", "/", **quick))
        dead = CheckTarget("dead", "dead", LOOPBACK, dead_port, HealthCheck("tcp", **quick))
        checker = HealthChecker(None)
        with started(checker) as changes:
            checker.watch([*stalls, healthy, dead], serving=[dead])
            wait_for(
                lambda: stuck.live() == 4,
                30,
                what="4 checks stalled on the stuck port (the per-container cap)",
            )
            # On the reports, which come after the states they report.
            wait_for(
                lambda: {("good", "check up"), ("dead", "check down")} <= set(changes),
                30,
                what="healthy server reported up, dead one down",
            )
            assert checker.states() == {
                "stuck": CheckState.PENDING,
                "good": CheckState.UP,
                "dead": CheckState.DOWN,
            }


def test_nine_servers_that_trickle_bytes_fail_by_their_total_deadline_and_a_healthy_one_rises():
    # Each trickling server sends a byte every 0.2 s and never a whole status
    # line: only a deadline over the whole check (2 s) ends it.
    slow = {"interval": 3, "timeout": 2, "rise": 1, "fall": 1}
    steady = {"interval": 1, "timeout": 1, "rise": 2, "fall": 3}  # no flap on a busy machine
    with stalling_server(trickle=True) as trickler, healthy_server() as good:
        stalls = [
            CheckTarget(f"slow{n}", f"slow{n}", LOOPBACK, trickler.port, HealthCheck("http", "/", **slow))
            for n in range(9)
        ]
        healthy = CheckTarget("good", "good", LOOPBACK, good, HealthCheck("http", "/", **steady))
        checker = HealthChecker(None)
        with started(checker) as changes:
            checker.watch([*stalls, healthy], serving=stalls)  # they start up: a failure shows
            # The 9 deadlines can expire in one pass of the checker, each state
            # set before its report: wait for the 10 reports, then compare them
            # exactly (a flap would be an 11th, or a wrong one among the 10).
            wait_for(lambda: len(changes) >= 10, 60, what="10 changes reported")
            assert sorted(changes) == sorted(
                [(f"slow{n}", "check down") for n in range(9)] + [("good", "check up")]
            )
            assert checker.states() == {f"slow{n}": CheckState.DOWN for n in range(9)} | {
                "good": CheckState.UP
            }


def test_a_check_that_raises_is_logged_once_and_counted_as_a_failure():
    # Paths the label parser refuses, given directly: non-ASCII (the request
    # cannot be encoded) and a space (it would not be one request line).
    quick = {"interval": 0.2, "timeout": 0.2, "rise": 1, "fall": 3}
    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR", format="{message}")
    try:
        with healthy_server() as port:
            odd = [
                CheckTarget("accent", "accent", LOOPBACK, port, HealthCheck("http", "/caf\u00e9", **quick)),
                CheckTarget("space", "space", LOOPBACK, port, HealthCheck("http", "/a b", **quick)),
            ]
            steady = {"interval": 0.5, "timeout": 0.5, "rise": 1, "fall": 3}
            fine = CheckTarget("fine", "fine", LOOPBACK, port, HealthCheck("http", "/", **steady))
            checker = HealthChecker(None)
            with started(checker):
                checker.watch([*odd, fine], serving=odd)
                # Down takes 3 failures in a row, so each raised 3 times.
                wait_for(
                    lambda: (
                        checker.states()
                        == {"accent": CheckState.DOWN, "space": CheckState.DOWN, "fine": CheckState.UP}
                    ),
                    30,
                    what="the raising checks down, the fine one up",
                )
    finally:
        logger.remove(sink)
    assert len(errors) == 2
    assert any("'accent'" in e and "UnicodeEncodeError" in e for e in errors)
    assert any("'space'" in e and "ValueError" in e for e in errors)


def test_a_check_no_longer_watched_lets_go_of_its_stalled_connection():
    hour = {"interval": 3600, "timeout": 3600, "rise": 1, "fall": 1}
    with stalling_server() as stuck:
        stalls = [
            CheckTarget(f"s{n}", f"s{n}", LOOPBACK, stuck.port, HealthCheck("http", "/", **hour))
            for n in range(3)
        ]
        checker = HealthChecker(None)
        with started(checker):
            checker.watch(stalls)
            wait_for(lambda: stuck.live() == 3, 30, what="3 checks stalled")
            checker.watch(stalls[:1])
            wait_for(lambda: stuck.live() == 1, 30, what="the 2 unwatched checks' connections closed")
            assert checker.states() == {"s0": CheckState.PENDING}
