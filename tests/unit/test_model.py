"""A model of dockerlb's world, with faults, run against the real controller
(issue 29, "A model test that injects faults").

A hypothesis state machine keeps its own small world (compose containers
that start, stop, die, restart, are recreated and destroyed, whole projects
brought down; a foreign writer's IPVS services; connections; a clock) and
drives the real ``Controller`` over the in-memory ports
(harness/memory_ports.py) through it: event passes fed the triggers Docker
would send (as sent, some lost, some twice, in another order, or after a
replay of the last ones), drain polls, full passes, IPVS writes that fail,
controller restarts between passes and in the middle of a batch. After
every pass it checks what dockerlb promises:

- the foreign writer's services are exactly as it left them, and no service
  is left on a VIP dockerlb does not hold (it would look foreign for good);
- a VIP:port never changes group while its group has a claimant the
  controller knows of, nor within ``owner_grace`` of the last one going;
- a draining server is not removed before its drain ends;
- an ERROR line is not said twice in a pass, nor again by the same
  controller while nothing about its VIP changed;

and, when the faults stop, that one full pass makes the kernel's table
exactly what the labels say, with nothing failing.

The oracle is the test's own: it calls no dockerlb code that decides (no
``build_desired``, no ``plan``, no ``Owners``). To stay obviously right the
world is small: two VIPs with two ports each, two compose projects, one
VIP:port per container, a weight or an invalid one. Who owns a key is what
the kernel shows: the group of the containers its real servers are (where
the kernel cannot show it, any group that claims the key may). What the
controller knows is what it was told, by the trigger contract (``Trigger``
in core/ports.py, ``Drains`` in core/lifecycle.py): a full pass shows it
every container as it is; a trigger tells it its container's fate
(``gone``: removed; ``down``: not running; otherwise it looks); a kill with
a stop signal begins a drain of a container it sees running, which lasts
until a start is told or it sees the container not running.

What it found (A: an owner lost at a restart while its containers were
stopped; B: a stop after a start in one batch forgotten; C: a restart
whose events were lost leaving its container drained) is fixed; the
literal reproductions stay in tests/unit/test_model_findings.py.

The IPVS faults are FAKES (``FaultyIpvs``): a real kernel cannot fail on
demand. So is ``Crash``, the process dying in the middle of a batch.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, ip_address

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from loguru import logger

from dockerlb.app.applier import Outcome
from dockerlb.app.controller import Controller
from dockerlb.core.lifecycle import SETTLE
from dockerlb.core.model import Container, NetworkAddress, Proto, RealServer, Service, ServiceKey
from dockerlb.core.plan import ADD, EDIT, REMOVE, Write
from dockerlb.core.ports import Trigger
from dockerlb.errors import DockerlbError, IpvsBusy, IpvsExists, IpvsNotFound, IpvsRejected, Retryable
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, Clock

pytestmark = pytest.mark.unit

VIPS = ("1.2.3.4", "1.2.3.5")
KEYS = tuple(ServiceKey(Proto.TCP, ip_address(v), p) for v in VIPS for p in (80, 81))
# The foreign writer's: dockerlb's two VIPs (while dockerlb does not hold
# them) and one dockerlb is never asked for.
FOREIGN_KEYS = (*KEYS, ServiceKey(Proto.TCP, ip_address("1.2.3.9"), 80))
PROJECTS = ("p1", "p2")
# None: the default weight (1); "abc": an invalid label (the container is skipped whole).
WEIGHTS = (None, None, "3", "abc")
DRAIN_TIMEOUT = 5.0
OWNER_GRACE = 8.0
TICKS = (1.0, 2.5, 6.0, 11.0)  # past a drain's settling time, past its timeout, past the grace
MOST = 6  # containers at once
KEY = st.sampled_from((KEYS[0], KEYS[0], *KEYS))  # mostly one, so groups compete for it
# Whether a change's events reach the controller at once (else with later ones).
SOON = st.sampled_from((True, True, False))
SETTINGS = Settings(vip_cidr=TEST_VIP_CIDRS, drain_timeout=DRAIN_TIMEOUT, owner_grace=OWNER_GRACE)


# -- the fakes ---------------------------------------------------------------------------------
class Crash(BaseException):
    """A FAKE: the process dies in the middle of a batch (kill -9, the OOM
    killer). A BaseException, so no handler in the pass catches it."""


class NoMemory(Retryable):
    """A FAKE: the kernel was out of memory (ENOMEM) for a moment."""


FAULT_KINDS = ("busy", "no memory", "exists", "gone", "permanent")


@dataclass
class Fault:
    """Writes of ``verb`` (ADD, EDIT, REMOVE) to ``target`` ("service" or
    "server") of ``key`` fail with ``kind``; None: any."""

    tag: int
    verb: str | None
    target: str | None
    key: ServiceKey | None
    kind: str
    left: int | None  # writes it still fails; None: until the faults stop

    def matches(self, w: Write) -> bool:
        target = "service" if w.server is None else "server"
        return (
            self.verb in (None, w.verb)
            and self.target in (None, target)
            and self.key in (None, w.service.key)
        )

    def error(self, w: Write) -> DockerlbError:
        # Names the fault and the write: a line is the same only for the same cause.
        on = f"{w.verb} {w.service.key}" + (f" -> {w.server}" if w.server is not None else "")
        said = f"said the fake (fault #{self.tag} on {on})"
        return {
            "busy": IpvsBusy(f"IPVS busy (EAGAIN), {said}"),
            "no memory": NoMemory(f"IPVS out of memory (ENOMEM), {said}"),
            "exists": IpvsExists(f"IPVS: already exists (EEXIST), {said}"),
            "gone": IpvsNotFound(f"IPVS: not found (ENOENT), {said}"),
            "permanent": IpvsRejected(f"IPVS rejected the request (EINVAL), {said}"),
        }[self.kind]


class FaultyIpvs(MemoryIpvs):
    """A FAKE IPVS: ``MemoryIpvs`` whose writes consult a fault plan.

    A faulted write is not applied, except where the error says what the
    kernel now holds: "exists" (only for additions) makes the thing first,
    with other settings, as a writer racing dockerlb would; "gone" on a
    removal removes it first. ``crash_after``: the next batch applies that
    many writes, then the process dies (``Crash``)."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: list[Fault] = []
        self.crash_after: int | None = None

    def write_all(self, writes):
        if self.crash_after is not None:
            done, self.crash_after = self.crash_after, None
            super().write_all(writes[:done])
            raise Crash(f"the process died after {done} of {len(writes)} writes, said the fake")
        return super().write_all(writes)

    def write(self, w: Write) -> None:
        fault = next((f for f in self.faults if f.matches(w)), None)
        if fault is None:
            super().write(w)
            return
        if fault.left is not None:
            fault.left -= 1
            if fault.left == 0:
                self.faults.remove(fault)
        if fault.kind == "exists":
            if w.server is None:
                super().write(Write(ADD, Service(w.service.key, "rr", 7)))
            else:
                super().write(replace(w, server=replace(w.server, weight=w.server.weight + 1)))
        elif fault.kind == "gone" and w.verb == REMOVE:
            super().write(w)
        raise fault.error(w)


