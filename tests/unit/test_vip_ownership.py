"""A VIP:port belongs to one group; another group's containers are refused
with one problem naming both, unless sharing is on. Literal expectations."""

import json
from dataclasses import replace
from ipaddress import ip_address, ip_network

import pytest

from dockerlb.adapters.director import owners_of
from dockerlb.core.desired import VipPolicy, build_desired, kept_labels
from dockerlb.core.labels import LabelProblem
from dockerlb.core.model import DockerNetwork, Proto, ServiceKey
from tests.unit.builders import LAB, container

pytestmark = pytest.mark.unit
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)


def web(name, project, created, addr, **labels):
    return container(
        name,
        {"dockerlb.vip": "1.2.3.4:8000", "com.docker.compose.project": project, **labels},
        created=created,
        nets={"lab": (addr, None)},
    )


def test_a_squatter_from_another_project_is_refused_and_names_the_owner():
    team = web("team-web-1", "team", "2026-01-02T00:00:00Z", "10.0.0.2")
    squat = web("squat", "other", "2026-01-01T00:00:00Z", "10.0.0.9", **{"dockerlb.weight": "65535"})
    d = build_desired([team, squat], owners={KEY: "team"}, policy=LAB)
    assert [s.container for s in d.table[KEY].servers.values()] == ["team-web-1"]
    assert d.problems == (
        LabelProblem(
            "squat",
            "dockerlb.vip",
            "TCP 1.2.3.4:8000 belongs to group 'team' (container 'team-web-1'), and this container is in "
            "group 'other'; sharing a VIP across groups needs --share-vips",
        ),
    )
    assert d.owners == {KEY: "team"}


def test_with_no_owner_decided_the_oldest_running_claimants_group_owns_a_new_vip():
    # A VIP:port no one held before (no owner decided, nothing in the kernel).
    old = web("old", "first", "2026-01-01T00:00:00Z", "10.0.0.2")
    young = web("young", "second", "2026-01-03T00:00:00Z", "10.0.0.3")
    d = build_desired([young, old], policy=LAB)
    assert [s.container for s in d.table[KEY].servers.values()] == ["old"]
    assert [p.container for p in d.problems] == ["young"]
    assert d.owners == {KEY: "first"}


def test_the_owner_keeps_its_vip_against_an_older_container_started_later():
    # `docker create` early, start later: Created says older; ownership does not move.
    owner = web("owner", "team", "2026-01-05T00:00:00Z", "10.0.0.2")
    faked = web("faked", "other", "2026-01-01T00:00:00Z", "10.0.0.3", **{"dockerlb.scheduler": "rr"})
    d = build_desired([owner, faked], owners={KEY: "team"}, policy=LAB)
    assert d.table[KEY].service.scheduler == "wlc"
    assert [s.container for s in d.table[KEY].servers.values()] == ["owner"]


def test_an_owner_with_no_container_running_keeps_its_vip_and_another_group_is_refused():
    other = web("other-1", "other", "2026-01-01T00:00:00Z", "10.0.0.3")
    d = build_desired([other], owners={KEY: "team"}, policy=LAB)
    assert d.owners == {KEY: "team"} and d.table == {}
    assert d.problems == (
        LabelProblem(
            "other-1",
            "dockerlb.vip",
            "TCP 1.2.3.4:8000 belongs to group 'team' (no container of it runs now; it keeps its claim), "
            "and this container is in group 'other'; sharing a VIP across groups needs --share-vips",
        ),
    )


