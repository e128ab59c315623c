from ipaddress import ip_address

import pytest

from dockerlb.core.labels import LabelProblem, parse_labels
from dockerlb.core.model import Forward, Proto, ServiceKey

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
        ("dockerlb.vip", "0.0.0.0:80", "0.0.0.0 cannot be a VIP: it is the unspecified address"),
        ("dockerlb.vip", "224.0.0.1:80", "224.0.0.1 cannot be a VIP: it is multicast"),
        ("dockerlb.vip", "127.0.0.1:80", "127.0.0.1 cannot be a VIP: it is a loopback address"),
        (
            "dockerlb.vip",
            "255.255.255.255:80",
            "255.255.255.255 cannot be a VIP: it is the broadcast address",
        ),
        ("dockerlb.vip", "0.1.2.3:80", "0.1.2.3 cannot be a VIP: it is in 0.0.0.0/8 (this network)"),
        ("dockerlb.vip", "240.0.0.1:80", "240.0.0.1 cannot be a VIP: it is reserved (240.0.0.0/4)"),
        ("dockerlb.vip", "169.254.1.1:80", "169.254.1.1 cannot be a VIP: it is link-local"),
        ("dockerlb.vip", "[fe80::1]:80", "fe80::1 cannot be a VIP: it is link-local"),
        ("dockerlb.vip", "[::1]:80", "::1 cannot be a VIP: it is a loopback address"),
        ("dockerlb.vip", "[::]:80", ":: cannot be a VIP: it is the unspecified address"),
        (
            "dockerlb.vip",
            "[::ffff:127.0.0.1]:80",
            "::ffff:7f00:1 cannot be a VIP: it is an IPv4-mapped IPv6 address; write the IPv4 address",
        ),
        (
            "dockerlb.vip",
            "[2001:db8::1%x]:80",
            "a VIP cannot carry a scope (%zone), got '[2001:db8::1%x]:80'",
        ),
        ("dockerlb.vip", "[2001:db8::1%\nx]:80", "a VIP cannot carry a scope (%zone)"),
        ("dockerlb.vip", "1.2.3.4: 80", "port must be a whole number 1..65535, got ' 80'"),
        ("dockerlb.vip", " 1.2.3.4:80", "not an IP address in ' 1.2.3.4:80'"),
        ("dockerlb.port", "0", "port must be 1..65535"),
        ("dockerlb.port", "70000", "port must be 1..65535"),
        ("dockerlb.port", "-1", "whole number"),
        ("dockerlb.protocol", "icmp", "unknown protocol 'icmp'; choose one of sctp, tcp, udp"),
        ("dockerlb.scheduler", "fastest", "unknown scheduler"),
        ("dockerlb.forward", "snat", "unknown forward method"),
        ("dockerlb.weight", "heavy", "whole number"),
        ("dockerlb.weight", "1.5", "whole number"),
        ("dockerlb.weight", "65536", "weight must be 0..65535"),
        ("dockerlb.persistence", "-5", "whole number"),
        ("dockerlb.persistence", "99999999", "persistence (seconds) must be"),
        ("dockerlb.network", "", "network name is empty"),
        ("dockerlb.network", "  ", "not a Docker network name (letters, digits, _ . -), got '  '"),
        (
            "dockerlb.network",
            "front end",
            "not a Docker network name (letters, digits, _ . -), got 'front end'",
        ),
        ("dockerlb.weight", " 7 ", "weight must be a whole number 0..65535, got ' 7 '"),
        ("dockerlb.weight", "+7", "weight must be a whole number 0..65535, got '+7'"),
        ("dockerlb.port", "8_0", "port must be a whole number 1..65535, got '8_0'"),
        ("dockerlb.protocol", " tcp", "unknown protocol ' tcp'; choose one of sctp, tcp, udp"),
        ("dockerlb.masquerade", "nope", "expected true or false, got 'nope'"),
        ("dockerlb.check", "icmp", "expected tcp or http:/PATH, got 'icmp'"),
        ("dockerlb.check", "http:health", "an http check needs a path starting with / in URL characters"),
        ("dockerlb.check", "http:/\u00e9", "an http check needs a path starting with / in URL characters"),
        ("dockerlb.check", "http:/a b", "an http check needs a path starting with / in URL characters"),
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