# -- the world ---------------------------------------------------------------------------------
def step(rule_function):
    """A rule's body, marked as ended well (teardown checks convergence only
    then). A change in Docker (``soon`` among its arguments) is followed, if
    ``soon``, by an event pass with its triggers as sent: most events reach
    the controller before the next change."""

    @functools.wraps(rule_function)
    def run(self, *args, **kwargs):
        self.ok = False
        rule_function(self, *args, **kwargs)
        if kwargs.get("soon"):
            batch, self.pending = self.pending, []
            self._pass(batch)
        self.ok = True

    return run


@dataclass
class Box:
    """One container of the model's world: one compose project, one VIP:port."""

    id: str
    name: str
    project: str
    key: ServiceKey
    weight: str | None
    address: IPv4Address
    created: str
    running: bool = True
    stopping: bool = False  # Docker began stopping it (the kill came); it still runs
    busy: bool = False  # it has an established connection (a drain waits for it)

    @property
    def valid(self) -> bool:
        return self.weight != "abc"

    @property
    def server_weight(self) -> int:
        return 1 if self.weight is None else int(self.weight)

    @property
    def ident(self) -> tuple[IPv4Address, int]:
        return (self.address, self.key.port)

    def record(self) -> Container:
        labels = {
            "dockerlb.vip": f"{self.key.vip}:{self.key.port}",
            "com.docker.compose.project": self.project,
        }
        if self.weight is not None:
            labels["dockerlb.weight"] = self.weight
        return Container(
            self.id,
            self.name,
            self.created,
            labels,
            {"lab": NetworkAddress(self.address)},
            running=self.running,
        )


