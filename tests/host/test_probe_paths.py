"""Host tier: what `doctor --probe` reads on the way to a real server
(dockerlb/adapters/paths.py), in real containers' namespaces (none of it
needs IPVS): the route from a director-like container, one that refuses,
the neighbour entry of an address nobody answers, a refused and an
answered connection, and a server's own namespace as ip(8) shows it.
Expectations are what the test itself set there, or literal."""

import subprocess
import time
from ipaddress import ip_address

import pytest

from dockerlb.adapters import paths
from dockerlb.core.model import Proto
from dockerlb.core.probe import Route
from harness.dockerlab import http_server_cmd, in_netns, pid_of

pytestmark = pytest.mark.host
VIP = ip_address("10.78.0.1")


@pytest.fixture
def pair(lab):
    net = lab.network("probe", subnet="172.30.11.0/24")
    director = lab.run("director", network=net, cap_add=["NET_ADMIN"])
    server = lab.run("server", http_server_cmd(7000), network=net)
    return director, server, ip_address(lab.ip(server, net))


def test_the_route_to_a_server_and_the_one_that_refuses_it(pair):
    director, _, addr = pair
    ns = f"/proc/{pid_of(director)}/ns/net"
    route = paths.route_to(ns, addr)
    assert (route.kind, route.ifname, route.hop, route.mtu) == ("unicast", "eth0", str(addr), 1500)
    in_netns(pid_of(director), "ip", "route", "add", "unreachable", f"{addr}/32")
    assert paths.route_to(ns, addr) == Route("unreachable", f"{addr}/32")
    in_netns(pid_of(director), "ip", "route", "replace", "blackhole", "172.30.11.0/25")
    assert paths.route_to(ns, ip_address("172.30.11.100")) == Route("blackhole", "172.30.11.0/25")
    assert paths.route_to(ns, ip_address("172.30.11.200")).kind == "unicast"  # outside the /25
    assert paths.route_to(ns, ip_address("10.99.0.1")).kind == "unicast"  # via the default route


def test_connections_answered_refused_and_unanswered_and_the_neighbour_entry_after(pair):
    director, _, addr = pair
    ns = f"/proc/{pid_of(director)}/ns/net"
    deadline = time.monotonic() + 30
    while (
        conn := paths.connect(ns, Proto.TCP, addr, 7000, 2)
    ).result != "ok" and time.monotonic() < deadline:
        time.sleep(0.5)  # nc may not listen yet
    assert conn.result == "ok" and conn.local is not None and conn.local[0] != addr
    assert conn.sock is not None
    conn.sock.close()
    assert paths.connect(ns, Proto.TCP, addr, 7001, 2).result == "refused"
    nobody = ip_address("172.30.11.200")
    assert paths.connect(ns, Proto.TCP, nobody, 7000, 2).result in ("timeout", "unreachable")
    assert paths.neighbour_state(ns, str(nobody)) in ("INCOMPLETE", "FAILED")
    assert paths.neighbour_state(ns, str(addr)) in ("REACHABLE", "STALE", "DELAY", "PROBE")
    assert paths.neighbour_state(ns, "172.30.11.201") == "NONE"


def test_connections_opened_at_once_each_get_their_own_answer_in_the_order_asked(pair):
    director, _, addr = pair
    ns = f"/proc/{pid_of(director)}/ns/net"
    deadline = time.monotonic() + 30
    while (first := paths.connect(ns, Proto.TCP, addr, 7000, 2)).sock is None and time.monotonic() < deadline:
        time.sleep(0.5)  # nc may not listen yet
    if first.sock is not None:
        first.sock.close()
    nobody = ip_address("172.30.11.200")
    asked = [
        (Proto.TCP, addr, 7000),
        (Proto.TCP, nobody, 7000),
        (Proto.TCP, addr, 7001),
        (Proto.TCP, addr, 7000),
    ]
    conns = paths.connect_all(ns, asked, 2)
    assert [c.result for c in conns[::2]] == ["ok", "refused"]
    assert conns[1].result in ("timeout", "unreachable") and conns[3].result == "ok"
    assert [c.sock is not None for c in conns] == [True, False, False, True]  # open only when answered
    assert conns[0].local is not None and conns[3].local is not None
    assert conns[0].local[1] != conns[3].local[1]  # two connections, each its own port
    for c in conns:
        if c.sock is not None:
            c.sock.close()


def test_a_servers_namespace_reads_as_ip_shows_it(pair):
    _, server, addr = pair
    pid = pid_of(server)
    in_netns(pid, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")
    subprocess.run(
        ["/usr/bin/nsenter", "-t", str(pid), "-n", "sysctl", "-qw", "net.ipv4.conf.eth0.arp_ignore=8"],
        check=True,
    )
    in_netns(pid, "ip", "link", "set", "eth0", "arp", "off")
    inside = paths.inside(pid, addr)
    gateway = in_netns(pid, "ip", "route", "show", "default").split()[2]
    assert (inside.ifname, inside.noarp, inside.arp_ignore, inside.gateway) == (
        "eth0",
        True,
        8,
        ip_address(gateway),
    )
    assert inside.lo == {ip_address("127.0.0.1"), VIP}
    has_tunl0 = "tunl0" in in_netns(pid, "ip", "-o", "link")
    assert (inside.tunnel is not None) == has_tunl0
