"""Host tier: dockerlb's own health checks against real containers, probing
from another container's network namespace (the director's, in real use)."""

from ipaddress import ip_address

import pytest

from dockerlb.health import HealthChecker
from dockerlb.model import CheckState, CheckTarget, HealthCheck
from tests.dockerlab import http_server_cmd, pid_of, wait_for

pytestmark = pytest.mark.host
QUICK = {"interval": 0.3, "timeout": 0.25, "rise": 2, "fall": 2}


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
        checker.start(lambda cid, why: changes.append((cid, why)))
        checker.watch(targets)
        assert checker.states()["web"] is CheckState.PENDING  # nothing passed yet
        wait_for(lambda: checker.states().get("web") is CheckState.UP, 30, what="web up")
        wait_for(lambda: checker.states().get("inside") is CheckState.UP, 30, what="director's loopback up")
        # A 404 never rises: the container stays pending (never a server).
        assert checker.states()["missing"] is CheckState.PENDING
        assert ("web", "check up") in changes and not any(cid == "missing" for cid, _ in changes)

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