@dataclass
class Life:
    """What one controller was told (a new controller knows none of it)."""

    seen: dict[str, bool] = field(default_factory=dict)  # the containers it knows exist: running?
    stops: dict[str, float] = field(default_factory=dict)  # told to stop, running: id -> since when
    # ... and Docker's start stamp of each when its stop was told (a new one since: it restarted)
    marks: dict[str, str] = field(default_factory=dict)
    claimed: set[tuple[ServiceKey, str]] = field(default_factory=set)  # (key, group) it knew a claimant of
    went: dict[tuple[ServiceKey, str], float] = field(default_factory=dict)  # ... when the last one went
    said: dict[str, int] = field(default_factory=dict)  # ERROR line -> the pass that said it last


# An entry of the kernel's table as compared: scheduler, persistence, and each
# real server's (address, port) -> (weight, forwarding).
Entry = tuple[str, int, frozenset[tuple[tuple[IPv4Address, int], tuple[int, str]]]]


def entry(service: Service, servers: dict) -> Entry:
    return (service.scheduler, service.persistence, frozenset(servers.items()))


class DockerlbWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.docker, self.ipvs, self.director = MemoryDocker(), FaultyIpvs(), MemoryDirector()
        self.boxes: dict[str, Box] = {}  # the containers that exist, by id
        self.ever: dict[str, Box] = {}  # every container there ever was, by id
        self.group_at: dict[IPv4Address, str] = {}  # an address -> the project of whoever had it
        self.pending: list[Trigger] = []  # Docker's triggers not delivered yet
        self.delivered: list[Trigger] = []  # every trigger delivered (a replay repeats the last ones)
        self.foreign: dict[ServiceKey, Entry] = {}  # the foreign writer's services, as it left them
        self.owner: dict[ServiceKey, str] = {}  # each key's group, as the kernel's real servers show it
        self.made = 0  # containers made: names, addresses and creation times
        self.tags = 0  # faults injected
        self.passes = 0
        # (the last pass before it, the VIP it touched or None for everything): see ``_said``.
        self.changes: list[tuple[int, str | None]] = []
        self.ok = True  # the last step ended without an error (teardown checks convergence then)
        HEARD.clear()
        self.life = Life()

    @initialize(
        boxes=st.lists(
            st.tuples(st.sampled_from(PROJECTS), KEY, st.sampled_from(WEIGHTS), st.booleans()), max_size=4
        )
    )
    @step
    def dockerlb_starts(self, boxes):
        """Some containers run already when the first controller starts."""
        for project, key, weight, busy in boxes:
            self._run(self._new(project, key, weight, busy))
        self.ctl = Controller(SETTINGS, self.docker, self.ipvs, self.director, clock=self.clock)
        self._pass(None)
        self.ctl.ready.set()

    # -- containers: what happens in Docker, and the triggers it sends ---------------------------
    def _new(self, project: str, key: ServiceKey, weight: str | None, busy: bool) -> Box:
        self.made += 1
        n = self.made
        box = Box(
            f"c{n:04d}",
            f"{project}-web-{n}",
            project,
            key,
            weight,
            IPv4Address(f"10.0.{1 + n // 250}.{1 + n % 250}"),
            f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}Z",
            busy=busy,
        )
        return box

    def _run(self, box: Box) -> None:
        self.boxes[box.id] = self.ever[box.id] = box
        self.group_at[box.address] = box.project
        self.docker.start(box.record())
        self._connections()

    def _connections(self) -> None:
        self.ipvs.busy = {b.address for b in self.boxes.values() if b.busy}

    def _send(self, box: Box, *actions: str) -> None:
        """Docker's events for ``box``, as the triggers DockerSource makes of them."""
        made = {
            "kill": Trigger(box.id, "kill", stopping=True, signal="SIGTERM"),
            "kill -9": Trigger(box.id, "kill", down=True, signal="SIGKILL"),
            "die": Trigger(box.id, "die", down=True),
            "stop": Trigger(box.id, "stop"),
            "start": Trigger(box.id, "start", started=True),
            "restart": Trigger(box.id, "restart", started=True),
            "destroy": Trigger(box.id, "destroy", down=True, gone=True),
        }
        self.pending += [made[a] for a in actions]
        self._changed(str(box.key.vip))

    def _changed(self, vip: str | None) -> None:
        self.changes.append((self.passes, vip))

    def _end_stop(self, box: Box) -> None:
        """Its stop is over in the world (it died, restarted, went); the
        controller knows when a trigger says so, or it sees it not running."""
        box.stopping = False

    def _pick(self, i: int, which) -> Box:
        found = sorted((b for b in self.boxes.values() if which(b)), key=lambda b: b.id)
        return found[i % len(found)]

    def _any(self, which) -> bool:
        return any(which(b) for b in self.boxes.values())

    @precondition(lambda self: len(self.boxes) < MOST)
    @rule(
        soon=SOON,
        project=st.sampled_from(PROJECTS),
        key=KEY,
        weight=st.sampled_from(WEIGHTS),
        busy=st.booleans(),
    )
    @step
    def create(self, project, key, weight, busy, soon):
        box = self._new(project, key, weight, busy)
        self._run(box)
        self._send(box, "start")

    @precondition(lambda self: self._any(lambda b: b.running and not b.stopping))
    @rule(soon=SOON, i=st.integers(0, MOST))
    @step
    def stop_begins(self, i, soon):
        """`docker stop`: the stop signal; the container runs on (it drains) until it dies."""
        box = self._pick(i, lambda b: b.running and not b.stopping)
        box.stopping = True
        self._send(box, "kill")

    @precondition(lambda self: self._any(lambda b: b.running))
    @rule(soon=SOON, i=st.integers(0, MOST))
    @step
    def dies(self, i, soon):
        """Its process exits: a stop ends, or it crashed."""
        box = self._pick(i, lambda b: b.running)
        stopped = box.stopping
        box.running = False
        self._end_stop(box)
        self.docker.die(box.id)
        self._send(box, *(("die", "stop") if stopped else ("die",)))

    @precondition(lambda self: self._any(lambda b: not b.running))
    @rule(soon=SOON, i=st.integers(0, MOST))
    @step
    def starts(self, i, soon):
        box = self._pick(i, lambda b: not b.running)
        box.running = True
        self.docker.start(box.record())
        self._send(box, "start")

    @precondition(lambda self: self._any(lambda b: b.running))
    @rule(soon=SOON, i=st.integers(0, MOST))
    @step
    def restarts(self, i, soon):
        """`docker restart`: stopped (kill, die, stop) and started again."""
        box = self._pick(i, lambda b: b.running)
        self._end_stop(box)
        self._send(box, "kill", "die", "stop", "start", "restart")

    @precondition(lambda self: self._any(lambda b: True))
    @rule(soon=SOON, i=st.integers(0, MOST), same_address=st.booleans())
    @step
    def recreated(self, i, same_address, soon):
        """`docker compose up --force-recreate`: the old one stopped and removed, a
        new one (same name and labels, a new id, maybe a new address) started."""
        old = self._pick(i, lambda b: True)
        if old.running:
            self._send(old, "kill", "die", "stop")
        self._gone(old)
        self._send(old, "destroy")
        new = self._new(old.project, old.key, old.weight, old.busy)
        new.name = old.name
        if same_address:
            new.address = old.address
        self._run(new)
        self._send(new, "start")

    @precondition(lambda self: self._any(lambda b: True))
    @rule(soon=SOON, i=st.integers(0, MOST))
    @step
    def removed(self, i, soon):
        """`docker rm -f`: killed and removed, nothing in its place."""
        box = self._pick(i, lambda b: True)
        if box.running:
            self._send(box, "kill -9", "die")
        self._gone(box)
        self._send(box, "destroy")

    @precondition(lambda self: self._any(lambda b: True))
    @rule(soon=SOON, project=st.sampled_from(PROJECTS))
    @step
    def compose_down(self, project, soon):
        """`docker compose down`: every container of a project stopped and removed."""
        for box in sorted((b for b in self.boxes.values() if b.project == project), key=lambda b: b.id):
            if box.running:
                self._send(box, "kill", "die", "stop")
            self._gone(box)
            self._send(box, "destroy")

    @precondition(lambda self: self._any(lambda b: b.running))
    @rule(soon=SOON, project=st.sampled_from(PROJECTS))
    @step
    def compose_stop(self, project, soon):
        """`docker compose stop`: every container of a project stopped (they stay)."""
        for box in sorted((b for b in self.boxes.values() if b.project == project), key=lambda b: b.id):
            if box.running:
                self._send(box, "kill")
        for box in sorted((b for b in self.boxes.values() if b.project == project), key=lambda b: b.id):
            if box.running:
                box.running = False
                self._end_stop(box)
                self.docker.die(box.id)
                self._send(box, "die", "stop")

    @precondition(lambda self: self._any(lambda b: not b.running))
    @rule(soon=SOON, project=st.sampled_from(PROJECTS))
    @step
    def compose_start(self, project, soon):
        """`docker compose start`: every stopped container of a project started."""
        for box in sorted((b for b in self.boxes.values() if b.project == project), key=lambda b: b.id):
            if not box.running:
                box.running = True
                self.docker.start(box.record())
                self._send(box, "start")

    def _gone(self, box: Box) -> None:
        self._end_stop(box)
        box.running = False
        del self.boxes[box.id]
        self.docker.destroy(box.id)
        self._connections()

    @precondition(lambda self: self._any(lambda b: b.running))
    @rule(i=st.integers(0, MOST))
    @step
    def connections_change(self, i):
        """Its established connection ends, or one comes."""
        box = self._pick(i, lambda b: b.running)
        box.busy = not box.busy
        self._connections()
        self._changed(str(box.key.vip))

    @rule(seconds=st.sampled_from(TICKS), poll=st.booleans())
    @step
    def time_passes(self, seconds, poll):
        """Time passes; then, maybe, the loop's look at draining servers (a pass with no trigger)."""
        self.clock.now += seconds
        self._changed(None)
        if poll:
            self._pass([])

    # -- the foreign writer ------------------------------------------------------------------------
    @rule(key=st.sampled_from(FOREIGN_KEYS), with_server=st.booleans())
    @step
    def foreign_service_added(self, key, with_server):
        """Someone else's service, on a VIP dockerlb does not hold now (one it
        may want later, or one it never uses)."""
        if key.vip in self.director.vips() or key in self.ipvs.read(counters=False).table:
            return
        service = Service(key, "sh")
        MemoryIpvs.write(self.ipvs, Write(ADD, service))  # past the faults: not dockerlb's write
        servers = {}
        if with_server:
            server = RealServer(ip_address("192.0.2.7"), 8080, 5)
            MemoryIpvs.write(self.ipvs, Write(ADD, service, server))
            servers[server.ident] = (server.weight, str(server.forward))
        self.foreign[key] = entry(service, servers)
        self._changed(str(key.vip))

    @precondition(lambda self: bool(self.foreign))
    @rule(i=st.integers(0, len(FOREIGN_KEYS)))
    @step
    def foreign_service_removed(self, i):
        key = sorted(self.foreign, key=ServiceKey.sort_key)[i % len(self.foreign)]
        MemoryIpvs.write(self.ipvs, Write(REMOVE, Service(key)))
        del self.foreign[key]
        self._changed(str(key.vip))

    # -- faults ----------------------------------------------------------------------------------
    @rule(
        verb=st.sampled_from((None, ADD, EDIT, REMOVE)),
        what=st.sampled_from((None, "service", "server")),
        key=st.sampled_from((None, None, *KEYS)),
        kind=st.sampled_from(FAULT_KINDS),
        left=st.sampled_from((1, 2, None, None)),
    )
    @step
    def fault_injected(self, verb, what, key, kind, left):
        """Writes of one kind (or any) to one service (or any) fail: the
        batch's try alone (1), the try alone too (2), or every one until the
        faults stop (None)."""
        if kind == "exists":
            verb = ADD  # what EEXIST answers
        self.tags += 1
        self.ipvs.faults.append(Fault(self.tags, verb, what, key, kind, left))
        self._changed(None if key is None else str(key.vip))

    # -- passes and restarts -------------------------------------------------------------------------
    @rule(data=st.data())
    @step
    def event_pass(self, data):
        """The pending triggers, as Docker delivers them: all in order, some
        lost, some twice, in another order, or after a replay of the last ones
        delivered (a stream reconnecting). With none, a drain poll."""
        batch = list(self.pending)
        how = data.draw(st.sampled_from(("as sent", "as sent", "missed", "twice", "reordered", "replayed")))
        if how == "missed" and batch:
            lost = data.draw(st.sets(st.integers(0, len(batch) - 1), min_size=1))
            batch = [t for i, t in enumerate(batch) if i not in lost]
        elif how == "twice" and batch:
            again = data.draw(st.sets(st.integers(0, len(batch) - 1), min_size=1))
            batch = [u for i, t in enumerate(batch) for u in ([t, t] if i in again else [t])]
        elif how == "reordered":
            batch = list(data.draw(st.permutations(batch)))
        elif how == "replayed" and self.delivered:
            batch = self.delivered[-data.draw(st.integers(1, min(5, len(self.delivered)))) :] + batch
        self.pending = []
        self._pass(batch)

    @rule(with_batch=st.booleans(), later=st.sampled_from((0.0, 3.0, 11.0)))
    @step
    def full_pass(self, with_batch, later):
        """A periodic full pass (some seconds after the last step); or one a
        batch asked for (its stops and starts noted first, as the loop does)."""
        if later:
            self.clock.now += later
            self._changed(None)
        noted: list[Trigger] = []
        if with_batch:
            noted, self.pending = self.pending, []
        self._pass(None, noted)

    @rule(when=st.sampled_from(("between passes", "in the next batch")), after=st.integers(0, 4))
    @step
    def controller_restarts(self, when, after):
        """A new controller: now, or when the process dies in the middle of
        the next batch of writes (after ``after`` of them: ``Crash``)."""
        if when == "between passes":
            self._restart()
        else:
            self.ipvs.crash_after = after

    @rule(later=st.sampled_from((0.0, 1.0, 6.0)))
    @step
    def faults_stop(self, later):
        """The faults stop; the next full pass (some seconds later) converges."""
        self.clock.now += later
        self._converge()

    def teardown(self) -> None:
        if hasattr(self, "ctl") and self.ok:
            self._converge()

    def _restart(self) -> None:
        """A new controller over the same ports (the kernel table is the state)
        and its start-up pass; Docker's undelivered events are lost with the old one."""
        # The owners' record outlives the controller (a table in the kernel):
        # every claim not yet past its grace is known to the new one, and
        # the grace of one with no claimant starts again (the record holds
        # no time). The rest of what the old controller was told is lost.
        now, old = self.clock.now, self.life
        kept = {c for c in old.claimed if c not in old.went or now - old.went[c] < OWNER_GRACE}
        self.life = Life(claimed=kept)
        self.pending = []
        self._changed(None)
        self.ctl = Controller(SETTINGS, self.docker, self.ipvs, self.director, clock=self.clock)
        self._pass(None)
        self.ctl.ready.set()

    def _pass(self, triggers: list[Trigger] | None, noted: list[Trigger] | None = None) -> Outcome | None:
        """One pass (a full one when ``triggers`` is None); then the checks. A
        crash ends the controller: a new one starts."""
        before = self._table()
        self.passes += 1
        HEARD.clear()
        now = self.clock.now
        self._learn(triggers, noted or [], now)
        outcome = None
        try:
            if noted:
                self.ctl.note_lifecycle(noted)
            outcome = self.ctl.reconcile(None if triggers is None else list(triggers))
        except Crash:
            crashed = True
        else:
            crashed = False
        after = self._table()
        self._foreign_untouched(after)
        self._owners_kept(before, after, now)
        self._drains_kept(before, after, now)
        self._said()
        if crashed:
            self._restart()
        return outcome

    def _learn(self, triggers: list[Trigger] | None, noted: list[Trigger], now: float) -> None:
        """What the pass is told (the trigger contract, core/ports.py)."""
        life, batch = self.life, [*(triggers or ()), *noted]
        self.delivered += batch
        for t in batch:
            if t.container_id is not None:  # told during this pass: a change before it
                self.changes.append((self.passes - 1, str(self.ever[t.container_id].key.vip)))
        if triggers is None:
            life.seen = {cid: box.running for cid, box in self.boxes.items()}
        else:
            latest = {t.container_id: t for t in triggers if t.container_id is not None}
            for cid, t in latest.items():
                if t.gone or (not t.down and cid not in self.boxes):
                    life.seen.pop(cid, None)
                elif not t.down:
                    life.seen[cid] = self.boxes[cid].running
                elif cid in life.seen:
                    life.seen[cid] = False
        # A stop is told by a kill with a stop signal, to a container it sees
        # running; in the order the batch tells them, a start ends it. It also
        # ends once the controller reads the container again (a full pass, or a
        # trigger of its own) and Docker's start stamp is not the one it had
        # when the stop was told: it started again, its events lost.
        for t in batch:
            cid = t.container_id or ""
            if t.stopping and life.seen.get(cid):
                if cid not in life.stops:
                    life.stops[cid] = now
                    life.marks[cid] = self._stamp(cid)
            elif t.started:
                life.stops.pop(cid, None)
                life.marks.pop(cid, None)
        read_again = (
            set(life.seen)
            if triggers is None
            else {t.container_id for t in triggers if t.container_id and not (t.down or t.gone)}
        )
        for cid in [c for c in life.stops if c in read_again and life.marks.get(c) != self._stamp(c)]:
            del life.stops[cid], life.marks[cid]
        life.stops = {cid: at for cid, at in life.stops.items() if life.seen.get(cid)}
        life.marks = {cid: m for cid, m in life.marks.items() if cid in life.stops}
        for claim in [(key, group) for key in KEYS for group in PROJECTS]:
            if self._claimants(*claim):
                life.claimed.add(claim)
                life.went.pop(claim, None)
            elif claim in life.claimed:
                life.went.setdefault(claim, now)
        for key, group in list(self.owner.items()):
            went = life.went.get((key, group))
            if went is not None and now - went >= OWNER_GRACE:
                # Its grace is over with no claimant: the key is free (the
                # controller frees it when it next decides it), even if one
                # of its containers comes back later.
                del self.owner[key]

    def _stamp(self, cid: str) -> str:
        """Docker's own start stamp of the container ("" when it is gone)."""
        c = self.docker.inspect(cid)
        return c.started if c is not None else ""

    def _claimants(self, key: ServiceKey, group: str) -> list[str]:
        """The containers of ``group`` claiming ``key`` that the controller knows exist."""
        return sorted(
            self.ever[c].name
            for c in self.life.seen
            if self.ever[c].key == key and self.ever[c].valid and self.ever[c].project == group
        )

    # -- the checks --------------------------------------------------------------------------------
    def _table(self) -> dict[ServiceKey, Entry]:
        table = self.ipvs.read(counters=False).table
        return {
            k: entry(vs.service, {i: (s.weight, str(s.forward)) for i, s in vs.servers.items()})
            for k, vs in table.items()
        }

    def _foreign_untouched(self, after: dict[ServiceKey, Entry]) -> None:
        vips = self.director.vips()
        for key, was in self.foreign.items():
            assert after.get(key) == was, (
                f"the foreign service {key} was changed: {after.get(key)}, not {was}"
            )
            assert key.vip not in vips, (
                f"dockerlb took VIP {key.vip}, which carries the foreign service {key}"
            )
        wedged = sorted(str(k) for k in after.keys() - self.foreign.keys() if k.vip not in vips)
        assert not wedged, f"services left on VIPs dockerlb no longer holds (they look foreign now): {wedged}"

    def _owners_kept(
        self, before: dict[ServiceKey, Entry], after: dict[ServiceKey, Entry], now: float
    ) -> None:
        """A real server of another group appears on a key only when its owner
        has no claimant the controller knows of and its grace has ended."""
        for key in KEYS:
            if key not in after or key in self.foreign:
                continue
            had = {i for i, _ in before[key][2]} if key in before else set()
            for ident, _ in sorted(after[key][2]):
                if ident in had:
                    continue
                group, owner = self.group_at[ident[0]], self.owner.get(key)
                if owner is not None and group != owner:
                    holders = self._claimants(key, owner)
                    assert not holders, (
                        f"{key} went from group {owner!r} to {group!r} (server {ident[0]}) while "
                        f"{owner!r} still claims it: {holders}"
                    )
                    since = self.life.went.get((key, owner))
                    assert since is None or now - since >= OWNER_GRACE, (
                        f"{key} went from group {owner!r} to {group!r} {now - since:.1f} s after its last "
                        f"claimant went, within owner_grace ({OWNER_GRACE} s)"
                    )
                self.owner[key] = group

    def _drains_kept(
        self, before: dict[ServiceKey, Entry], after: dict[ServiceKey, Entry], now: float
    ) -> None:
        """A server whose container was told to stop (it still runs) stays
        until its drain ends: the timeout, or no connection once settled."""
        for cid, began in self.life.stops.items():
            box, age = self.ever[cid], now - began
            busy = box.address in self.ipvs.busy
            if age >= DRAIN_TIMEOUT or (not busy and age >= SETTLE):
                continue
            for key in KEYS:
                was = {i for i, _ in before[key][2]} if key in before else set()
                now_there = {i for i, _ in after[key][2]} if key in after else set()
                assert not (box.ident in was and box.ident not in now_there), (
                    f"{box.name}'s server {box.address} of {key} was removed {age:.1f} s into its drain "
                    f"({'a connection open' if busy else 'settling'}; drain_timeout {DRAIN_TIMEOUT} s)"
                )

    def _said(self) -> None:
        """No ERROR line twice in a pass, nor again in a later pass of the same
        controller while nothing it is about changed: no trigger about its
        VIP's containers, no change to them, its VIP's foreign services or
        faults, no time passing."""
        for line, n in Counter(HEARD).items():
            assert n == 1, f"said {n} times in one pass: {line}"
            last = self.life.said.get(line)
            if last is not None:
                vips = self._vips_of(line)
                moved = [
                    s
                    for s, v in self.changes
                    if last <= s < self.passes and (v is None or not vips or v in vips)
                ]
                assert moved, f"said again (passes {last} and {self.passes}) with nothing changed: {line}"
            self.life.said[line] = self.passes

    def _vips_of(self, line: str) -> set[str]:
        vips = {v for v in (*VIPS, "1.2.3.9") if v in line}
        names = set(re.findall(r"'([a-z0-9-]+)'", line))
        return vips | {str(b.key.vip) for b in self.ever.values() if b.name in names}

    # -- convergence ---------------------------------------------------------------------------------
    def _converge(self) -> None:
        """The faults stop; one full pass makes the table exactly what the
        labels say, nothing failing, nothing wedged."""
        self.ipvs.faults, self.ipvs.crash_after = [], None
        self._changed(None)
        before = self._table()
        now = self.clock.now
        outcome = self._pass(None)
        assert outcome is not None
        assert not outcome.failures, (
            f"still failing once the faults stopped: {[str(f) for f in outcome.failures]}"
        )
        after = self._table()
        ours = {k: e for k, e in after.items() if k not in self.foreign}
        refused = {k.vip for k in self.foreign}
        for key in KEYS:
            if key.vip in refused:
                assert key not in ours, f"{key} served on a VIP with a foreign service"
                continue
            options = {self._expected(key, g, before, now) for g in self._owners_possible(key, now)}
            assert ours.get(key) in options, (
                f"{key}: the kernel has {ours.get(key)}, the labels say one of {options}"
            )
        assert set(ours) <= set(KEYS), (
            f"services no label asks for: {sorted(map(str, set(ours) - set(KEYS)))}"
        )
        assert self.director.vips() == {k.vip for k in ours}, (
            f"VIPs {sorted(map(str, self.director.vips()))} for services {sorted(map(str, ours))}"
        )
        assert self.director.masquerade == frozenset(ours)
        # Converged: another full pass at once changes nothing (but a drain
        # that the first one set to weight 0 and found over).
        vips = self.director.vips()
        again = self._pass(None)
        assert again is not None and not again.failures
        draining = {self.ever[cid].address for cid in self.life.stops}
        assert self._steady(self._table(), draining) == self._steady(after, draining), (
            f"a second full pass changed the table: {[op.describe() for op in again.applied]}"
        )
        assert self.director.vips() == vips

    @staticmethod
    def _steady(table: dict[ServiceKey, Entry], draining: set[IPv4Address]) -> dict[ServiceKey, Entry]:
        return {
            k: (e[0], e[1], frozenset(s for s in e[2] if s[0][0] not in draining)) for k, e in table.items()
        }

    def _owners_possible(self, key: ServiceKey, now: float) -> list[str | None]:
        """The group that must own ``key`` now: the kernel's owner while it
        has a claimant or is in its grace; else any group that claims it, or
        one in its grace (an owner decided but never shown in the kernel)."""
        owner = self.owner.get(key)
        claiming = [g for g in PROJECTS if self._claimants(key, g)]
        resting = [g for g in PROJECTS if now - self.life.went.get((key, g), -OWNER_GRACE) < OWNER_GRACE]
        if owner is not None and (owner in claiming or owner in resting):
            return [owner]
        return [*claiming, *resting] or [None]

    def _expected(
        self, key: ServiceKey, group: str | None, before: dict[ServiceKey, Entry], now: float
    ) -> Entry | None:
        """``key``'s entry when ``group`` owns it, by the label contract: a
        service while one of the group's valid containers runs; each running
        one a real server at its weight, at 0 while it drains, gone once its
        drain ended (the timeout, or no connection once settled and at 0)."""
        running = [
            b
            for b in self.boxes.values()
            if (b.key, b.project, b.valid, b.running) == (key, group, True, True)
        ]
        if not running:
            return None
        was = dict(before[key][2]) if key in before else {}
        servers = {}
        for box in running:
            weight = box.server_weight
            began = self.life.stops.get(box.id)
            if began is not None:
                age = now - began
                drained = not box.busy and age >= SETTLE and was.get(box.ident, (0,))[0] == 0
                if age >= DRAIN_TIMEOUT or drained:
                    continue
                weight = 0
            servers[box.ident] = (weight, "nat")
        return entry(Service(key), servers)


# The ERROR lines of the pass under way (one sink for the whole test: adding one costs 30 ms).
HEARD: list[str] = []


def test_through_any_mix_of_events_faults_and_restarts_dockerlb_keeps_its_promises():
    sink = logger.add(lambda m: HEARD.append(m.record["message"]), level="ERROR", format="{message}")
    try:
        run_state_machine_as_test(
            DockerlbWorld,
            settings=settings(
                max_examples=300,
                stateful_step_count=50,
                deadline=None,
                derandomize=True,
                report_multiple_bugs=False,
                print_blob=True,  # a failure found in a full run is replayed alone with its blob
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        logger.remove(sink)
