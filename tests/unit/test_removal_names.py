"""Unit tier: a removed real server is named for the container it stood for.

The kernel knows no container names; a pass names only the servers it
removes (naming all 10,000 read from the kernel was a quarter of a full
pass), from the table it plans, the last pass's, or a known container at
that address.
"""

from ipaddress import ip_address

import pytest

from dockerlb.app.controller import Controller
from dockerlb.core.model import RealServer, Service
from dockerlb.core.plan import ADD, RemoveServer, Write
from dockerlb.core.ports import Trigger
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, container

pytestmark = pytest.mark.unit


def web(i: int):
    return container(f"web{i}", {"dockerlb.vip": "1.2.3.4:80"}, nets={"lab": (f"10.0.0.{10 + i}", None)})


def removals(outcome) -> list[str]:
    return [op.describe() for op in outcome.ops if isinstance(op, RemoveServer)]


def test_an_event_pass_names_the_server_of_a_container_that_died():
    docker, ipvs = MemoryDocker([web(1), web(2)]), MemoryIpvs()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector())
    controller.reconcile(None)
    docker.die("id-web2")
    outcome = controller.reconcile([Trigger("id-web2", "die", down=True)])
    assert removals(outcome) == ["- server TCP 1.2.3.4:80 -> 10.0.0.12:80 (web2)"]


def test_a_full_pass_names_the_server_of_a_container_removed_without_an_event():
    docker, ipvs = MemoryDocker([web(1), web(2)]), MemoryIpvs()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector())
    controller.reconcile(None)
    docker.destroy("id-web2")  # its events were lost: only the last pass knew it
    outcome = controller.reconcile(None)
    assert removals(outcome) == ["- server TCP 1.2.3.4:80 -> 10.0.0.12:80 (web2)"]


def test_a_server_no_table_knows_is_named_by_the_container_at_its_address():
    docker, ipvs, director = MemoryDocker([web(1), web(2)]), MemoryIpvs(), MemoryDirector()
    Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, director).reconcile(None)
    # Someone added port 81 of web2's address to dockerlb's service.
    key = next(iter(ipvs.read(counters=False).table))
    ipvs.write(Write(ADD, Service(key), RealServer(ip_address("10.0.0.12"), 81)))
    restarted = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, director)
    outcome = restarted.reconcile(None)
    assert removals(outcome) == ["- server TCP 1.2.3.4:80 -> 10.0.0.12:81 (web2)"]


def test_a_server_of_no_known_container_is_removed_unnamed():
    docker, ipvs, director = MemoryDocker([web(1)]), MemoryIpvs(), MemoryDirector()
    Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, director).reconcile(None)
    key = next(iter(ipvs.read(counters=False).table))
    ipvs.write(Write(ADD, Service(key), RealServer(ip_address("10.0.0.99"), 80)))
    outcome = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, director).reconcile(None)
    assert removals(outcome) == ["- server TCP 1.2.3.4:80 -> 10.0.0.99:80"]
