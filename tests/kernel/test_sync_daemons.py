"""Kernel tier: the IPVS connection-sync daemons a director pair needs
(issue 17), started and kept running by `dockerlb run --sync-interface`,
and shown by status, doctor and /metrics as ipvsadm shows them."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.dockerlab import in_netns, wait_for
from tests.kernel.conftest import VIP
from tests.kernel.test_operator import dockerlb

pytestmark = pytest.mark.kernel
METRICS = "127.0.0.1:19471"


def daemons_shown(lab) -> list[str]:
    """ipvsadm's own lines for the running daemons."""
    return sorted(
        line.split(",")[0] for line in lab.ipvsadm("-L", "--daemon").splitlines() if "sync daemon" in line
    )


def gauges() -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=60) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("dockerlb_sync_daemon_running", "dockerlb_director_active")
    }


def test_both_sync_daemons_run_come_back_when_stopped_and_show_in_status_doctor_and_metrics(
    seed_lab, controllers
):
    lab = seed_lab
    netns = ("--netns", f"container:{lab.director.name}")
    pair = ("--sync-interface", "eth0", "--sync-id", "7")
    assert daemons_shown(lab) == []
    ctl = controllers(*netns, *pair, "--resync-interval", "1", "--metrics-listen", METRICS)
    ctl.wait_ready()
    both = ["backup sync daemon (mcast=eth0", "master sync daemon (mcast=eth0"]
    assert daemons_shown(lab) == both
    assert "syncid=7" in lab.ipvsadm("-L", "--daemon")

    # Stopped by hand (ipvsadm says it did): drift, put back by the next full
    # pass. Not looked at in between: a pass a second can restart it before
    # ipvsadm is asked. The second start line is the proof, and it is logged
    # after the start, so the kernel shows both daemons by then.
    lab.ipvsadm("--stop-daemon", "master")
    started = "IPVS sync daemon started: master on eth0 (sync id 7)"
    wait_for(lambda: ctl.log().count(started) == 2, 30, what="the master daemon started again")
    assert daemons_shown(lab) == both

    # Not holding the VIP anywhere but its dummy interface: the standby.
    shown = json.loads(dockerlb("status", *netns, *pair, "--json").stdout)["pair"]
    assert shown == {
        "role": "standby",
        "daemons": [
            {"state": "backup", "interface": "eth0", "sync_id": 7, "running": True},
            {"state": "master", "interface": "eth0", "sync_id": 7, "running": True},
        ],
    }
    assert gauges() == {
        ("dockerlb_sync_daemon_running", (("interface", "eth0"), ("state", "backup"), ("sync_id", "7"))): 1.0,
        ("dockerlb_sync_daemon_running", (("interface", "eth0"), ("state", "master"), ("sync_id", "7"))): 1.0,
        ("dockerlb_director_active", ()): 0.0,
    }
    # keepalived would put the VIP on the VRRP master's outside interface.
    in_netns(lab.director_pid, "ip", "addr", "add", f"{VIP}/32", "dev", "eth0")
    text = dockerlb("status", *netns, *pair).stdout
    assert text.splitlines()[0] == (
        "Director pair: role active; sync daemons: backup on eth0 id 7 running, master on eth0 id 7 running"
    )
    assert gauges()[("dockerlb_director_active", ())] == 1.0
    # In a pair, keepalived's copy of the VIP is not an address the VIP must avoid.
    ctl.wait_passes(ctl.passes() + 2)
    assert len(lab.table()) == 1 and "already in use as" not in ctl.log()

    checks = {c["name"]: c for c in json.loads(dockerlb("doctor", *netns, *pair, "--json").stdout)}
    assert checks["director pair: sync daemons"]["ok"] is True
    assert "master on eth0 (sync id 7)" in checks["director pair: sync daemons"]["detail"]
    wrong = json.loads(dockerlb("doctor", *netns, "--sync-interface", "eth9", "--json").stdout)
    (sync,) = [c for c in wrong if c["name"] == "director pair: sync daemons"]
    assert sync["ok"] is False and "eth9: no such interface" in sync["detail"] and "eth0" in sync["fix"]


def test_a_sync_interface_the_director_lacks_is_one_error_line_and_the_table_is_still_built(
    seed_lab, controllers
):
    lab = seed_lab
    ctl = controllers(
        "--netns", f"container:{lab.director.name}", "--sync-interface", "eth9", "--resync-interval", "1"
    )
    ctl.wait_ready()
    assert len(lab.table()) == 1  # the seed's VIP, served all the same
    ctl.wait_passes(3)
    errors = [line for line in ctl.log().splitlines() if "IPVS sync daemon" in line]
    assert len(errors) == 2, errors  # one per daemon, said once while it lasts
    assert "master on eth9 (sync id 0): cannot start it" in " ".join(errors)
    assert daemons_shown(lab) == []