CHECKED = {"dockerlb.vip": "1.2.3.4:80", "dockerlb.check": "http:/health"}


@pytest.mark.parametrize(
    ("label", "value", "reason"),
    [
        ("dockerlb.check_status", "99", "HTTP status must be 100..599, got 99"),
        ("dockerlb.check_status", "2xx", "HTTP status must be a whole number 100..599, got '2xx'"),
        ("dockerlb.check_interval", "1_0", "expected seconds (e.g. 2 or 0.5), got '1_0'"),
        ("dockerlb.check_interval", "1e3", "expected seconds (e.g. 2 or 0.5), got '1e3'"),
        ("dockerlb.check_interval", "nan", "expected seconds (e.g. 2 or 0.5), got 'nan'"),
        ("dockerlb.check_interval", "0.05", "seconds must be 0.1..3600, got '0.05'"),
        ("dockerlb.check_interval", "3601", "seconds must be 0.1..3600, got '3601'"),
        ("dockerlb.check_timeout", " 1", "expected seconds (e.g. 2 or 0.5), got ' 1'"),
        ("dockerlb.check_rise", "0", "rise count must be 1..100, got 0"),
        ("dockerlb.check_fall", "101", "fall count must be 1..100, got 101"),
    ],
)
def test_each_bad_check_label_is_one_problem_with_its_reason(label, value, reason):
    problem = only_problem({**CHECKED, label: value})
    assert (problem.container, problem.label) == ("web1", label)
    assert reason in problem.reason, problem.reason


def test_every_check_key_is_read_with_its_literal_value():
    spec = one_spec(
        {
            **CHECKED,
            "dockerlb.check_status": "204",
            "dockerlb.check_interval": "5s",
            "dockerlb.check_timeout": "0.5",
            "dockerlb.check_rise": "4",
            "dockerlb.check_fall": "6",
        }
    )
    assert spec.check is not None
    assert (spec.check.kind, spec.check.path, spec.check.status) == ("http", "/health", 204)
    assert (spec.check.interval, spec.check.timeout, spec.check.rise, spec.check.fall) == (5.0, 0.5, 4, 6)


def test_a_check_without_its_optional_keys_gets_the_documented_defaults():
    spec = one_spec({"dockerlb.vip": "1.2.3.4:80", "dockerlb.check": "TCP"})
    assert spec.check is not None
    assert (spec.check.kind, spec.check.status, spec.check.interval, spec.check.timeout) == (
        "tcp",
        None,
        2.0,
        1.0,
    )
    assert (spec.check.rise, spec.check.fall) == (2, 3)


def test_check_keys_without_a_check_and_a_status_on_a_tcp_check_are_problems():
    problem = only_problem({"dockerlb.vip": "1.2.3.4:80", "dockerlb.check_rise": "3"})
    assert problem.reason == "applies to no check: dockerlb.check is not set"
    problem = only_problem(
        {"dockerlb.vip": "1.2.3.4:80", "dockerlb.check": "tcp", "dockerlb.check_status": "200"}
    )
    assert (problem.label, problem.reason) == (
        "dockerlb.check_status",
        "applies to http checks only, not tcp",
    )


def test_a_check_timeout_longer_than_its_interval_is_a_problem():
    problem = only_problem({**CHECKED, "dockerlb.check_interval": "1", "dockerlb.check_timeout": "2"})
    assert problem.label == "dockerlb.check_timeout"
    assert problem.reason == "check timeout 2 s is longer than its interval 1 s"


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("ON", True), ("no", False), ("0", False)])
def test_masquerade_reads_true_and_false_words(value, expected):
    assert one_spec({"dockerlb.vip": "1.2.3.4:80", "dockerlb.masquerade": value}).masquerade is expected


