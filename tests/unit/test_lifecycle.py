import dataclasses
from ipaddress import ip_address

import pytest

from dockerlb.core.desired import VipPolicy, build_desired
from dockerlb.core.lifecycle import SETTLE, Drains, drained, holding
from dockerlb.core.model import (
    CheckState,
    Proto,
    RealServer,
    Role,
    ServerStats,
    Service,
    ServiceKey,
    Snapshot,
    VirtualService,
)
from tests.unit.builders import LAB, container

pytestmark = pytest.mark.unit
VIP = {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.weight": "5"}
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)
WEB = container("web", VIP, nets={"lab": ("10.0.0.2", None)})
OTHER = container("other", VIP, nets={"lab": ("10.0.0.3", None)})


def weights(containers, roles):
    table = build_desired(containers, roles=roles, policy=LAB).table
    return {s.container: s.weight for s in table[KEY].servers.values()}


def test_a_stopping_container_drains_at_weight_0_and_serves_again_once_restarted():
    drains = Drains(timeout=30).told(stopping=[WEB.id])
    roles, drains = drains.roles([WEB, OTHER], {}, now=0)
    assert roles == {WEB.id: Role.DRAIN, OTHER.id: Role.SERVE}
    assert weights([WEB, OTHER], roles) == {"web": 0, "other": 5}
    assert build_desired([WEB, OTHER], roles=roles, policy=LAB).draining == {"web"}
    roles, drains = drains.told(started=[WEB.id]).roles([WEB, OTHER], {}, now=1)
    assert roles == {WEB.id: Role.SERVE, OTHER.id: Role.SERVE}
    assert not drains.draining


def test_a_stop_is_forgotten_once_the_container_no_longer_runs():
    drains = Drains(timeout=30).told(stopping=[WEB.id])
    _, drains = drains.roles([container("web", VIP, running=False)], {}, now=0)
    # Started again by hand, with no "start" event seen: it serves.
    assert drains.roles([WEB], {}, now=1)[0] == {WEB.id: Role.SERVE}


def test_unhealthy_drains_and_healthy_again_restores_the_weight():
    drains = Drains(timeout=30)
    sick = container("web", VIP, nets={"lab": ("10.0.0.2", None)}, health="unhealthy")
    roles, drains = drains.roles([sick], {}, now=0)
    assert weights([sick], roles) == {"web": 0}
    well = container("web", VIP, nets={"lab": ("10.0.0.2", None)}, health="healthy")
    assert weights([well], drains.roles([well], {}, now=1)[0]) == {"web": 5}


def test_our_own_check_going_down_drains_and_a_check_never_passed_is_not_a_server_yet():
    drains = Drains(timeout=30)
    roles, _ = drains.roles([WEB, OTHER], {WEB.id: CheckState.DOWN, OTHER.id: CheckState.PENDING}, now=0)
    assert roles == {WEB.id: Role.DRAIN, OTHER.id: Role.PENDING}
    d = build_desired([WEB, OTHER], roles=roles, policy=LAB)
    assert weights([WEB, OTHER], roles) == {"web": 0}
    assert KEY in d.table  # the service stays while nothing serves


def test_a_drain_that_outlasts_the_timeout_retires_the_server_but_keeps_the_service():
    drains = Drains(timeout=10).told(stopping=[WEB.id])
    roles, drains = drains.roles([WEB], {}, now=100)
    assert roles[WEB.id] is Role.DRAIN
    roles, drains = drains.roles([WEB], {}, now=109.9)
    assert roles[WEB.id] is Role.DRAIN
    roles, drains = drains.roles([WEB], {}, now=110)
    assert roles[WEB.id] is Role.RETIRED
    d = build_desired([WEB], roles=roles, policy=LAB)
    assert d.table[KEY].servers == {}


def snapshot(weight, active, inactive=0):
    server = RealServer(ip_address("10.0.0.2"), 8000, weight)
    return Snapshot(
        {KEY: VirtualService.of(Service(KEY), [server])},
        {(KEY, server.ident): ServerStats(active=active, inactive=inactive)},
    )


@pytest.mark.parametrize(
    ("kernel", "done"),
    [
        (snapshot(weight=0, active=0, inactive=7), {"web"}),  # closing entries do not hold it
        (snapshot(weight=0, active=2), set()),  # established connections still running
        (snapshot(weight=5, active=0), set()),  # weight 0 not applied yet: new ones may come
        (Snapshot({}, {}), {"web"}),  # not in the kernel at all: nothing to drain
    ],
)
def test_a_draining_server_is_drained_when_the_kernel_shows_weight_0_and_no_established_connection(
    kernel, done
):
    drains = Drains(timeout=30).told(stopping=[WEB.id])
    desired = build_desired([WEB], roles=drains.roles([WEB], {}, now=0)[0], policy=LAB)
    assert drained(desired.table, kernel, desired.draining) == done


