"""What the model test (tests/unit/test_model.py) found, each as the smallest
literal reproduction over the in-memory ports; each failed on the code
the model first ran against (it was xfail, strict, until fixed):

A: a restarted controller learns owners from the kernel's record of them
   (nft: adapters/director.py), not only from real servers it shows;
B: a batch's stops and starts are taken in the order they came;
C: a drain ends when Docker's start stamp of its container changed (a
   restart whose events were lost)."""

from __future__ import annotations

import pytest

from dockerlb.app.controller import Controller
from dockerlb.core.model import Container
from dockerlb.core.ports import Trigger
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, Clock, container

pytestmark = pytest.mark.unit
LAB = Settings(vip_cidr=TEST_VIP_CIDRS)


def member(name: str, group: str, addr: str, created: str) -> Container:
    """A compose service's container claiming 1.2.3.4:80."""
    return container(
        name,
        {"dockerlb.vip": "1.2.3.4:80", "com.docker.compose.project": group},
        created=created,
        nets={"lab": (addr, None)},
    )


def servers(ipvs: MemoryIpvs) -> list[str]:
    """The kernel's real servers, as "VIP:port -> address:port weight"."""
    table = ipvs.read(counters=False).table
    return sorted(
        f"{k.vip}:{k.port} -> {s} w{s.weight}" for k, vs in table.items() for s in vs.servers.values()
    )


def test_finding_a_a_controller_restarted_while_the_owners_containers_are_stopped_keeps_their_vip():
    owner = member("web", "team", "10.0.0.2", "2026-01-02T00:00:00Z")
    squat = member("squat", "other", "10.0.0.9", "2026-01-01T00:00:00Z")
    docker, ipvs, director = MemoryDocker([owner]), MemoryIpvs(), MemoryDirector()
    ctl = Controller(LAB, docker, ipvs, director)
    ctl.reconcile(None)
    docker.die(owner.id)  # stopped, not removed: it keeps its group's claim
    ctl.reconcile([Trigger(owner.id, "die", down=True)])
    docker.start(squat)
    ctl.reconcile([Trigger(squat.id, "start", started=True)])
    assert servers(ipvs) == []  # refused while this controller runs
    # dockerlb restarted (an upgrade; or a reboot, which empties the table anyway).
    Controller(LAB, docker, ipvs, director).reconcile(None)
    assert servers(ipvs) == []


def test_finding_b_a_stop_that_begins_after_a_start_in_the_same_batch_drains():
    web = member("web", "team", "10.0.0.2", "2026-01-01T00:00:00Z")
    docker, ipvs = MemoryDocker([web]), MemoryIpvs()
    ctl = Controller(LAB, docker, ipvs, MemoryDirector())
    ctl.reconcile(None)
    # `docker restart web`, then `docker stop web` within one batch: the stop signal came last.
    ctl.reconcile(
        [
            Trigger(web.id, "kill", stopping=True, signal="SIGTERM"),
            Trigger(web.id, "die", down=True),
            Trigger(web.id, "stop"),
            Trigger(web.id, "start", started=True),
            Trigger(web.id, "restart", started=True),
            Trigger(web.id, "kill", stopping=True, signal="SIGTERM"),
        ]
    )
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.2:80 w0"]  # draining: no new connections


def test_finding_c_a_full_pass_ends_a_drain_whose_container_restarted_unseen():
    web = member("web", "team", "10.0.0.2", "2026-01-01T00:00:00Z")
    docker, ipvs, clock = MemoryDocker([web]), MemoryIpvs(), Clock()
    ctl = Controller(LAB, docker, ipvs, MemoryDirector(), clock=clock)
    ctl.reconcile(None)
    ctl.reconcile([Trigger(web.id, "kill", stopping=True, signal="SIGTERM")])
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.2:80 w0"]
    # It restarted (`docker restart`), and its die and start events were lost
    # (a burst while the event stream was down); inspect shows it running,
    # started again.
    docker.die(web.id)
    docker.start(web)
    clock.now += 60.0
    ctl.reconcile(None)
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.2:80 w1"]
