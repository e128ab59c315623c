"""Event passes rebuild, plan and write only what their events touch (issue
16), and end exactly where the full path ends.

The differential property drives two controllers over in-memory stand-in
ports (harness/memory_ports.py) with the same random events: one incremental
(the product), one doing the full path on every pass (build everything,
read the kernel, plan everything). After every pass their kernel tables,
VIPs, SNAT sets and desired tables (problems, warnings, checks, drains,
owners) must be equal. The clock is a stand-in too: drains settle and
retire when the test says time passed, never by the wall clock.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from ipaddress import ip_address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from dockerlb.app.controller import Controller
from dockerlb.core.model import Container, NetworkAddress, Proto, Service, ServiceKey
from dockerlb.core.plan import ADD, Write
from dockerlb.core.ports import Trigger
from dockerlb.errors import DockerlbError, IpvsBusy, IpvsRejected
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, Clock, container

pytestmark = pytest.mark.unit

POOL = 8  # containers that may come and go
# 10.0.0.12 is container 2's address and 10.0.0.99 container 7's: a VIP
# that is another container's address (refused while that one exists).
VIPS = ["1.2.3.4", "1.2.3.5", "10.0.0.12", "10.0.0.99", "[fd00::1]"]
ADDRESSES = [f"10.0.0.{10 + i}" for i in range(POOL - 1)] + ["10.0.0.99"]
# Where a container that moves starts again: two of them at a VIP.
MOVED = [f"10.0.1.{10 + i}" for i in range(POOL)]
MOVED[3], MOVED[5] = "1.2.3.5", "1.2.3.4"


@st.composite
def labels(draw) -> dict[str, str]:
    """One container's labels: a VIP and, maybe, what else the contract offers."""
    # Mostly one VIP:port, so services have several servers and settings disagree.
    vip = draw(st.sampled_from([VIPS[0]] * 4 + VIPS))
    out = {"dockerlb.vip": f"{vip}:{draw(st.sampled_from([80, 80, 81]))}"}
    optional = {
        "dockerlb.forward": st.sampled_from(["nat", "dr", "tun"]),
        "dockerlb.weight": st.sampled_from(["0", "1", "3", "abc"]),  # "abc": a bad label
        "dockerlb.scheduler": st.sampled_from(["wlc", "rr", "sh"]),
        "dockerlb.masquerade": st.sampled_from(["true", "false"]),
        "com.docker.compose.project": st.sampled_from(["p1", "p2"]),
        "dockerlb.owner": st.sampled_from(["team-a", "team-b"]),
        "dockerlb.b.vip": st.sampled_from([f"{v}:90" for v in VIPS[:2]] + ["999.0.0.1:90"]),
        "dockerlb.check": st.just("tcp"),
    }
    for label, values in optional.items():
        if draw(st.integers(0, 2)) == 0:  # each in a third of the containers: most still serve
            out[label] = draw(values)
    return out


def pool_of(all_labels: list[dict[str, str]]) -> list[Container]:
    return [
        container(
            f"c{i}", all_labels[i], created=f"2026-01-01T00:00:0{i}Z", nets={"lab": (ADDRESSES[i], None)}
        )
        for i in range(POOL)
    ]


KINDS = [
    "start",
    "start",
    "start",
    "die",
    "stop",
    "stop",
    "destroy",
    "pause",
    "unpause",
    "tick",
    "tick",
    "full",
    "move",  # starts again at another address
    "missed move",  # ... and Docker's events about it are lost
    "missed die",
    "missed destroy",
    "foreign",  # someone else puts a service on a VIP dockerlb does not hold
]
events = st.lists(
    st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, POOL - 1)), min_size=1, max_size=3),
    min_size=5,
    max_size=40,
)


