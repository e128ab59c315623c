"""The applier over the in-memory IPVS and director stand-ins (harness/memory_ports.py)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from loguru import logger

from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.app.applier import Applier
from dockerlb.core.model import Proto, RealServer, Service, ServiceKey
from dockerlb.core.plan import AddServer, AddService, AddVip
from dockerlb.errors import DirectorError
from harness.memory_ports import MemoryDirector, MemoryIpvs

pytestmark = pytest.mark.unit
V4, V6 = ip_address("1.2.3.4"), ip_address("fd00:31:ff::5")


class NoIpv6Director(MemoryDirector):
    """Stands for a director in a container whose /proc/sys is read-only and
    whose dummy interface came up with IPv6 off (a fault seen for real in the
    kernel tier): every IPv6 VIP is refused."""

    def add_vip(self, vip) -> None:
        if vip.version == 6:
            raise DirectorError("cannot set net.ipv6.conf.dockerlb0.disable_ipv6=0: read-only")
        super().add_vip(vip)


def test_a_vip_that_cannot_be_added_gets_no_service_and_its_error_is_the_only_failure():
    ipvs, director = MemoryIpvs(), NoIpv6Director()
    v6 = ServiceKey(Proto.TCP, V6, 8000)
    v4 = ServiceKey(Proto.TCP, V4, 8000)
    ops = [
        AddVip(V6),
        AddVip(V4),
        AddService(Service(v6, "rr")),
        AddServer(v6, RealServer(ip_address("fd00:31:88::3"), 8000)),
        AddService(Service(v4, "rr")),
        AddServer(v4, RealServer(ip_address("172.31.88.3"), 8000)),
    ]
    lines: list[str] = []
    sink = logger.add(lines.append, level="ERROR", format="{message}")
    try:
        outcome = Applier(ipvs, director, ControllerMetrics()).apply(ops)
    finally:
        logger.remove(sink)
    # A service made on a VIP not on dockerlb's interface would be called
    # foreign from the next pass on, and never cleaned up.
    assert [str(f) for f in outcome.failures] == [
        "could not apply '+ vip fd00:31:ff::5': cannot set net.ipv6.conf.dockerlb0.disable_ipv6=0: read-only"
    ]
    assert outcome.applied == (ops[1], ops[4], ops[5])
    assert lines == []  # the controller says failures, once while they last
    assert set(ipvs.read().table) == {v4}
    assert director.vips() == frozenset({V4})