def test_the_owner_label_groups_containers_outside_compose():
    a = container(
        "a", {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.owner": "ops"}, nets={"lab": ("10.0.0.2", None)}
    )
    b = container(
        "b",
        {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.owner": "ops"},
        created="2026-01-02T00:00:00Z",
        nets={"lab": ("10.0.0.3", None)},
    )
    c = container(
        "c",
        {"dockerlb.vip": "1.2.3.4:8000"},
        created="2026-01-03T00:00:00Z",
        nets={"lab": ("10.0.0.4", None)},
    )
    d = build_desired([a, b, c], policy=LAB)
    assert sorted(s.container for s in d.table[KEY].servers.values()) == ["a", "b"]
    assert d.problems == (
        LabelProblem(
            "c",
            "dockerlb.vip",
            "TCP 1.2.3.4:8000 belongs to group 'ops' (container 'a'), and this container is in "
            "no group; sharing a VIP across groups needs --share-vips",
        ),
    )


def test_the_compose_project_wins_over_the_owner_label():
    a = web("a", "team", "2026-01-01T00:00:00Z", "10.0.0.2")
    b = web("b", "team", "2026-01-02T00:00:00Z", "10.0.0.3", **{"dockerlb.owner": "someone-else"})
    d = build_desired([a, b], policy=LAB)
    assert sorted(s.container for s in d.table[KEY].servers.values()) == ["a", "b"]
    assert d.problems == ()


def test_sharing_lets_every_group_join_and_the_oldest_sets_the_service():
    a = web("a", "team", "2026-01-02T00:00:00Z", "10.0.0.2")
    b = web("b", "other", "2026-01-01T00:00:00Z", "10.0.0.3", **{"dockerlb.scheduler": "rr"})
    d = build_desired([a, b], policy=replace(LAB, share=True), owners={KEY: "team"})
    assert sorted(s.container for s in d.table[KEY].servers.values()) == ["a", "b"]
    assert d.table[KEY].service.scheduler == "rr"


def test_a_refused_container_loses_its_other_vips_too():
    squat = container(
        "squat",
        {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.mine.vip": "5.6.7.8:80", "dockerlb.owner": "x"},
        created="2026-01-02T00:00:00Z",
        nets={"lab": ("10.0.0.9", None)},
    )
    team = web("team-1", "team", "2026-01-01T00:00:00Z", "10.0.0.2")
    d = build_desired([team, squat], policy=LAB)
    assert list(d.table) == [KEY]
    assert [p.container for p in d.problems] == ["squat"]


NETS = (
    DockerNetwork("lab", (ip_network("10.0.0.0/24"),), (ip_address("10.0.0.1"),)),
    DockerNetwork("v6", (ip_network("fd00:1::/64"),), (ip_address("fd00:1::1"),)),
    DockerNetwork("bridge", (ip_network("172.17.0.0/16"),), (ip_address("172.17.0.1"),)),
)


@pytest.mark.parametrize(
    ("vip", "reason"),
    [
        (
            "10.0.0.77:80",
            "VIP 10.0.0.77 is inside Docker network 'lab' (10.0.0.0/24), whose addresses Docker hands to "
            "containers; pick an address outside every Docker network",
        ),
        (
            "[fd00:1::99]:80",
            "VIP fd00:1::99 is inside Docker network 'v6' (fd00:1::/64), whose addresses Docker hands to "
            "containers; pick an address outside every Docker network",
        ),
        (
            "172.17.0.1:80",
            "VIP 172.17.0.1 is already in use as the gateway of network 'bridge'; pick a free address",
        ),
        (
            "192.168.9.1:80",
            "VIP 192.168.9.1 is already in use as the director's default gateway; pick a free address",
        ),
    ],
)
def test_vips_inside_docker_networks_or_on_a_gateway_are_refused(vip, reason):
    c = container("w", {"dockerlb.vip": vip}, nets={"lab": ("10.0.0.2", "fd00:1::2")})
    taken = {ip_address("192.168.9.1"): "the director's default gateway"}
    d = build_desired([c], policy=VipPolicy(networks=NETS, taken=taken))
    assert d.table == {}
    assert d.problems == (LabelProblem("w", "dockerlb.vip", reason),)


def test_a_vip_outside_every_docker_network_is_accepted():
    c = container("w", {"dockerlb.vip": "10.9.9.9:80"}, nets={"lab": ("10.0.0.2", None)})
    d = build_desired([c], policy=VipPolicy(networks=NETS))
    assert d.problems == ()
    assert [str(k) for k in d.table] == ["TCP 10.9.9.9:80"]


def test_a_vip_that_is_both_a_docker_gateway_and_the_directors_says_which_network():
    c = container("w", {"dockerlb.vip": "172.17.0.1:80"}, nets={"lab": ("10.0.0.2", None)})
    taken = {ip_address("172.17.0.1"): "the director's default gateway"}
    (problem,) = build_desired([c], policy=VipPolicy(networks=NETS, taken=taken)).problems
    assert (
        problem.reason
        == "VIP 172.17.0.1 is already in use as the gateway of network 'bridge'; pick a free address"
    )


COMPOSE_LABELS = {
    "com.docker.compose.config-hash": "9f2c",
    "com.docker.compose.container-number": "1",
    "com.docker.compose.oneoff": "False",
    "com.docker.compose.project.working_dir": "/srv/team",
    "com.docker.compose.service": "web",
    "com.docker.compose.version": "1.29.2",
}


def test_kept_labels_are_the_prefixs_the_compose_project_the_stack_and_signal():
    labels = {
        **COMPOSE_LABELS,
        "com.docker.compose.project": "team",
        "com.docker.stack.namespace": "shop",
        "signal": "x",
        "dockerlb.vip": "v",
    }
    assert kept_labels(labels, "dockerlb.") == {
        "com.docker.compose.project": "team",
        "com.docker.stack.namespace": "shop",
        "signal": "x",
        "dockerlb.vip": "v",
    }
    assert kept_labels(labels, "lb.") == {
        "com.docker.compose.project": "team",
        "com.docker.stack.namespace": "shop",
        "signal": "x",
    }
    # Interned: replicas decoded from separate answers share their strings.
    one, two = (kept_labels(json.loads(json.dumps(labels)), "dockerlb.") for _ in range(2))
    assert all(k1 is k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(one.items(), two.items(), strict=True))


def test_what_kept_labels_leave_out_changes_no_desired_table():
    containers = [
        web("a", "team", "2026-01-01T00:00:00Z", "10.0.0.2", **COMPOSE_LABELS),
        web("b", "other", "2026-01-02T00:00:00Z", "10.0.0.3", **COMPOSE_LABELS),
        web("c", "team", "2026-01-03T00:00:00Z", "10.0.0.4", **{**COMPOSE_LABELS, "dockerlb.weight": "x"}),
    ]
    kept = [replace(c, labels=kept_labels(c.labels, "dockerlb.")) for c in containers]
    assert build_desired(kept, owners={KEY: "other"}, policy=LAB) == build_desired(
        containers, owners={KEY: "other"}, policy=LAB
    )


# What `nft -j list table inet dockerlb_owners` printed (nft 1.0.6) for the
# same record with /etc/protocols and without it (bind-mounted over by
# /dev/null, as in dockerlb's image, which has no netbase): names, or numbers.
OWNERS_NAMED = (
    '{"nftables": [{"set": {"family": "inet", "name": "owners4", "table": "dockerlb_owners", "elem": ['
    '{"concat": ["10.20.30.2", "udp", 53]}, {"elem": {"val": {"concat": ["10.20.30.1", "tcp", 8000]}, '
    '"comment": "web"}}]}}, {"set": {"family": "inet", "name": "owners6", "table": "dockerlb_owners", '
    '"elem": [{"elem": {"val": {"concat": ["fd00::1", "sctp", 9000]}, "comment": "g"}}]}}]}'
)
OWNERS_NUMBERED = OWNERS_NAMED.replace('"udp"', "17").replace('"tcp"', "6").replace('"sctp"', "132")


@pytest.mark.parametrize("printed", [OWNERS_NAMED, OWNERS_NUMBERED], ids=["names", "numbers"])
def test_the_owners_record_reads_the_same_whether_nft_names_the_protocols_or_numbers_them(printed):
    assert owners_of(json.loads(printed)) == {
        ServiceKey(Proto.UDP, ip_address("10.20.30.2"), 53): "",
        ServiceKey(Proto.TCP, ip_address("10.20.30.1"), 8000): "web",
        ServiceKey(Proto.SCTP, ip_address("fd00::1"), 9000): "g",
    }