class World:
    """The containers' states, and the event each change makes Docker send."""

    def __init__(self, pool: list[Container], docker: MemoryDocker) -> None:
        self.pool, self.docker = pool, docker
        self.state = ["absent"] * len(pool)

    def happen(self, kind: str, i: int) -> Trigger | None:
        if kind.startswith("missed "):
            self.happen(kind.removeprefix("missed "), i)
            return None  # the change happened; no event says so
        c, state = self.pool[i], self.state[i]
        if kind == "move" and state in ("absent", "exited"):
            self.docker.start(replace(c, networks={"lab": NetworkAddress(ip_address(MOVED[i]))}))
            return self._now(i, "running", Trigger(c.id, "start", started=True))
        if kind == "start" and state in ("absent", "exited"):
            self.docker.start(c)
            return self._now(i, "running", Trigger(c.id, "start", started=True))
        if kind == "die" and state in ("running", "paused"):
            self.docker.die(c.id)
            return self._now(i, "exited", Trigger(c.id, "die", down=True))
        if kind == "stop" and state == "running":
            return Trigger(c.id, "kill", stopping=True, signal="SIGTERM")  # it drains; "die" follows
        if kind == "destroy" and state != "absent":
            self.docker.destroy(c.id)
            return self._now(i, "absent", Trigger(c.id, "destroy", down=True, gone=True))
        if kind == "pause" and state == "running":
            self.docker.pause(c.id)
            return self._now(i, "paused", Trigger(c.id, "pause", down=True))
        if kind == "unpause" and state == "paused":
            self.docker.unpause(c.id)
            return self._now(i, "running", Trigger(c.id, "unpause", started=True))
        return None  # not possible now ("tick" moves the clock, once for both worlds)

    def _now(self, i: int, state: str, trigger: Trigger) -> Trigger:
        self.state[i] = state
        return trigger


class Side:
    """One controller with its own stand-in ports."""

    def __init__(self, pool: list[Container], incremental: bool, clock: Clock) -> None:
        self.docker, self.ipvs, self.director = MemoryDocker(), MemoryIpvs(), MemoryDirector()
        # Half the servers keep a connection: their drains end by the timeout.
        self.ipvs.busy = {ip_address(a) for a in ADDRESSES[::2]}
        # Drains end in two ticks (6 s) when their connections stay.
        settings = Settings(vip_cidr=TEST_VIP_CIDRS, drain_timeout=5.0)
        self.controller = Controller(
            settings, self.docker, self.ipvs, self.director, incremental=incremental, clock=clock
        )

    def seen(self) -> dict:
        """What the pass left: the kernel's table and VIPs, the SNAT set, the desired table."""
        d = self.controller._last.built
        assert d is not None
        return {
            "kernel": self.ipvs.read(counters=False).table,
            "vips": self.director.vips(),
            "masquerade": self.director.masquerade,
            "table": d.table,
            "problems": sorted(map(str, d.problems)),
            "warnings": sorted(d.warnings),
            "checks": set(d.checks),
            "preps": d.preps,
            "draining": d.draining,
            "owners": d.owners,
            "snat": d.snat_keys,
        }

    def foreign(self, i: int) -> None:
        """Someone else's service on 1.2.3.4 or 1.2.3.5, port 80 or 81, unless
        dockerlb holds that VIP now (a service there would be its own: drift)."""
        key = ServiceKey(Proto.TCP, ip_address(VIPS[i % 2]), 80 + i // 4 % 2)
        if key.vip not in self.director.vips() and key not in self.ipvs.read(counters=False).table:
            self.ipvs.write(Write(ADD, Service(key, "sh")))

    def believed(self) -> dict:
        """The kernel's table (dockerlb's VIPs) as the controller believes it, and as it is."""
        known = self.controller._last.kernel
        assert known is not None
        ours = self.director.vips()
        actual = {k: vs for k, vs in self.ipvs.read(counters=False).table.items() if k.vip in ours}
        return {
            "believed": known.owned,
            "vips": known.vips,
            "kernel": actual,
            "kernel_vips": self.director.vips(),
        }


@contextmanager
def quiet():
    """Every label problem is logged: not what this test looks at."""
    logger.disable("dockerlb")
    try:
        yield
    finally:
        logger.enable("dockerlb")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(labels(), min_size=POOL, max_size=POOL), events)
def test_after_every_event_the_incremental_passes_equal_the_full_path(all_labels, steps):
    pool, clock = pool_of(all_labels), Clock()
    incremental, full = Side(pool, incremental=True, clock=clock), Side(pool, incremental=False, clock=clock)
    worlds = [World(pool, side.docker) for side in (incremental, full)]
    with quiet():
        for side in (incremental, full):
            side.controller.reconcile(None)
        for step in steps:
            # Past a drain's settling time (2 s); two ticks end one (5 s).
            clock.now += 3.0 * sum(kind == "tick" for kind, _ in step)
            for kind, i in step:
                if kind == "foreign":
                    incremental.foreign(i)
                    full.foreign(i)
            passes = [[t for kind, i in step if (t := world.happen(kind, i)) is not None] for world in worlds]
            full_pass = any(kind == "full" for kind, _ in step)
            for side, triggers in zip((incremental, full), passes, strict=True):
                side.controller.reconcile(None if full_pass else triggers)
            assert incremental.seen() == full.seen(), f"after {step}"
            mind = incremental.believed()
            assert (mind["believed"], mind["vips"]) == (mind["kernel"], mind["kernel_vips"]), f"after {step}"


