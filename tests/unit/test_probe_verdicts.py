"""doctor --probe's words: the facts one probe saw, and the step it names
broken with its fix (dockerlb/core/probe.py), literal."""

from ipaddress import ip_address

import pytest

from dockerlb.core.model import Forward, Proto, RealServer, ServiceKey
from dockerlb.core.probe import Inside, Route, Seen, Target, Where, verdict

pytestmark = pytest.mark.unit
KEY = ServiceKey(Proto.TCP, ip_address("10.11.0.3"), 7002)
ADDR = ip_address("172.30.32.5")
WHERE = Where.of_netns("container:lb")
ON_LINK = Route("unicast", "", "eth0", "172.30.32.5", 1500)
FINE = Inside(
    "eth0", False, 1, 2, frozenset({ip_address("127.0.0.1"), KEY.vip}), frozenset({KEY.vip}), True, 0, None
)
NS = "nsenter -n -t $(docker inspect -f '{{.State.Pid}}' web) "


def seen(forward=Forward.DR, *, routed=False, **kw) -> Seen:
    target = Target(KEY, RealServer(ADDR, 7002, 1, forward), "web", routed, "back")
    facts = {"route": ON_LINK, "direct": "ok", "inside": FINE} | kw
    return Seen(target, **facts)


def test_a_server_every_step_reaches_passes_and_says_what_was_proven():
    check = verdict(seen(via_vip="ok"), WHERE)
    assert check.ok and check.name == "probe TCP 10.11.0.3:7002 -> 172.30.32.5:7002 dr (web)"
    assert check.detail == (
        "the director connects to 172.30.32.5:7002 (eth0); VIP on lo, ARP sysctls; "
        "a client's connection through the VIP answered"
    )


@pytest.mark.parametrize(
    ("facts", "detail", "fix"),
    [
        (
            {"route": Route("unreachable", "172.30.32.5/32"), "direct": "unreachable"},
            "route: the director's route to 172.30.32.5 is unreachable (unreachable 172.30.32.5/32)",
            "nsenter -n -t $(docker inspect -f '{{.State.Pid}}' lb) ip route del unreachable 172.30.32.5/32",
        ),
        (
            {"route": Route("none"), "direct": "unreachable"},
            "route: the director has no route to 172.30.32.5",
            "docker network connect back lb",
        ),
        (
            {"direct": "refused"},
            "listen: nothing listens on 172.30.32.5:7002 (connection refused)",
            "make the server in web listen on port 7002 (on all its addresses), or set the label "
            "dockerlb.port to the port it listens on",
        ),
        (
            {"direct": "timeout", "neighbour": "FAILED"},
            "ARP: 172.30.32.5 does not answer ARP on the director's eth0 (neighbour FAILED)",
            "172.30.32.5 must be on the director's link eth0 and answer ARP there: no arp_ignore=8, "
            "ARP on (ip link), the same L2 network",
        ),
        (
            {
                "inside": Inside(
                    "eth0", False, 1, 2, frozenset({ip_address("127.0.0.1")}), None, False, 0, None
                )
            },
            "VIP missing on lo: web has no 10.11.0.3/32 on lo: it drops what the director sends it",
            NS + "ip addr add 10.11.0.3/32 dev lo label lo:dlb  # `dockerlb run` puts it there at its next "
            "pass when it can enter the container",
        ),
        (
            {"inside": Inside("eth0", False, 0, 2, FINE.lo, None, False, 0, None)},
            "ARP: web would answer ARP for 10.11.0.3 (arp_ignore 0, arp_announce 2 on eth0): clients on "
            "its network would bypass the director",
            NS + "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 "
            "net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2",
        ),
    ],
    ids=["route", "no-route", "listen", "arp", "vip-on-lo", "arp-for-the-vip"],
)
def test_each_broken_step_is_named_with_its_fix(facts, detail, fix):
    check = verdict(seen(**facts), WHERE)
    assert (check.ok, check.detail, check.fix) == (False, detail, fix)


def test_arp_that_the_server_ignores_for_good_names_the_sysctl_to_set_in_it():
    inside = Inside("eth0", False, 8, 2, FINE.lo, None, False, 0, None)
    check = verdict(seen(Forward.NAT, direct="timeout", neighbour="INCOMPLETE", inside=inside), WHERE)
    assert (
        check.detail == "ARP: 172.30.32.5 does not answer ARP on the director's eth0 (neighbour INCOMPLETE)"
    )
    assert check.fix == NS + "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.eth0.arp_ignore=1"


def test_tunnelling_needs_the_vip_on_tunl0_then_no_strict_rp_filter_then_room_for_its_packets():
    no_vip = Inside("eth0", False, 1, 2, FINE.lo, frozenset(), True, 0, None)
    assert verdict(seen(Forward.TUN, inside=no_vip), WHERE).detail == (
        "VIP missing on tunl0: web has no 10.11.0.3/32 on tunl0: it drops the director's IP-in-IP packets"
    )
    strict = Inside("eth0", False, 1, 2, FINE.lo, frozenset({KEY.vip}), True, 1, None)
    check = verdict(seen(Forward.TUN, inside=strict, via_vip="failed"), WHERE)
    assert check.detail.startswith("rp_filter: web has strict reverse-path filtering on tunl0 (rp_filter 1")
    assert check.fix == NS + "sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.tunl0.rp_filter=0"
    stalled = verdict(seen(Forward.TUN, via_vip="ok", bulk="stalled"), WHERE)
    assert stalled.detail == (
        "MTU over IP-in-IP: 8192 bytes a client sent through the VIP, a full-size segment at a time, were "
        "not acknowledged: the director reaches 172.30.32.5 through eth0 (MTU 1500), so a tunnelled packet "
        "may carry 1480 bytes, and the 'fragmentation needed' answers for larger ones never reach the client"
    )
    assert stalled.fix.startswith(
        "nsenter -n -t $(docker inspect -f '{{.State.Pid}}' lb) sysctl -w net.ipv4.vs.pmtu_disc=0 "
    )
    assert stalled.fix.endswith("-j TCPMSS --set-mss 1440")


def test_routed_nat_needs_the_servers_default_route_via_the_director():
    docker_gw = Inside("eth0", False, 0, 0, frozenset(), None, False, 0, ip_address("172.30.32.1"))
    check = verdict(
        seen(Forward.NAT, routed=True, inside=docker_gw, director_address=ip_address("172.30.32.2")), WHERE
    )
    assert check.detail == (
        "return path of routed NAT: web's default route is via 172.30.32.1, not via the director "
        "(172.30.32.2): its replies to clients skip the director and are never translated back"
    )
    assert check.fix.startswith(NS + "ip route replace default via 172.30.32.2 dev eth0 proto 76")
    masqueraded = verdict(
        seen(Forward.NAT, inside=docker_gw, director_address=ip_address("172.30.32.2")), WHERE
    )
    assert masqueraded.ok  # SNATed NAT needs nothing of the server's route


def test_commands_in_the_directors_namespace_follow_the_netns_setting():
    assert Where.of_netns("").director == ""
    assert Where.of_netns("lb").director == "ip netns exec lb "
    assert Where.of_netns("/proc/9/ns/net").director == "nsenter --net=/proc/9/ns/net "
