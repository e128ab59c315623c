"""Announcement (issue 30): which VIPs are routes for the BGP speaker, and
what the speaker says. The pure parts with literal expectations; the pass
step over the in-memory ports (harness/memory_ports.py), whose route table
stands for ``RouteTable`` (the real one runs in tests/kernel/test_bgp.py)."""

from __future__ import annotations

import dataclasses
import queue
from ipaddress import ip_address

import pytest
from loguru import logger

from dockerlb.adapters.metrics import TableView, table_metrics
from dockerlb.app.controller import Controller
from dockerlb.app.loop import Loop
from dockerlb.core.announce import (
    Announcement,
    Route,
    Session,
    SpeakerState,
    decide,
    parse_protocols,
    route_changes,
)
from dockerlb.core.desired import VipPolicy, build_desired
from dockerlb.core.labels import parse_labels
from dockerlb.core.model import Forward, Proto, RealServer, Service, ServiceKey, Snapshot, VirtualService
from dockerlb.core.ports import Trigger
from dockerlb.core.render import announce_data, announce_text
from dockerlb.errors import AnnounceError
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs, MemoryRoutes, MemorySpeaker
from tests.unit.builders import TEST_VIP_CIDRS, Clock, container
from tests.unit.test_bad_day import Said


class InfoSaid(Said):
    """Every line logged at INFO or above while in the block."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self._sink = logger.add(lambda m: self.lines.append(m.strip()), level="INFO", format="{message}")
        return self.lines


pytestmark = pytest.mark.unit

VIP = ip_address("1.2.3.4")
HTTP, HTTPS = ServiceKey(Proto.TCP, VIP, 80), ServiceKey(Proto.TCP, VIP, 443)
OTHER = ServiceKey(Proto.TCP, ip_address("1.2.3.5"), 80)


def vs(key: ServiceKey, *servers: tuple[str, int]) -> VirtualService:
    """A service with real servers (address, weight) on port 8000."""
    return VirtualService.of(Service(key), [RealServer(ip_address(a), 8000, w) for a, w in servers])


# -- the decision (pure) ---------------------------------------------------------------------
def test_a_vip_is_announced_while_enough_servers_serve_in_the_desired_table_and_the_kernel():
    desired = {HTTP: vs(HTTP, ("10.0.0.2", 1), ("10.0.0.3", 1)), OTHER: vs(OTHER, ("10.0.0.4", 1))}
    # The kernel has 10.0.0.3 at weight 0 (a write not yet taken), and no 10.0.0.4 at all.
    kernel = {HTTP: vs(HTTP, ("10.0.0.2", 1), ("10.0.0.3", 0)), OTHER: vs(OTHER)}
    decided = decide(desired, kernel, {}, ready=True)
    assert [str(a) for a in decided.values()] == ["announced", "withheld: 0 of 1 serving"]
    assert decided[VIP] == Announcement(VIP, serving=1, servers=2, minimum=1, ready=True)


def test_servers_count_once_per_address_across_the_vips_services_and_the_largest_minimum_holds():
    both = (("10.0.0.2", 1), ("10.0.0.3", 1))
    table = {HTTP: vs(HTTP, *both), HTTPS: vs(HTTPS, ("10.0.0.2", 1), ("10.0.0.3", 0), ("10.0.0.9", 1))}
    (a,) = decide(table, table, {HTTP: 2, HTTPS: 3}, ready=True).values()
    assert (a.serving, a.servers, a.minimum, str(a)) == (3, 3, 3, "announced")
    (b,) = decide(table, table, {HTTP: 2, HTTPS: 4}, ready=True).values()
    assert str(b) == "withheld: 3 of 3 serving (4 needed)"


def test_not_ready_withholds_every_vip_and_announce_min_0_announces_one_with_no_server():
    table = {HTTP: vs(HTTP, ("10.0.0.2", 1)), OTHER: vs(OTHER)}
    assert [str(a) for a in decide(table, table, {OTHER: 0}, ready=False).values()] == [
        "withheld: not ready",
        "withheld: not ready",
    ]
    assert [str(a) for a in decide(table, table, {OTHER: 0}, ready=True).values()] == [
        "announced",
        "announced",
    ]


def test_route_changes_add_the_missing_remove_the_extra_and_remake_one_at_another_metric():
    a, b, c = (ip_address(f"1.2.3.{i}") for i in (1, 2, 3))
    add, remove = route_changes([a, b], {Route(b, 10), Route(c, 0)}, 0)
    assert add == [Route(a, 0), Route(b, 0)]
    assert remove == [Route(b, 10), Route(c, 0)]
    assert route_changes([a], {Route(a, 0)}, 0) == ([], [])


# -- the labels ------------------------------------------------------------------------------
def test_announce_min_is_a_label_of_0_to_65535_and_a_bad_one_skips_the_container():
    assert parse_labels("web", {"dockerlb.vip": "1.2.3.4:80"}).specs[0].announce_min == 1
    assert (
        parse_labels("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.announce_min": "0"})
        .specs[0]
        .announce_min
        == 0
    )
    for bad, why in (
        ("65536", "announce_min (serving real servers) must be 0..65535, got 65536"),
        ("-1", "announce_min (serving real servers) must be a whole number 0..65535, got '-1'"),
        ("two", "announce_min (serving real servers) must be a whole number 0..65535, got 'two'"),
    ):
        parsed = parse_labels("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.announce_min": bad})
        assert parsed.specs == ()
        assert [str(p) for p in parsed.problems] == [
            f"container 'web': label 'dockerlb.announce_min': {why}; container skipped"
        ]


def test_a_services_announce_min_is_its_oldest_containers_and_a_younger_one_that_disagrees_is_warned():
    policy = VipPolicy.of(TEST_VIP_CIDRS)
    old = container("old", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.announce_min": "2"}, created="2026-01-01")
    young = container(
        "young",
        {"dockerlb.vip": "1.2.3.4:80", "dockerlb.announce_min": "3"},
        created="2026-01-02",
        nets={"lab": ("10.0.0.11", None)},
    )
    desired = build_desired([young, old], policy=policy)
    assert desired.announce_min == {HTTP: 2}
    assert desired.warnings == (
        "TCP 1.2.3.4:80: container 'young' asks announce_min=3, but the oldest container 'old' set "
        "announce_min=2; keeping 'old''s",
    )


# -- the speaker (pure parsing) --------------------------------------------------------------
# BIRD 2.0.12's answers on its control socket, as read from one (two BGP
# protocols, one up, one down with an error; then one of them established).
GREETING = "0001 BIRD 2.0.12 ready.\n"
PROTOCOLS = (
    "2002-Name       Proto      Table      State  Since         Info\n"
    "1002-device1    Device     ---        up     00:19:27.632  \n"
    " announced  Kernel     master4    up     00:19:27.632  \n"
    " uplink     BGP        ---        up     00:19:31.001  Established   \n"
    " peer2      BGP        ---        down   00:19:27.648  Error: Invalid next hop\n"
    "0000 \n"
)


def test_show_protocols_gives_each_bgp_session_with_its_state():
    state = parse_protocols(GREETING, PROTOCOLS)
    assert state == SpeakerState(
        "BIRD 2.0.12",
        (Session("uplink", "up", "Established"), Session("peer2", "down", "Error: Invalid next hop")),
    )
    assert [s.established for s in state.sessions] == [True, False]
    assert state.summary() == (
        "speaker: BIRD 2.0.12, 1 of 2 BGP sessions established; peer2 Error: Invalid next hop"
    )
    assert state.problem() == (
        "BGP speaker BIRD 2.0.12: BGP session not established: peer2; "
        "the IPVS table stays as it is (see status)"
    )


def test_a_speaker_that_does_not_answer_or_has_no_session_is_a_problem_and_all_established_is_none():
    assert SpeakerState(error="no control socket at /run/bird/bird.ctl (is BIRD running?)").problem() == (
        "BGP speaker: no control socket at /run/bird/bird.ctl (is BIRD running?): no VIP reaches the "
        "network through this director"
    )
    assert SpeakerState("BIRD 2.0.12").problem() == "BGP speaker BIRD 2.0.12: no BGP session is configured"
    up = PROTOCOLS.replace("down   00:19:27.648  Error: Invalid next hop", "up     2026-12-06    Established")
    assert parse_protocols(GREETING, up).problem() == ""


# -- status and /metrics -----------------------------------------------------------------------
def test_status_says_announced_withheld_with_counts_or_not_ready():
    kernel = {
        HTTP: vs(HTTP, ("10.0.0.2", 0), ("10.0.0.3", 0)),
        OTHER: vs(OTHER, ("10.0.0.4", 1)),
        ServiceKey(Proto.TCP, ip_address("1.2.3.6"), 80): vs(
            ServiceKey(Proto.TCP, ip_address("1.2.3.6"), 80), ("10.0.0.5", 1)
        ),
    }
    data = announce_data(kernel, {}, [ip_address("1.2.3.5")], parse_protocols(GREETING, PROTOCOLS))
    assert announce_text(data) == (
        "Announcement: speaker: BIRD 2.0.12, 1 of 2 BGP sessions established; peer2 Error: Invalid next hop\n"
        "  VIP 1.2.3.4: withheld: 0 of 2 serving\n"
        "  VIP 1.2.3.5: announced\n"
        "  VIP 1.2.3.6: withheld: not ready"
    )
    assert announce_text(None) == ""


def test_metrics_have_one_gauge_per_vip_announced_or_not():
    view = TableView.of(
        Snapshot({}, {}), frozenset(), {}, announced={VIP: True, ip_address("1.2.3.5"): False}
    )
    (family,) = [f for f in table_metrics(view) if f.name == "dockerlb_vip_announced"]
    assert [(s.labels, s.value) for s in family.samples] == [({"vip": "1.2.3.4"}, 1), ({"vip": "1.2.3.5"}, 0)]
    assert not [
        f for f in table_metrics(TableView.of(Snapshot({}, {}), frozenset(), {})) if "announced" in f.name
    ]


# -- the pass step, over the in-memory ports ---------------------------------------------------
SETTINGS = Settings(vip_cidr=TEST_VIP_CIDRS, announce=True, announce_metric=20)
LABELS = {"dockerlb.vip": "1.2.3.4:80", "dockerlb.announce_min": "2"}


def lab(settings: Settings = SETTINGS):
    webs = [container(f"web{i}", LABELS, nets={"lab": (f"10.0.0.{i}", None)}) for i in (2, 3)]
    docker, ipvs, routes, speaker = MemoryDocker(webs), MemoryIpvs(), MemoryRoutes(), MemorySpeaker()
    clock = Clock()
    ctl = Controller(settings, docker, ipvs, MemoryDirector(), clock=clock, announcer=routes, speaker=speaker)
    ctl.reconcile_safely(None)  # the start-up pass (as start_up runs it): it is the start-up sync
    ctl.ready.set()
    return ctl, docker, routes, speaker, webs, clock


def sick(docker: MemoryDocker, ctl: Controller, web) -> None:
    docker.start(dataclasses.replace(web, health="unhealthy"))
    ctl.reconcile([Trigger(web.id, "health_status: unhealthy")])


def test_the_start_up_pass_announces_and_a_vip_below_its_minimum_is_withdrawn_then_announced_again():
    ctl, docker, routes, _, webs, _ = lab()
    assert routes.table == {Route(VIP, 20)}
    sick(docker, ctl, webs[0])
    assert routes.table == set()
    assert str(ctl.announcements[VIP]) == "withheld: 1 of 2 serving (2 needed)"
    docker.start(webs[0])
    ctl.reconcile([Trigger(webs[0].id, "health_status: healthy")])
    assert routes.table == {Route(VIP, 20)}


def test_without_announce_no_route_is_read_or_written():
    _, _, routes, _, _, _ = lab(dataclasses.replace(SETTINGS, announce=False))
    assert (routes.table, routes.reads) == (set(), 0)


def test_a_full_pass_repairs_drift_and_leaves_others_alone_event_passes_do_not_read():
    ctl, _, routes, _, webs, _ = lab()
    reads = routes.reads
    routes.table = {
        Route(VIP, 7),
        Route(ip_address("1.2.3.9"), 20),
    }  # by hand: our proto, other metric; a stale VIP
    ctl.reconcile([Trigger(webs[0].id, "start", started=True)])
    assert routes.reads == reads  # carried, not read
    ctl.reconcile(None)
    assert routes.table == {Route(VIP, 20)}


def test_a_failing_route_write_is_one_error_line_while_it_lasts_and_the_ipvs_table_stays():
    ctl, docker, routes, _, webs, _ = lab()
    routes.failing = AnnounceError("cannot withdraw 1.2.3.4 (table 200): FAKE: Operation not permitted")
    with Said() as said:
        sick(docker, ctl, webs[0])
        ctl.reconcile(None)
        ctl.reconcile(None)
    assert said == ["announce: cannot withdraw 1.2.3.4 (table 200): FAKE: Operation not permitted"]
    assert routes.table == {Route(VIP, 20)}  # as it was: the kernel refused
    routes.failing = None
    ctl.reconcile(None)
    assert routes.table == set()


def test_the_speaker_down_is_said_once_while_it_lasts_and_changes_nothing():
    ctl, _, routes, speaker, _, _ = lab()
    speaker.answer = SpeakerState(error="nothing listens on /run/bird/bird.ctl (is BIRD running?)")
    with Said() as said:
        for _ in range(3):
            ctl.reconcile_safely(None)
    assert said == [
        "BGP speaker: nothing listens on /run/bird/bird.ctl (is BIRD running?): no VIP reaches the network "
        "through this director"
    ]
    assert routes.table == {Route(VIP, 20)}


def test_a_graceful_stop_withdraws_every_vip_and_says_whether_any_was():
    ctl, _, routes, _, _, _ = lab()
    assert ctl.withdraw_all("stopping") is True
    assert routes.table == set()
    assert ctl.withdraw_all("stopping") is False


def test_no_full_pass_for_three_resync_intervals_withdraws_at_the_next_failed_pass():
    ctl, docker, routes, _, _, clock = lab()
    docker.list_containers = lambda detailed=None: (_ for _ in ()).throw(AnnounceError("FAKE: Docker gone"))  # type: ignore[method-assign]
    clock.now += 60
    ctl.reconcile_safely(None)
    assert routes.table == {Route(VIP, 20)}  # a failed pass alone withdraws nothing
    clock.now += 3 * SETTINGS.resync_interval + 10
    ctl.reconcile_safely(None)
    assert routes.table == set()
    assert str(ctl.announcements[VIP]) == "withheld: not ready"


def test_forward_is_no_matter_for_counting():
    # DR servers count as NAT ones do: serving is the weight, in both tables.
    key = ServiceKey(Proto.TCP, VIP, 80)
    dr = VirtualService.of(Service(key), [RealServer(ip_address("10.0.0.2"), 80, 1, Forward.DR)])
    assert str(decide({key: dr}, {key: dr}, {}, ready=True)[VIP]) == "announced"


class StepClock(Clock):
    """The loop's clock: each wait passes its whole timeout; the first one on
    the triggers asks the loop to stop (a signal, as the loop sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.loop: Loop | None = None

    def wait(self, triggers: queue.Queue[Trigger], timeout: float) -> Trigger:
        if self.loop is not None and not self.loop.stopping.is_set():
            self.loop.stop()
            return triggers.get_nowait()
        self.waits.append(timeout)
        self.now += timeout
        raise queue.Empty


def test_the_loops_graceful_stop_withdraws_first_then_waits_the_settle_time_then_stops():
    settings = dataclasses.replace(SETTINGS, announce_settle=4.5)
    web = container("web", {"dockerlb.vip": "1.2.3.4:80"})
    docker, routes, clock = MemoryDocker([web]), MemoryRoutes(), StepClock()
    ctl = Controller(
        settings,
        docker,
        MemoryIpvs(),
        MemoryDirector(),
        clock=clock,
        announcer=routes,
        speaker=MemorySpeaker(),
    )
    loop = Loop(ctl, docker, settings, clock)
    clock.loop = loop
    seen: list[set[Route]] = []
    withdraw = ctl.withdraw_all
    ctl.withdraw_all = lambda why: (seen.append(set(routes.table)), withdraw(why))[1]  # type: ignore[method-assign]
    with Said() as said, InfoSaid() as info:
        loop.run()
    assert seen == [{Route(VIP, 20)}]  # announced until the stop
    assert routes.table == set()
    assert clock.waits == [4.5]
    assert said == []
    assert info[-3:] == [
        "withdrawn: VIP 1.2.3.4 (stopping)",
        "VIPs withdrawn: stopping in 4.5 s (--announce-settle)",
        "stopped; the IPVS table is left as it is",
    ]