# -- literal expectations ------------------------------------------------------


def web(i: int, vip: str = "1.2.3.4:80") -> Container:
    return container(f"web{i}", {"dockerlb.vip": vip}, nets={"lab": (f"10.0.0.{10 + i}", None)})


def servers(ipvs: MemoryIpvs) -> list[str]:
    """The kernel's real servers, with their weight when it is not 1."""
    table = ipvs.read(counters=False).table
    return sorted(
        f"{k} -> {s}" + ("" if s.weight == 1 else f" weight {s.weight}")
        for k, vs in table.items()
        for s in vs.servers.values()
    )


def test_an_event_pass_reads_no_ipvs_table():
    docker, ipvs = MemoryDocker([web(1)]), MemoryIpvs()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector())
    controller.reconcile(None)
    assert ipvs.reads == 1  # a full pass reads the table
    docker.start(web(2))
    controller.reconcile([Trigger("id-web2", "start", started=True)])
    docker.die("id-web1")
    controller.reconcile([Trigger("id-web1", "die", down=True)])
    assert ipvs.reads == 1
    assert servers(ipvs) == ["TCP 1.2.3.4:80 -> 10.0.0.12:80"]


def test_an_event_pass_taking_a_new_vip_first_reads_whether_someone_else_uses_it():
    docker, ipvs, director = MemoryDocker([web(1)]), MemoryIpvs(), MemoryDirector()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, director)
    controller.reconcile(None)
    # Someone else's service, made after the controller's last read.
    ipvs.write(Write(ADD, Service(ServiceKey(Proto.TCP, ip_address("1.2.3.5"), 80), "sh")))
    docker.start(web(2, "1.2.3.5:80"))
    controller.reconcile([Trigger("id-web2", "start", started=True)])
    assert sorted(map(str, director.vips())) == ["1.2.3.4"]
    assert servers(ipvs) == ["TCP 1.2.3.4:80 -> 10.0.0.11:80"]
    assert [vs.service.scheduler for vs in ipvs.read(counters=False).table.values()] == ["wlc", "sh"]


class RefusingPreparer:
    """Stands for ``ServerPreparer``: cannot set up the containers named in
    ``refused`` (as a namespace that cannot be entered), sets up the rest."""

    def __init__(self) -> None:
        self.refused: set[str] = set()

    def prepare(self, desired, containers, full: bool) -> dict[str, str]:
        return {name: "refused by the test" for name in self.refused}

    def release(self, desired, containers) -> None:
        pass


def test_a_container_left_out_is_planned_by_the_next_event_pass_once_it_can_be_set_up():
    docker, ipvs, preparer = MemoryDocker([web(1), web(2)]), MemoryIpvs(), RefusingPreparer()
    controller = Controller(
        Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector(), preparer=preparer
    )  # type: ignore[arg-type]
    preparer.refused = {"web2"}
    controller.reconcile(None)
    assert servers(ipvs) == ["TCP 1.2.3.4:80 -> 10.0.0.11:80"]
    preparer.refused = set()
    docker.start(web(3, "1.2.3.5:80"))  # an event about another service
    controller.reconcile([Trigger("id-web3", "start", started=True)])
    assert servers(ipvs) == [
        "TCP 1.2.3.4:80 -> 10.0.0.11:80",
        "TCP 1.2.3.4:80 -> 10.0.0.12:80",
        "TCP 1.2.3.5:80 -> 10.0.0.13:80",
    ]


class FailingIpvs(MemoryIpvs):
    """A FAKE for faults a real kernel cannot be made to give on demand: the
    next batched write's first entry is refused, and so is every lone write
    while ``refusing`` holds (with ``error``)."""

    fail_next = False
    refusing = False
    error: DockerlbError = IpvsRejected("refused by the test")

    def write_all(self, writes):
        refusing, self.refusing = self.refusing, False  # only lone writes are refused
        try:
            results = super().write_all(writes)
        finally:
            self.refusing = refusing
        if self.fail_next:
            self.fail_next = False
            self._undo_first(writes)
            return [self.error, *results[1:]]
        return results

    def _undo_first(self, writes) -> None:
        key, server = writes[0].service.key, writes[0].server
        del self._table[key].servers[(server.addr, server.port)]

    def write(self, w) -> None:
        if self.refusing:
            raise self.error
        super().write(w)


