"""What each forwarding method asks of a real server's namespace, and of the
director's SNAT rule: labels -> desired preps, pure."""

from ipaddress import ip_address

import pytest

from dockerlb.adapters.ipvs import schedulers_configured, schedulers_in
from dockerlb.adapters.realserver import RealServerNetns
from dockerlb.app.server_prep import ServerPreparer
from dockerlb.core.desired import VipPolicy, build_desired, without
from dockerlb.core.labels import parse_labels
from dockerlb.core.model import Forward, Proto, ServerPrep, ServiceKey
from tests.unit.builders import LAB, TEST_VIP_CIDRS, container

pytestmark = pytest.mark.unit
VIP = ip_address("1.2.3.4")
LAB_AND_5678 = VipPolicy.of([*TEST_VIP_CIDRS, "5.6.7.0/24"])
WEB80 = frozenset({ServiceKey(Proto.TCP, VIP, 80)})


def test_direct_routing_asks_for_the_vip_on_loopback_and_no_snat():
    d = build_desired(
        [container("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr"})], policy=LAB
    )
    assert d.preps == {"id-web": ServerPrep("web", ip_address("10.0.0.10"), loopback=frozenset({VIP}))}
    assert d.snat_keys == frozenset()


def test_tunnelling_asks_for_the_vip_on_tunl0():
    d = build_desired(
        [container("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "tun"})], policy=LAB
    )
    assert d.preps["id-web"].tunnel == frozenset({VIP}) and not d.preps["id-web"].loopback


def test_nat_is_snatted_by_default_and_needs_nothing_in_the_server():
    d = build_desired([container("web", {"dockerlb.vip": "1.2.3.4:80"})], policy=LAB)
    assert d.preps == {} and d.snat_keys == WEB80


def test_nat_keeping_the_client_address_routes_the_server_via_the_director():
    by_label = build_desired(
        [container("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.masquerade": "false"})], policy=LAB
    )
    by_setting = build_desired(
        [container("web", {"dockerlb.vip": "1.2.3.4:80"})], masquerade=False, policy=LAB
    )
    for d in (by_label, by_setting):
        assert d.preps["id-web"].route_via_director and d.snat_keys == frozenset()
    # A label says more than the setting.
    snat = build_desired(
        [container("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.masquerade": "true"})],
        masquerade=False,
        policy=LAB,
    )
    assert snat.preps == {} and snat.snat_keys == WEB80


def test_one_container_on_two_vips_by_dr_and_tun_gets_both_in_one_prep():
    labels = {
        "dockerlb.a.vip": "1.2.3.4:80",
        "dockerlb.a.forward": "dr",
        "dockerlb.b.vip": "5.6.7.8:80",
        "dockerlb.b.forward": "tun",
    }
    both = LAB_AND_5678
    prep = build_desired([container("web", labels)], policy=both).preps["id-web"]
    assert prep.loopback == frozenset({VIP}) and prep.tunnel == frozenset({ip_address("5.6.7.8")})


def test_a_server_that_does_not_serve_asks_for_nothing_so_its_namespace_is_cleaned():
    labels = {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr"}
    d = build_desired(
        [container("web", labels, health="unhealthy"), container("old", labels, running=False)], policy=LAB
    )
    assert d.preps == {}


def test_the_oldest_container_decides_masquerade_and_a_younger_one_that_disagrees_is_warned():
    first = container("first", {"dockerlb.vip": "1.2.3.4:80"}, created="2026-01-01T00:00:00Z")
    second = container(
        "second",
        {"dockerlb.vip": "1.2.3.4:80", "dockerlb.masquerade": "false"},
        created="2026-01-02T00:00:00Z",
    )
    d = build_desired([second, first], policy=LAB)
    assert d.snat_keys == WEB80
    assert any("'second' asks masquerade=false" in w and "'first'" in w for w in d.warnings)


@pytest.mark.parametrize(
    ("labels", "label", "says"),
    [
        ({"dockerlb.vip": "[fd00::1]:80", "dockerlb.forward": "dr"}, "dockerlb.forward", "IPv4 only"),
        (
            {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "tun", "dockerlb.masquerade": "false"},
            "dockerlb.masquerade",
            "forward=nat only",
        ),
        (
            {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr", "dockerlb.port": "81"},
            "dockerlb.port",
            "must equal the VIP port 80",
        ),
        (
            {"dockerlb.vip": "1.2.3.4:80", "dockerlb.masquerade": "maybe"},
            "dockerlb.masquerade",
            "true or false",
        ),
    ],
)
def test_a_forwarding_label_that_cannot_work_is_one_problem_naming_it(labels, label, says):
    parsed = parse_labels("web", labels)
    assert parsed.specs == ()
    (problem,) = parsed.problems
    assert problem.container == "web" and problem.label == label and says in problem.reason


def test_servers_of_containers_that_could_not_be_set_up_are_left_out_and_their_service_stays():
    labels = {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr"}
    d = build_desired(
        [container("a", labels), container("b", labels, nets={"lab": ("10.0.0.11", None)})], policy=LAB
    )
    (key,) = d.table
    left = without(d.table, {"a"})
    assert [s.container for s in left[key].servers.values()] == ["b"]
    assert {s.forward for s in d.table[key].servers.values()} == {Forward.DR}


def test_the_schedulers_a_kernel_has_are_read_from_its_module_lists():
    modules_dep = (
        "kernel/net/netfilter/ipvs/ip_vs_rr.ko: kernel/net/netfilter/ipvs/ip_vs.ko\n"
        "kernel/net/netfilter/ipvs/ip_vs_pe_sip.ko: kernel/net/netfilter/ipvs/ip_vs.ko\n"
        "kernel/net/netfilter/ipvs/ip_vs_ftp.ko: kernel/net/netfilter/ipvs/ip_vs.ko\n"
    )
    proc_modules = "ip_vs_mh 16384 0 - Live 0x0\nip_vs 200704 2 ip_vs_mh, Live 0x0\n"
    assert schedulers_in(modules_dep + proc_modules) == frozenset({"rr", "mh"})


def test_the_schedulers_a_kernel_builds_in_are_read_from_its_config():
    config = (
        "CONFIG_IP_VS=y\nCONFIG_IP_VS_PROTO_TCP=y\nCONFIG_IP_VS_RR=y\nCONFIG_IP_VS_WLC=m\n"
        "# CONFIG_IP_VS_SH is not set\nCONFIG_IP_VS_SH_TAB_BITS=8\nCONFIG_IP_VS_NFCT=y\n"
    )
    assert schedulers_configured(config) == frozenset({"rr", "wlc"})


def test_a_server_whose_namespace_the_controller_cannot_see_is_named_with_the_reason_and_left_out():
    # A PID beyond pid_max: what a controller without pid: host sees of every
    # other container's process (nothing), as a real condition, not a fake.
    labels = {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr"}
    hidden = container("hidden", labels, pid=2**22 + 7)
    d = build_desired([hidden], policy=LAB)
    preparer = ServerPreparer(RealServerNetns(), director=None, masquerade=True, prefix="dockerlb.")  # type: ignore[arg-type]
    blocked = preparer.blocked(d.preps, {hidden.id: hidden})
    assert list(blocked) == ["hidden"] and "run it with pid: host" in blocked["hidden"]
    (key,) = d.table
    assert without(d.table, blocked)[key].servers == {}