def test_masquerade_and_ipv6_are_refused_with_direct_routing_and_tunnels():
    problem = only_problem(
        {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr", "dockerlb.masquerade": "true"}
    )
    assert problem.label == "dockerlb.masquerade"
    assert (
        problem.reason == "applies to forward=nat only; with forward=dr the server answers the client itself"
    )
    problem = only_problem({"dockerlb.vip": "[fd00::1]:80", "dockerlb.forward": "tun"})
    assert (
        problem.reason == "forward=tun is IPv4 only in dockerlb so far; use forward=nat for IPv6 VIP fd00::1"
    )


def test_sctp_is_a_protocol_for_every_forwarding_method():
    for forward in ("nat", "dr", "tun"):
        spec = one_spec(
            {"dockerlb.vip": "1.2.3.4:3868", "dockerlb.protocol": "SCTP", "dockerlb.forward": forward}
        )
        assert (spec.key, spec.forward) == (
            ServiceKey(Proto.SCTP, ip_address("1.2.3.4"), 3868),
            Forward(forward),
        )


def test_thresholds_are_read_in_the_unnamed_and_in_named_groups():
    parsed = parse_labels(
        "web1",
        {
            "dockerlb.vip": "1.2.3.4:80",
            "dockerlb.upper_threshold": "100",
            "dockerlb.lower_threshold": "60",
            "dockerlb.admin.vip": "1.2.3.5:81",
            "dockerlb.admin.upper_threshold": "65535",
        },
    )
    assert parsed.problems == ()
    assert [(s.group, s.upper_threshold, s.lower_threshold) for s in parsed.specs] == [
        ("", 100, 60),
        ("admin", 65535, 0),
    ]
    assert (one_spec({"dockerlb.vip": "1.2.3.4:80"}).upper_threshold, 0) == (0, 0)


@pytest.mark.parametrize(
    ("labels", "label", "reason"),
    [
        (
            {"dockerlb.upper_threshold": "65536"},
            "dockerlb.upper_threshold",
            "upper threshold (connections) must be 0..65535, got 65536",
        ),
        (
            {"dockerlb.upper_threshold": "many"},
            "dockerlb.upper_threshold",
            "upper threshold (connections) must be a whole number 0..65535, got 'many'",
        ),
        (
            {"dockerlb.lower_threshold": "-1"},
            "dockerlb.lower_threshold",
            "lower threshold (connections) must be a whole number 0..65535, got '-1'",
        ),
        (
            {"dockerlb.upper_threshold": "10", "dockerlb.lower_threshold": "11"},
            "dockerlb.lower_threshold",
            "lower threshold 11 is above upper threshold 10",
        ),
        (
            {"dockerlb.upper_threshold": "0", "dockerlb.lower_threshold": "5"},
            "dockerlb.lower_threshold",
            "lower threshold 5 is above upper threshold 0 (0: no limit)",
        ),
        (
            {"dockerlb.lower_threshold": "5"},
            "dockerlb.lower_threshold",
            "applies only with dockerlb.upper_threshold set: it is the count below which a server at its "
            "upper threshold takes new connections again",
        ),
    ],
)
def test_a_bad_threshold_is_one_problem_naming_the_container_the_label_and_why(labels, label, reason):
    assert parse_labels("web1", {"dockerlb.vip": "1.2.3.4:80", **labels}).problems == (
        LabelProblem("web1", label, reason),
    )


def test_a_bad_threshold_in_a_named_group_names_that_groups_own_label():
    parsed = parse_labels(
        "web1",
        {
            "dockerlb.vip": "1.2.3.4:80",
            "dockerlb.admin.vip": "1.2.3.5:81",
            "dockerlb.admin.lower_threshold": "5",
        },
    )
    assert parsed.problems == (
        LabelProblem(
            "web1",
            "dockerlb.admin.lower_threshold",
            "applies only with dockerlb.admin.upper_threshold set: it is the count below which a server at "
            "its upper threshold takes new connections again",
        ),
    )
    assert str(parsed.problems[0]) == (
        "container 'web1': label 'dockerlb.admin.lower_threshold': applies only with "
        "dockerlb.admin.upper_threshold set: it is the count below which a server at its upper threshold "
        "takes new connections again; container skipped"
    )