def test_a_vip_stays_while_a_service_outside_the_event_still_uses_it():
    docker, director = MemoryDocker([web(1, "1.2.3.4:80"), web(2, "1.2.3.4:81")]), MemoryDirector()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, MemoryIpvs(), director)
    controller.reconcile(None)
    docker.destroy("id-web1")
    controller.reconcile([Trigger("id-web1", "destroy", down=True, gone=True)])
    assert sorted(map(str, director.vips())) == ["1.2.3.4"]


def test_a_write_failing_for_good_is_said_once_costs_its_server_alone_and_only_full_passes_retry_it():
    docker, ipvs = MemoryDocker([web(1)]), FailingIpvs()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector())
    controller.reconcile(None)
    lines: list[str] = []
    sink = logger.add(lines.append, level="ERROR", format="{message}")
    try:
        ipvs.fail_next = ipvs.refusing = True
        docker.start(web(2))
        assert controller.reconcile([Trigger("id-web2", "start", started=True)]).failed == 1
        # Later events, on the same service or not: no read of the table, no
        # second try of the write, no second line.
        for i in (3, 4):
            docker.start(web(i, "1.2.3.5:80" if i == 3 else "1.2.3.4:80"))
            outcome = controller.reconcile([Trigger(f"id-web{i}", "start", started=True)])
            assert outcome.failed == 0
        assert ipvs.reads == 1 and ipvs.slices == 0  # the start-up pass's read alone
        assert servers(ipvs) == [
            "TCP 1.2.3.4:80 -> 10.0.0.11:80",
            "TCP 1.2.3.4:80 -> 10.0.0.14:80",
            "TCP 1.2.3.5:80 -> 10.0.0.13:80",
        ]
        controller.reconcile(None)  # still refused: tried again, not said again
        ipvs.refusing = False
        controller.reconcile(None)  # mended
    finally:
        logger.remove(sink)
    assert [line.strip() for line in lines] == [
        "could not apply '+ server TCP 1.2.3.4:80 -> 10.0.0.12:80 nat weight=1 (web2)': refused by the test"
    ]
    assert "TCP 1.2.3.4:80 -> 10.0.0.12:80" in servers(ipvs)


def test_a_write_failing_for_now_is_tried_again_by_the_next_pass_over_its_service():
    docker, ipvs = MemoryDocker([web(1)]), FailingIpvs()
    ipvs.error = IpvsBusy("busy, said the test")
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector())
    controller.reconcile(None)
    ipvs.fail_next = ipvs.refusing = True
    docker.start(web(2))
    assert controller.reconcile([Trigger("id-web2", "start", started=True)]).failed == 1
    ipvs.refusing = False
    docker.start(web(3))
    controller.reconcile([Trigger("id-web3", "start", started=True)])
    assert ipvs.reads == 1  # the start-up pass's read alone
    assert servers(ipvs) == [f"TCP 1.2.3.4:80 -> 10.0.0.1{i}:80" for i in (1, 2, 3)]


def test_a_drained_server_leaves_on_the_drain_poll_with_no_event():
    docker, ipvs, clock = MemoryDocker([web(1), web(2)]), MemoryIpvs(), Clock()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector(), clock=clock)
    controller.reconcile(None)
    controller.reconcile([Trigger("id-web1", "kill", stopping=True, signal="SIGTERM")])
    assert servers(ipvs) == ["TCP 1.2.3.4:80 -> 10.0.0.11:80 weight 0", "TCP 1.2.3.4:80 -> 10.0.0.12:80"]
    clock.now += 3.0  # past the 2 s a drain settles for; no connection is left
    controller.reconcile([])
    assert servers(ipvs) == ["TCP 1.2.3.4:80 -> 10.0.0.12:80"]


