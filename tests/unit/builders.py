"""Small builders for unit tests: model records with readable defaults."""

from ipaddress import ip_address

from dockerlb.core.desired import VipPolicy
from dockerlb.core.model import Container, NetworkAddress


def container(
    name, labels, *, created="2026-01-01T00:00:00Z", nets=None, running=True, health=None, pid=0, node=""
):
    networks = {
        net: NetworkAddress(ip_address(v4) if v4 else None, ip_address(v6) if v6 else None)
        for net, (v4, v6) in (nets or {"lab": ("10.0.0.10", None)}).items()
    }
    return Container(
        id=f"id-{name}",
        name=name,
        created=created,
        labels=labels,
        networks=networks,
        running=running,
        health=health,
        pid=pid,
        node=node,
    )


class Clock:
    """Stands for the ``time`` module the controller reads: moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def time_ns(self) -> int:
        return int(self.time() * 1e9)


# The VIP ranges the unit tests' labels use: by default dockerlb takes only
# private addresses, and most tests name 1.2.3.4 as the README does.
TEST_VIP_CIDRS = ("1.2.3.0/24", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
LAB = VipPolicy.of(TEST_VIP_CIDRS)
