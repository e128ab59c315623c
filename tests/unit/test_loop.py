"""The loop (dockerlb/app/loop.py) with in-memory ports and a clock the test drives.

The clock (``ScriptClock``) moves only when the loop waits with nothing to
do: then the next step of the test's script happens in the world (a
container starts, a server is removed by hand, Docker's stream ends...),
and if that queues nothing, time jumps by as long as the loop would have
slept. The one real wait is for the hand-over from the event watcher's
thread, and it is a condition, not a duration: the loop's queue counts what
is put in it, each step says how many triggers it emitted, and the clock
answers only once all of them are in the queue (``HandOver``). So a slow or
busy machine makes a test slower, never a pass different. No test asserts a
duration.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from ipaddress import ip_address

import pytest
from loguru import logger

from dockerlb.app.controller import Controller
from dockerlb.app.loop import Loop
from dockerlb.core.model import RealServer, Service
from dockerlb.core.plan import REMOVE, Write
from dockerlb.core.ports import Trigger
from dockerlb.errors import DirectorMoved
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, Clock, container

pytestmark = pytest.mark.unit

# A bound on the watcher thread's hand-over, only for a test to fail rather
# than hang: nothing waits it out, the wait ends when the count is reached.
HAND_OVER_BOUND = 10.0
WINDOW = 0.25  # the debounce window: a wait this short is a burst being gathered, not idleness


class HandOver(queue.Queue):
    """``Loop.triggers``, counting the triggers put in it, against
    ``expected``: how many the script has caused so far (each ``World.event``,
    the watcher's full-pass trigger after a reconnect, the loop's stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.expected = 0  # only the test's thread changes it
        self._puts = 0
        self._counted = threading.Condition()

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        with self._counted:
            self._puts += 1
            self._counted.notify_all()

    def handed_over(self) -> None:
        """Return once everything expected is in the queue."""
        with self._counted:
            if not self._counted.wait_for(lambda: self._puts >= self.expected, HAND_OVER_BOUND):
                raise AssertionError(
                    f"{self._puts} triggers handed over, {self.expected} expected, after {HAND_OVER_BOUND} s"
                )


class ScriptClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.script: deque[Callable[[], None]] = deque()
        self.loop: Loop | None = None
        self.waits: list[float] = []  # every wait's timeout

    def wait(self, triggers: queue.Queue[Trigger], timeout: float) -> Trigger:
        self.waits.append(timeout)
        assert isinstance(triggers, HandOver) and self.loop is not None
        triggers.handed_over()  # what earlier steps emitted is all queued
        with suppress(queue.Empty):
            return triggers.get_nowait()
        if timeout > WINDOW:  # idle: the world moves on
            if not self.script:
                triggers.expected += 1  # the loop's own stop trigger
                self.loop.stop()  # the script is over
                triggers.handed_over()
                return triggers.get_nowait()
            self.script.popleft()()
            triggers.handed_over()
            with suppress(queue.Empty):
                return triggers.get_nowait()
        self.now += timeout
        raise queue.Empty


def web(i: int, **labels: str):
    return container(
        f"web{i}", {"dockerlb.vip": "1.2.3.4:80", **labels}, nets={"lab": (f"10.0.0.{10 + i}", None)}
    )


class World:
    """A controller and its loop over in-memory ports, passes recorded."""

    def __init__(self, *containers, moved: Callable[[], bool] | None = None, **settings) -> None:
        self.docker, self.ipvs, self.director = MemoryDocker(containers), MemoryIpvs(), MemoryDirector()
        self.settings = Settings(vip_cidr=TEST_VIP_CIDRS, debounce=WINDOW, resync_interval=60.0, **settings)
        self.clock = ScriptClock()
        self.controller = Controller(
            self.settings, self.docker, self.ipvs, self.director, director_moved=moved, clock=self.clock
        )
        self.loop = Loop(self.controller, self.docker, self.settings, self.clock)
        self.triggers = self.loop.triggers = HandOver()  # before run(): the watcher puts here
        self.clock.loop = self.loop
        self.passes: list[list[str] | None] = []  # each pass's trigger reasons (None: a full pass)
        real = self.controller.reconcile

        def recorded(triggers=None, relist=True):
            self.passes.append(
                None if triggers is None else [f"{t.reason} {t.container_id}" for t in triggers]
            )
            return real(triggers, relist)

        self.controller.reconcile = recorded  # type: ignore[method-assign]

    def run(self, *steps: Callable[[], None]) -> None:
        self.clock.script.extend(steps)
        self.loop.run()

    def event(self, cid: str | None, reason: str, **flags) -> Trigger:
        t = Trigger(cid, reason, self.clock.time_ns(), **flags)
        self.triggers.expected += 1  # the watcher hands it over
        self.docker.emit(t)
        return t

    def stream_ends(self) -> None:
        """Docker's event stream ends (e.g. dockerd restarts)."""
        self.triggers.expected += 1  # the watcher's full-pass trigger once Docker answers again
        self.docker.stop_events()

    def servers(self) -> list[str]:
        table = self.ipvs.read(counters=False).table
        return sorted(f"{s} w{s.weight}" for vs in table.values() for s in vs.servers.values())


@pytest.fixture(autouse=True)
def quiet():
    logger.disable("dockerlb")
    yield
    logger.enable("dockerlb")


def test_events_become_passes_in_the_order_they_happened():
    w = World(web(1))

    def start_web2():
        w.docker.start(web(2))
        w.event("id-web2", "start", started=True)

    def web1_dies():
        w.docker.die("id-web1")
        w.event("id-web1", "die", down=True)

    w.run(start_web2, web1_dies)
    assert w.passes == [None, ["start id-web2"], ["die id-web1"]]
    assert w.ipvs.reads == 1  # only the start-up sync read the table
    assert w.servers() == ["10.0.0.12:80 w1"]


def test_a_start_right_after_its_own_network_connect_is_not_held_for_the_window():
    w = World(web(1), replace(web(2), running=False))  # web2 created: connected before it runs

    def connect():
        w.event("id-web2", "network connect", network=True)

    def start():
        w.docker.start(web(2))
        w.event("id-web2", "start", started=True)

    w.run(connect, start)
    assert w.passes == [None, ["network connect id-web2"], ["start id-web2"]]
    # The clock stood still between the two passes: the start came "at once"
    # after the connect's pass, and still no wait was a debounce window.
    assert not [t for t in w.clock.waits if t <= WINDOW]
    assert w.servers() == ["10.0.0.11:80 w1", "10.0.0.12:80 w1"]


def test_a_burst_of_events_becomes_one_pass_and_the_last_word_wins():
    w = World(web(1))

    def burst():
        w.docker.start(web(2))
        w.event("id-web2", "start", started=True)
        w.docker.start(web(3))
        w.event("id-web3", "start", started=True)
        w.docker.die("id-web2")
        w.event("id-web2", "die", down=True)

    w.run(burst)
    assert w.passes == [None, ["start id-web2", "start id-web3", "die id-web2"]]
    assert w.servers() == ["10.0.0.11:80 w1", "10.0.0.13:80 w1"]


def test_the_periodic_resync_repairs_a_server_removed_by_hand():
    w = World(web(1), web(2))

    def removed_by_hand():
        key = next(iter(w.ipvs.read(counters=False).table))
        w.ipvs.write(Write(REMOVE, Service(key), RealServer(ip_address("10.0.0.12"), 80)))

    w.run(removed_by_hand)
    assert w.passes == [None, None]  # no event: the resync found it
    assert w.clock.now == 1060.0  # one resync interval after the start
    assert w.servers() == ["10.0.0.11:80 w1", "10.0.0.12:80 w1"]


def test_a_periodic_resync_lists_dockers_containers_every_nth_time_and_then_finds_a_missed_event():
    w = World(web(1), web(2), relist_every=2)
    seen: list[tuple[int, list[str]]] = []

    def missed_death():
        w.docker.die("id-web1")  # no event says so

    def look():
        seen.append((w.docker.listings, w.servers()))

    w.run(missed_death, look, look)
    assert w.passes == [None] * 4  # the start-up, then a periodic resync after each step
    assert seen == [
        (1, ["10.0.0.11:80 w1", "10.0.0.12:80 w1"]),  # the first resync read the kernel, not Docker
        (2, ["10.0.0.12:80 w1"]),  # the second listed too, and found the death
    ]


def test_a_drain_ends_by_its_timeout_with_no_event_to_say_so():
    w = World(web(1), web(2), drain_timeout=5.0)
    w.ipvs.busy = {ip_address("10.0.0.12")}  # web2 keeps a connection: only the timeout ends its drain

    def web2_is_told_to_stop():
        w.event("id-web2", "kill", stopping=True, signal="SIGTERM")

    w.run(web2_is_told_to_stop, *[lambda: None] * 8)
    assert w.passes[:2] == [None, ["kill id-web2"]]
    # Then the loop looked again every DRAIN_POLL with no trigger ([]), until it was over.
    assert all(p == [] for p in w.passes[2:]) and len(w.passes) > 3
    assert w.servers() == ["10.0.0.11:80 w1"]


def test_a_stop_that_arrives_with_a_full_pass_trigger_still_drains():
    # `docker service scale` down: a service event (a full pass) and the
    # poll's "shutting down" come in one burst; the listing says "running".
    w = World(web(1), web(2), drain_timeout=5.0)
    w.ipvs.busy = {ip_address("10.0.0.12")}
    seen: list[list[str]] = []

    def web2_is_told_to_stop_as_its_service_changes():
        w.event(None, "service update web")
        w.event("id-web2", "task shutting down", stopping=True)

    def look():
        seen.append(w.servers())

    w.run(web2_is_told_to_stop_as_its_service_changes, look)
    assert w.passes[:2] == [None, None], w.passes
    assert seen == [["10.0.0.11:80 w1", "10.0.0.12:80 w0"]], w.passes


def test_when_dockers_event_stream_ends_a_full_pass_follows_the_reconnect():
    w = World(web(1))

    def docker_restarts():
        w.docker.start(web(2))  # while the stream was down: no event will say so
        w.stream_ends()

    w.run(docker_restarts)
    assert w.passes == [None, None]
    assert w.controller.metrics.reconnects._value.get() == 1
    assert w.servers() == ["10.0.0.11:80 w1", "10.0.0.12:80 w1"]


def test_a_moved_director_ends_the_loop_for_the_cli_to_reopen_it():
    moved = threading.Event()
    w = World(web(1), moved=moved.is_set)
    with pytest.raises(DirectorMoved):
        w.run(moved.set, lambda: None)
    assert w.passes == [None]  # the resync did not run on the old namespace
    assert not any(t.name == "docker-events" for t in threading.enumerate())


def test_stop_ends_the_loop_and_its_watcher_and_leaves_the_table_as_it_is():
    w = World(web(1), web(2))
    w.run()
    assert w.loop.stopping.is_set()
    assert not any(t.name == "docker-events" for t in threading.enumerate())
    assert w.servers() == ["10.0.0.11:80 w1", "10.0.0.12:80 w1"]
    assert w.controller.health() == (False, "stopping")