class KeyedReadsIpvs(MemoryIpvs):
    """The in-memory IPVS, keeping which services each partial read asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.sliced: list[set[ServiceKey]] = []

    def read(self, counters=True, keys=None):
        if keys is not None:
            keys = set(keys)
            self.sliced.append(keys)
        return super().read(counters, keys)


def test_a_drain_poll_reads_the_draining_service_alone_not_the_table():
    others = [web(i, f"1.2.3.{i}:80") for i in range(10, 40)]  # 30 other services
    docker, ipvs, clock = MemoryDocker([web(1), web(2), *others]), KeyedReadsIpvs(), Clock()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector(), clock=clock)
    controller.reconcile(None)
    controller.reconcile([Trigger("id-web1", "kill", stopping=True, signal="SIGTERM")])
    for _ in range(3):  # the loop's drain polls: passes with no trigger
        clock.now += 1.0
        controller.reconcile([])
    assert ipvs.reads == 1  # the start-up pass's alone
    web_service = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 80)
    assert ipvs.sliced and all(keys == {web_service} for keys in ipvs.sliced)
    assert "TCP 1.2.3.4:80 -> 10.0.0.11:80 weight 0" not in servers(ipvs)  # drained and gone


class UnreadableIpvs(MemoryIpvs):
    """A FAKE: the next read of the services' keys fails (a busy kernel)."""

    fail_next = False

    def services(self):
        if self.fail_next:
            self.fail_next = False
            raise IpvsBusy("busy, said the test")
        return super().services()


def test_an_event_pass_that_fails_leaves_its_container_as_before_so_the_next_full_pass_sees_the_change():
    docker, ipvs = MemoryDocker([web(1)]), UnreadableIpvs()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector())
    controller.reconcile(None)
    ipvs.fail_next = True  # taking web2's new VIP asks what else is on it: that read fails
    docker.start(web(2, "1.2.3.5:80"))
    with pytest.raises(IpvsBusy):
        controller.reconcile([Trigger("id-web2", "start", started=True)])
    assert [c.name for c in controller.containers()] == ["web1"]
    controller.reconcile(None)  # the listing shows web2 started: a change, built and planned
    assert servers(ipvs) == ["TCP 1.2.3.4:80 -> 10.0.0.11:80", "TCP 1.2.3.5:80 -> 10.0.0.12:80"]


@st.composite
def replica_labels(draw) -> dict[str, str]:
    """A replica of one service (a compose service scaled up): one VIP:port,
    and now and then what sets one replica apart (a weight, a check, its
    forwarding, a second service, a bad label), rarely a scheduler that
    disagrees with the oldest's."""
    out = {"dockerlb.vip": "1.2.3.4:80", "com.docker.compose.project": "p1"}
    optional = {
        "dockerlb.weight": st.sampled_from(["1", "2", "0", "abc"]),
        "dockerlb.forward": st.sampled_from(["nat", "dr"]),
        "dockerlb.check": st.just("tcp"),
        "dockerlb.b.vip": st.sampled_from(["1.2.3.5:90", "1.2.3.4:80"]),
        "dockerlb.scheduler": st.just("rr"),
    }
    for label, values in optional.items():
        if draw(st.integers(0, 5)) == 0:
            out[label] = draw(values)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(replica_labels(), min_size=POOL, max_size=POOL), events)
def test_replicas_coming_and_going_are_patched_into_their_service_and_equal_the_full_path(all_labels, steps):
    test_after_every_event_the_incremental_passes_equal_the_full_path.hypothesis.inner_test(all_labels, steps)


def test_a_start_into_a_big_service_builds_that_container_and_the_services_head_alone(monkeypatch):
    from dockerlb.app import passes

    replicas = [web(i) for i in range(1, 60)]
    docker, ipvs = MemoryDocker(replicas), MemoryIpvs()
    controller = Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector())
    controller.reconcile(None)
    built: list[list[str]] = []
    real = passes.build_desired

    def counted(containers, *args, **kwargs):
        containers = list(containers)
        built.append(sorted(c.name for c in containers))
        return real(containers, *args, **kwargs)

    monkeypatch.setattr(passes, "build_desired", counted)
    docker.start(web(60))
    outcome = controller.reconcile([Trigger("id-web60", "start", started=True)])
    assert [op.describe() for op in outcome.ops] == [
        "+ server TCP 1.2.3.4:80 -> 10.0.0.70:80 nat weight=1 (web60)"
    ]
    docker.die("id-web30")
    outcome = controller.reconcile([Trigger("id-web30", "die", down=True)])
    assert [op.describe() for op in outcome.ops] == ["- server TCP 1.2.3.4:80 -> 10.0.0.40:80 (web30)"]
    assert built == [["web1", "web60"], ["web1", "web30"]]
    assert len(servers(ipvs)) == 59