def test_a_drain_is_never_called_finished_before_it_has_settled():
    # A connection mid-handshake counts as inactive: a drain that began a
    # moment ago may still have one, and removing its server would reset it.
    drains = Drains(timeout=30).told(stopping=[WEB.id])
    _, drains = drains.roles([WEB, OTHER], {}, now=100)
    assert drains.settled({"web", "other"}, now=100 + SETTLE / 2) == set()
    assert drains.settled({"web", "other"}, now=100 + SETTLE) == {"web"}  # "other" is not draining


def test_a_vip_outside_the_allowed_ranges_is_one_problem_naming_the_label_and_others_keep_working():
    bad = container("bad", {"dockerlb.vip": "192.0.2.1:80"}, nets={"lab": ("10.0.0.9", None)})
    d = build_desired([bad, WEB], policy=VipPolicy.of(["1.2.0.0/16"]))
    assert [str(p) for p in d.problems] == [
        "container 'bad': label 'dockerlb.vip': VIP 192.0.2.1 is outside the allowed VIP ranges "
        "(--vip-cidr: 1.2.0.0/16); container skipped"
    ]
    assert [s.container for s in d.table[KEY].servers.values()] == ["web"]


@pytest.mark.parametrize(
    ("vip", "taken", "user"),
    [
        ("10.0.0.2", {}, "container 'web''s address on 'lab'"),
        ("172.20.0.1", {"172.20.0.1": "the director's address on eth0"}, "the director's address on eth0"),
    ],
)
def test_a_vip_that_is_already_someones_address_is_refused(vip, taken, user):
    bad = container("bad", {"dockerlb.web.vip": f"{vip}:80"}, nets={"lab": ("10.0.0.9", None)})
    policy = dataclasses.replace(LAB, taken={ip_address(a): who for a, who in taken.items()})
    d = build_desired([bad, WEB], policy=policy)
    assert [str(p) for p in d.problems] == [
        f"container 'bad': label 'dockerlb.web.vip': VIP {vip} is already in use as {user}; "
        "pick a free address; container skipped"
    ]
    assert KEY in d.table


def test_a_drain_says_how_long_it_has_left_until_its_timeout_retires_it():
    drains = Drains(timeout=30).told(stopping=[WEB.id])
    _, drains = drains.roles([WEB, OTHER], {}, now=100)
    assert drains.left(now=100) == {"web": 30}
    assert drains.left(now=112.5) == {"web": 17.5}
    roles, drains = drains.roles([WEB, OTHER], {}, now=130)
    assert roles[WEB.id] is Role.RETIRED and drains.left(now=130) == {}


A, B = ip_address("10.0.0.2"), ip_address("10.0.0.3")


def table_of(*servers: tuple[RealServer, int], vip: str = "1.2.3.4") -> Snapshot:
    key = ServiceKey(Proto.TCP, ip_address(vip), 8000)
    return Snapshot(
        {key: VirtualService.of(Service(key), [s for s, _ in servers])},
        {(key, s.ident): ServerStats(active=active, inactive=9) for s, active in servers},
    )


@pytest.mark.parametrize(
    ("kernel", "held"),
    [
        (table_of((RealServer(A, 8000, 0), 0)), []),  # weight 0, no established connection
        (Snapshot({}, {}), []),  # out of the table
        (
            table_of((RealServer(A, 8000, 0), 2)),
            ["TCP 1.2.3.4:8000 -> 10.0.0.2:8000 has 2 active connection(s)"],
        ),
        (
            table_of((RealServer(A, 8000, 5), 0)),
            ["TCP 1.2.3.4:8000 -> 10.0.0.2:8000 is serving at weight 5"],
        ),
        (table_of((RealServer(B, 8000, 5), 3)), []),  # another container's server
        (table_of((RealServer(A, 8000, 5), 3), vip="9.9.9.9"), []),  # a service dockerlb does not own
    ],
)
def test_what_holds_a_drain_is_each_server_of_the_container_serving_or_with_active_connections(kernel, held):
    assert holding({"web": frozenset({A})}, kernel, frozenset({ip_address("1.2.3.4")})) == {"web": held}
