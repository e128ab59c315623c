"""Host tier: the real-server adapter in real containers' namespaces (all
that DR and routed NAT set up there needs no IPVS, so the host kernel will do).
This machine's kernel has no ipip: that fault is real here, not faked; in the
UML guest, which has ipip, the same test sees tunl0 get the VIP."""

from ipaddress import ip_address

import pytest

from dockerlb.adapters.docker_source import DockerSource
from dockerlb.adapters.realserver import RTPROT, RealServerNetns, unreachable
from dockerlb.core.model import ServerPrep
from dockerlb.errors import RealServerError
from dockerlb.settings import Settings
from harness.dockerlab import in_netns, pid_of
from tests.kernel_facts import has_ipip

pytestmark = pytest.mark.host
VIP = ip_address("10.77.0.1")
ARP = ["net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce", "net.ipv4.conf.eth0.arp_ignore"]


def sysctls(pid: int, names: list[str]) -> list[str]:
    return [in_netns(pid, "cat", "/proc/sys/" + n.replace(".", "/")).strip() for n in names]


@pytest.fixture
def server(lab):
    net = lab.network("rs", subnet="172.30.9.0/24")
    c = lab.run("rs", network=net)
    source = DockerSource(Settings())
    try:
        inspected = source.inspect(c.id)
    finally:
        source.close()
    return c, inspected, pid_of(c)


def test_direct_routing_set_up_puts_the_vip_on_lo_and_cleaning_puts_everything_back(server):
    c, inspected, pid = server
    addr = inspected.networks[next(iter(inspected.networks))].ipv4
    before = (in_netns(pid, "ip", "-o", "addr", "show", "dev", "lo"), sysctls(pid, ARP))
    ns = RealServerNetns()
    prep = ServerPrep(c.name, addr, loopback=frozenset({VIP}))

    changes = ns.converge(pid, prep)
    assert f"+{VIP}/32 on lo" in changes and "net.ipv4.conf.all.arp_ignore=1" in changes
    shown = in_netns(pid, "ip", "-o", "addr", "show", "dev", "lo")
    assert f"inet {VIP}/32" in shown and "lo:dlb" in shown
    assert sysctls(pid, ARP) == ["1", "2", "1"]
    assert ns.converge(pid, prep) == []  # already right: nothing touched

    cleaned = ns.converge(pid, ServerPrep(c.name, addr))
    assert f"-{VIP}/32 on lo" in cleaned
    assert (in_netns(pid, "ip", "-o", "addr", "show", "dev", "lo"), sysctls(pid, ARP)) == before


def test_a_restarted_controller_finds_its_marked_vip_and_removes_it(server):
    c, inspected, pid = server
    addr = inspected.networks[next(iter(inspected.networks))].ipv4
    RealServerNetns().converge(pid, ServerPrep(c.name, addr, loopback=frozenset({VIP})))
    # A new adapter remembers nothing: the address label is what says "ours".
    in_netns(pid, "ip", "addr", "add", "10.77.0.2/32", "dev", "lo")  # not ours: stays
    assert RealServerNetns().converge(pid, ServerPrep(c.name, addr)) == [f"-{VIP}/32 on lo"]
    shown = in_netns(pid, "ip", "-o", "addr", "show", "dev", "lo")
    assert "10.77.0.2/32" in shown and str(VIP) not in shown


def test_routed_nat_points_the_default_route_at_the_director_and_back_at_dockers_gateway(server):
    c, inspected, pid = server
    (net,) = inspected.networks.values()
    director = ip_address("172.30.9.200")
    ns = RealServerNetns()
    ns.converge(pid, ServerPrep(c.name, net.ipv4, route_via_director=True), director, net.gateway4)
    assert in_netns(pid, "ip", "route", "show", "default").startswith(
        f"default via {director} dev eth0 proto {RTPROT}"
    )
    ns.converge(pid, ServerPrep(c.name, net.ipv4), None, net.gateway4)
    assert in_netns(pid, "ip", "route", "show", "default").startswith(f"default via {net.gateway4} dev eth0")
    assert str(net.gateway4) == "172.30.9.1"


def test_tunnelling_puts_the_vip_on_tunl0_where_ipip_is_and_is_a_clear_error_where_not(server):
    c, inspected, pid = server
    addr = inspected.networks[next(iter(inspected.networks))].ipv4
    prep = ServerPrep(c.name, addr, tunnel=frozenset({VIP}))
    if not has_ipip():
        with pytest.raises(
            RealServerError, match=r"no tunl0: load the ipip module on the host \(modprobe ipip\)"
        ):
            RealServerNetns().converge(pid, prep)
        assert "tunl0" not in in_netns(pid, "ip", "-o", "link")  # nothing made in its place
        return
    RealServerNetns().converge(pid, prep)
    assert f"inet {VIP}/32" in in_netns(pid, "ip", "-o", "addr", "show", "dev", "tunl0")
    assert ",UP" in in_netns(pid, "ip", "link", "show", "dev", "tunl0")
    RealServerNetns().converge(pid, ServerPrep(c.name, addr))  # no longer tunnelled: the VIP goes
    assert str(VIP) not in in_netns(pid, "ip", "-o", "addr", "show", "dev", "tunl0")


def test_a_namespace_the_controller_cannot_enter_says_why(server):
    _, _, pid = server
    assert unreachable(pid) is None
    assert "not running" in unreachable(0)
    assert "pid: host" in unreachable(2**22 + 12345)  # beyond pid_max: no such process here
