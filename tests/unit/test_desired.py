from ipaddress import ip_address

import pytest

from dockerlb.core.desired import build_desired
from dockerlb.core.model import Forward, Proto, ServiceKey
from tests.unit.builders import LAB, container

pytestmark = pytest.mark.unit
VIP = {"dockerlb.vip": "1.2.3.4:8000"}
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)


def test_two_labelled_containers_make_one_service_with_two_real_servers():
    d = build_desired(
        [
            container("web1", VIP, nets={"lab": ("10.0.0.2", None)}),
            container("web2", VIP, nets={"lab": ("10.0.0.3", None)}),
        ],
        policy=LAB,
    )
    assert list(d.table) == [KEY]
    servers = d.table[KEY].servers
    assert sorted((str(s.addr), s.port, s.container, s.forward) for s in servers.values()) == [
        ("10.0.0.2", 8000, "web1", Forward.NAT),
        ("10.0.0.3", 8000, "web2", Forward.NAT),
    ]
    assert d.problems == () and d.warnings == ()


def test_stopped_paused_and_unhealthy_containers_are_not_real_servers():
    d = build_desired(
        [
            container("stopped", VIP, running=False),
            container("starting", VIP, health="starting"),
            container("unhealthy", VIP, health="unhealthy"),
            container("healthy", VIP, health="healthy", nets={"lab": ("10.0.0.9", None)}),
        ],
        policy=LAB,
    )
    assert [s.container for s in d.table[KEY].servers.values()] == ["healthy"]


def test_a_service_whose_servers_are_all_unhealthy_stays_with_no_real_server():
    d = build_desired(
        [container("sick", VIP, health="unhealthy"), container("stopped", VIP, running=False)], policy=LAB
    )
    assert list(d.table) == [KEY] and d.table[KEY].servers == {}
    assert build_desired([container("stopped", VIP, running=False)], policy=LAB).table == {}


def test_a_container_with_a_bad_label_is_skipped_and_others_keep_working():
    d = build_desired(
        [
            container("bad", {**VIP, "dockerlb.weight": "heavy"}, nets={"lab": ("10.0.0.2", None)}),
            container("good", VIP, nets={"lab": ("10.0.0.3", None)}),
        ],
        policy=LAB,
    )
    assert [s.container for s in d.table[KEY].servers.values()] == ["good"]
    assert [(p.container, p.label) for p in d.problems] == [("bad", "dockerlb.weight")]


def test_the_network_label_picks_the_address():
    c = container(
        "web",
        {**VIP, "dockerlb.network": "back"},
        nets={"front": ("10.0.0.2", None), "back": ("10.1.0.2", None)},
    )
    (server,) = build_desired([c], policy=LAB).table[KEY].servers.values()
    assert str(server.addr) == "10.1.0.2"


def test_several_networks_without_a_network_label_is_a_problem_naming_the_choices():
    c = container("web", VIP, nets={"front": ("10.0.0.2", None), "back": ("10.1.0.2", None)})
    d = build_desired([c], policy=LAB)
    assert d.table == {}
    (p,) = d.problems
    assert p.label == "dockerlb.network" and "back, front" in p.reason


def test_a_network_the_container_is_not_on_is_a_problem():
    (p,) = build_desired([container("web", {**VIP, "dockerlb.network": "nope"})], policy=LAB).problems
    assert p.label == "dockerlb.network" and "not on network 'nope'" in p.reason


def test_an_ipv6_vip_uses_the_containers_ipv6_address():
    c = container("web", {"dockerlb.vip": "[fd00::100]:80"}, nets={"v6": ("10.0.0.2", "fd00::2")})
    d = build_desired([c], policy=LAB)
    ((key, vs),) = d.table.items()
    assert str(key.vip) == "fd00::100" and [str(s.addr) for s in vs.servers.values()] == ["fd00::2"]


def test_an_ipv6_vip_on_a_container_without_ipv6_is_a_problem():
    (p,) = build_desired([container("web", {"dockerlb.vip": "[fd00::100]:80"})], policy=LAB).problems
    assert "no IPv6 address" in p.reason


def test_the_oldest_container_sets_the_scheduler_and_one_warning_names_both():
    young = container(
        "young",
        {**VIP, "dockerlb.scheduler": "rr"},
        created="2026-02-01T00:00:00Z",
        nets={"lab": ("10.0.0.3", None)},
    )
    old = container("old", VIP, created="2026-01-01T00:00:00Z", nets={"lab": ("10.0.0.2", None)})
    for order in ([young, old], [old, young]):
        d = build_desired(order, policy=LAB)
        assert d.table[KEY].service.scheduler == "wlc"
        assert len(d.table[KEY].servers) == 2
        (w,) = d.warnings
        assert "'young'" in w and "'old'" in w


def test_protocols_on_the_same_vip_and_port_are_separate_services():
    tcp = container("t", VIP, nets={"lab": ("10.0.0.2", None)})
    udp = container("u", {**VIP, "dockerlb.protocol": "udp"}, nets={"lab": ("10.0.0.3", None)})
    assert {k.proto for k in build_desired([tcp, udp], policy=LAB).table} == {Proto.TCP, Proto.UDP}


def test_thresholds_go_on_the_real_server_and_a_bad_one_skips_that_container_alone():
    d = build_desired(
        [
            container(
                "capped",
                {**VIP, "dockerlb.upper_threshold": "3", "dockerlb.lower_threshold": "1"},
                nets={"lab": ("10.0.0.2", None)},
            ),
            container("bad", {**VIP, "dockerlb.lower_threshold": "9"}, nets={"lab": ("10.0.0.3", None)}),
            container("plain", VIP, nets={"lab": ("10.0.0.4", None)}),
        ],
        policy=LAB,
    )
    servers = d.table[KEY].servers.values()
    assert sorted((s.container, s.upper_threshold, s.lower_threshold) for s in servers) == [
        ("capped", 3, 1),
        ("plain", 0, 0),
    ]
    assert [(p.container, p.label) for p in d.problems] == [("bad", "dockerlb.lower_threshold")]


def test_an_sctp_vip_is_its_own_service_beside_tcp_on_the_same_port():
    sctp = {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.protocol": "sctp"}
    d = build_desired(
        [
            container("web1", VIP, nets={"lab": ("10.0.0.2", None)}),
            container("sig1", sctp, nets={"lab": ("10.0.0.3", None)}),
        ],
        policy=LAB,
    )
    assert sorted(str(k) for k in d.table) == ["SCTP 1.2.3.4:8000", "TCP 1.2.3.4:8000"]
