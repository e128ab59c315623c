from ipaddress import ip_address

import pytest

from dockerlb.labels import LabelProblem, parse_labels
from dockerlb.model import Forward, Proto, ServiceKey

pytestmark = pytest.mark.unit


def one_spec(labels):
    parsed = parse_labels("web1", labels)
    assert parsed.problems == ()
    assert len(parsed.specs) == 1
    return parsed.specs[0]


def only_problem(labels) -> LabelProblem:
    parsed = parse_labels("web1", labels)
    assert len(parsed.problems) == 1, parsed.problems
    return parsed.problems[0]


def test_a_bare_vip_gets_every_default():
    spec = one_spec({"dockerlb.vip": "1.2.3.4:8000"})
    assert spec.key == ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)
    assert (spec.target_port, spec.scheduler, spec.forward, spec.weight, spec.persistence, spec.network) == (
        8000,
        "wlc",
        Forward.NAT,
        1,
        0,
        None,
    )


def test_every_key_of_the_contract_is_read():
    spec = one_spec(
        {
            "dockerlb.vip": "1.2.3.4:80",
            "dockerlb.port": "8080",
            "dockerlb.protocol": "udp",
            "dockerlb.scheduler": "rr",
            "dockerlb.forward": "nat",
            "dockerlb.weight": "7",
            "dockerlb.persistence": "300",
            "dockerlb.network": "front",
            "dockerlb.enable": "true",
        }
    )
    assert spec.key == ServiceKey(Proto.UDP, ip_address("1.2.3.4"), 80)
    assert (spec.target_port, spec.scheduler, spec.weight, spec.persistence, spec.network) == (
        8080,
        "rr",
        7,
        300,
        "front",
    )


def test_an_ipv6_vip_is_written_in_brackets():
    spec = one_spec({"dockerlb.vip": "[fd00::10]:53"})
    assert spec.key.vip == ip_address("fd00::10") and spec.key.port == 53


def test_labels_without_the_prefix_are_ignored():
    assert parse_labels("c", {"com.example.vip": "nonsense", "maintainer": "x"}).specs == ()
    assert parse_labels("c", {"com.example.vip": "nonsense"}).problems == ()


def test_the_prefix_is_configurable():
    parsed = parse_labels("c", {"lb.vip": "1.2.3.4:80", "dockerlb.vip": "garbage"}, prefix="lb.")
    assert parsed.problems == () and parsed.specs[0].key.port == 80


def test_enable_false_opts_the_container_out_even_with_bad_labels():
    assert parse_labels("c", {"dockerlb.enable": "false", "dockerlb.vip": "nope"}).specs == ()
    assert parse_labels("c", {"dockerlb.enable": "no", "dockerlb.vip": "nope"}).problems == ()


def test_named_groups_put_one_container_behind_several_vips():
    parsed = parse_labels(
        "c",
        {
            "dockerlb.vip": "1.2.3.4:80",
            "dockerlb.admin.vip": "1.2.3.5:9000",
            "dockerlb.admin.scheduler": "rr",
            "dockerlb.admin.port": "9090",
        },
    )
    assert parsed.problems == ()
    by_group = {s.group: s for s in parsed.specs}
    assert by_group[""].key.port == 80 and by_group[""].scheduler == "wlc"
    assert by_group["admin"].key.port == 9000 and by_group["admin"].target_port == 9090
    assert by_group["admin"].scheduler == "rr"
    assert by_group["admin"].network_label == "dockerlb.admin.network"


def test_a_named_group_can_be_disabled_alone():
    parsed = parse_labels(
        "c", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.b.vip": "1.2.3.5:80", "dockerlb.b.enable": "false"}
    )
    assert [s.group for s in parsed.specs] == [""]


@pytest.mark.parametrize(
    ("label", "value", "reason"),
    [
        ("dockerlb.vip", "1.2.3.4", "expected IPv4:PORT"),
        ("dockerlb.vip", "1.2.3.999:80", "not an IP address"),
        ("dockerlb.vip", "1.2.3.4:0", "port must be 1..65535"),
        ("dockerlb.vip", "1.2.3.4:70000", "port must be 1..65535"),
        ("dockerlb.vip", "1.2.3.4:http", "whole number"),
        ("dockerlb.vip", "fd00::1:80", "brackets"),
        ("dockerlb.vip", "[fd00::1]80", "expected [IPv6]:PORT"),
        ("dockerlb.vip", "0.0.0.0:80", "unicast"),
        ("dockerlb.vip", "224.0.0.1:80", "unicast"),
        ("dockerlb.vip", "127.0.0.1:80", "unicast"),
        ("dockerlb.vip", "255.255.255.255:80", "broadcast"),
        ("dockerlb.port", "0", "port must be 1..65535"),
        ("dockerlb.port", "70000", "port must be 1..65535"),
        ("dockerlb.port", "-1", "whole number"),
        ("dockerlb.protocol", "sctp", "unknown protocol"),
        ("dockerlb.scheduler", "fastest", "unknown scheduler"),
        ("dockerlb.forward", "snat", "unknown forward method"),
        ("dockerlb.weight", "heavy", "whole number"),
        ("dockerlb.weight", "1.5", "whole number"),
        ("dockerlb.weight", "65536", "weight must be 0..65535"),
        ("dockerlb.persistence", "-5", "whole number"),
        ("dockerlb.persistence", "99999999", "persistence (seconds) must be"),
        ("dockerlb.network", "  ", "empty"),
        ("dockerlb.enable", "maybe", "expected true or false"),
        ("dockerlb.weigth", "3", "unknown label"),
        ("dockerlb.a.b.vip", "1.2.3.4:80", "unknown label"),
    ],
)
def test_each_bad_label_is_one_problem_naming_container_label_and_reason(label, value, reason):
    labels = {"dockerlb.vip": "1.2.3.4:8000", label: value}
    problem = only_problem(labels)
    assert problem.container == "web1"
    assert problem.label == label
    assert reason in problem.reason
    assert "web1" in str(problem) and label in str(problem)


def test_direct_routing_needs_the_container_port_to_be_the_vip_port():
    problem = only_problem({"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr", "dockerlb.port": "8080"})
    assert problem.label == "dockerlb.port" and "must equal the VIP port 80" in problem.reason
    assert one_spec({"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "tun"}).forward == Forward.TUN


def test_keys_without_a_vip_are_each_a_problem():
    parsed = parse_labels("c", {"dockerlb.web.port": "80", "dockerlb.web.weight": "2"})
    assert parsed.specs == ()
    assert sorted(p.label for p in parsed.problems) == ["dockerlb.web.port", "dockerlb.web.weight"]
    assert all("dockerlb.web.vip is not set" in p.reason for p in parsed.problems)


def test_two_bad_labels_give_two_problems_and_no_spec():
    parsed = parse_labels("c", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.weight": "x", "dockerlb.port": "0"})
    assert parsed.specs == ()
    assert sorted(p.label for p in parsed.problems) == ["dockerlb.port", "dockerlb.weight"]


def test_values_are_read_case_insensitively_where_they_are_names():
    spec = one_spec({"dockerlb.vip": "1.2.3.4:80", "dockerlb.protocol": "UDP", "dockerlb.scheduler": "RR"})
    assert spec.key.proto == Proto.UDP and spec.scheduler == "rr"
