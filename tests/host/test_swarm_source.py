"""Host tier: the Swarm adapter against a real three-node Swarm (tests/swarm_lab.py).

The expected values come from the engines themselves, never from the code
under test: a task's name and address are those of its container on its own
node (Docker names it <service>.<slot>.<task id>), its node's hostname is
what that node's engine says, the running tasks are the manager's /tasks.
Services are changed as operators change them, with the docker CLI."""

from __future__ import annotations

import gc
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import ip_address

import docker.errors
import pytest

from dockerlb.adapters.swarm_source import SwarmSource
from dockerlb.app.controller import Controller
from dockerlb.app.loop import Loop
from dockerlb.core.model import Proto, ServiceKey
from dockerlb.core.ports import Trigger
from dockerlb.errors import ConfigError, DockerlbError, DockerUnavailable
from dockerlb.settings import Settings
from harness.dockerlab import wait_for
from harness.memory_ports import MemoryDirector, MemoryIpvs
from tests.swarm_lab import SwarmLab, swarm_fixture

# docker-py's unix transport leaks its socket when connect() fails (an engine
# that is down: the manager restart below): docker/transport/unixconn.py never
# closes it, and the collector warns whenever it gets to it, once seen after
# the last test of a CI run. The leaks are collected inside this module (see
# collected_here) and this filter covers that message and nothing else.
LEAKED_UNIX_SOCKET = "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
pytestmark = [pytest.mark.host, pytest.mark.filterwarnings(LEAKED_UNIX_SOCKET)]
VIP = {"dockerlb.vip": "192.0.2.10:80", "dockerlb.weight": "2"}
POLL = 0.5  # seconds: short, so a test waits little; the default (1 s) is measured too
# The VIPs these tests label (TEST-NET-1): dockerlb takes public ranges only when told.
TEST_NET = ("192.0.2.0/24",)
# Not the product's bound but this host's: how long one poll's reading (three
# calls to the manager: services, tasks, nodes) may take. A trigger follows
# Swarm's own state at most one poll interval plus two readings later (one
# that read just before the change, then the next one).
READ = 1.0
GRACE = 1_000_000_000  # a task's stop grace period, ns: sleep ignores SIGTERM and waits it out
swarm = swarm_fixture(scope="module")


@pytest.fixture(scope="module", autouse=True)
def collected_here():
    """Set up before the module's other fixtures, so torn down after them (in
    the last test's teardown, under its filters): whatever they leaked is
    collected there, not after the session."""
    yield
    gc.collect()


Row = tuple[str, str, str, str]  # task id, name, overlay address, node hostname


@pytest.fixture(scope="module")
def overlay(swarm):
    return swarm.overlay("lbnet", "10.231.3.0/24")


@pytest.fixture
def source(swarm):
    s = SwarmSource(Settings(swarm=True, swarm_poll=POLL), base_url=swarm.nodes[0].url)
    yield s
    s.close()


def service(swarm: SwarmLab, base: str, overlay, replicas: int = 2, labels=VIP, grace: int = GRACE):
    made = swarm.service(base, overlay, replicas=replicas, labels=labels, stop_grace_period=grace)
    swarm.wait_for_tasks(made, replicas)
    return made


def oracle(swarm: SwarmLab, svc, overlay) -> set[Row] | None:
    """The service's running tasks as the engines say; None while one is mid-change."""
    rows = set()
    try:
        for t in swarm.tasks(svc):
            node = swarm.node_of(t)
            container = swarm.container_of(t)
            address = container.attrs["NetworkSettings"]["Networks"][overlay.name]["IPAddress"]
            name = container.name.rsplit(".", 1)[0]
            rows.add((t["ID"], name, address, node.client.info()["Name"]))  # type: ignore[union-attr]
    except (docker.errors.NotFound, KeyError):
        return None
    return rows


def listed(source: SwarmSource, svc, overlay) -> set[Row]:
    return {
        (c.id, c.name, str(c.networks[overlay.name].ipv4), c.node)
        for c in source.list_containers()
        if c.name.startswith(f"{svc.name}.") and c.running  # stopped tasks are listed too (their claim)
    }


def settle(swarm: SwarmLab, source: SwarmSource, svc, overlay, count: int, timeout: float = 60) -> set[Row]:
    """Once the swarm runs ``count`` tasks of ``svc``: the source's listing,
    which must come to equal the engines' own account."""
    seen: dict[str, object] = {}

    def agree() -> bool:
        try:
            seen["want"], seen["got"] = oracle(swarm, svc, overlay), listed(source, svc, overlay)
        except DockerUnavailable as e:  # a manager electing itself again answers 503 a while
            seen["got"] = e
            return False
        want = seen["want"]
        return want is not None and len(want) == count and want == seen["got"]

    try:
        wait_for(agree, timeout, interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}: engines say {seen.get('want')}, the source {seen.get('got')}") from None
    return seen["got"]  # type: ignore[return-value]


class Watch:
    """``source.events()`` in a thread: each trigger with the monotonic time it came."""

    def __init__(self, source: SwarmSource, stopped: bool = False) -> None:
        self.got: queue.Queue[tuple[float, Trigger]] = queue.Queue()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        if stopped:
            self.stop.set()
        self.thread = threading.Thread(target=self._run, args=(source, time.time()), daemon=True)
        self.thread.start()

    def _run(self, source: SwarmSource, since: float) -> None:
        try:
            for t in source.events(since, self.stop):
                self.got.put((time.monotonic(), t))
        except Exception as e:
            self.error = e

    def first(self, match: Callable[[Trigger], bool], timeout: float) -> tuple[float, Trigger]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                when, t = self.got.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no such trigger within {timeout} s (error: {self.error})") from None
            if match(t):
                return when, t


def test_the_source_lists_exactly_the_running_tasks_of_labelled_services(swarm, overlay, source):
    web = service(swarm, "web", overlay)
    plain = service(swarm, "plain", overlay, replicas=1, labels={"other.vip": "192.0.2.10:80"})
    rows = settle(swarm, source, web, overlay, 2)
    assert {name for _, name, _, _ in rows} == {f"{web.name}.1", f"{web.name}.2"}
    assert {host for *_, host in rows} <= {node.name for node in swarm.nodes}
    (plain_task,) = swarm.tasks(plain)
    by_id = {c.id: c for c in source.list_containers()}
    assert plain_task["ID"] not in by_id
    c = by_id[next(iter(rows))[0]]
    assert dict(c.labels) == VIP
    assert (c.running, c.health, c.pid) == (True, None, 0)


def test_a_tasks_created_time_is_swarms_to_the_second(swarm, overlay, source):
    svc = service(swarm, "when", overlay, replicas=1)
    (t,) = swarm.tasks(svc)
    (c,) = [c for c in source.list_containers() if c.id == t["ID"]]
    assert c.created == t["CreatedAt"][:19] + "Z" and len(c.created) == len("2026-12-04T07:41:27Z")


def test_scaling_two_three_one_is_followed_and_the_tasks_that_stay_keep_their_ids(swarm, overlay, source):
    svc = service(swarm, "scale", overlay)
    two = settle(swarm, source, svc, overlay, 2)
    swarm.cli("service", "scale", "--detach", f"{svc.name}=3")
    three = settle(swarm, source, svc, overlay, 3)
    assert two < three
    swarm.cli("service", "scale", "--detach", f"{svc.name}=1")
    one = settle(swarm, source, svc, overlay, 1)
    assert one < three


def test_a_killed_task_leaves_and_its_replacement_joins_the_same_slot_at_a_new_address(
    swarm, overlay, source
):
    svc = service(swarm, "kill", overlay)
    before = settle(swarm, source, svc, overlay, 2)
    victim = min(before)
    swarm.container_of(swarm.manager.api.inspect_task(victim[0])).kill()
    wait_for(lambda: victim[0] not in {t["ID"] for t in swarm.tasks(svc)}, 30, what="the task to stop")
    after = settle(swarm, source, svc, overlay, 2)
    (new,) = after - before
    assert after - {new} == before - {victim}
    assert new[1] == victim[1] and new[2] != victim[2]


def test_a_drained_nodes_tasks_move_to_the_other_nodes(swarm, overlay, source):
    svc = service(swarm, "drain", overlay)
    before = settle(swarm, source, svc, overlay, 2)
    host = min(before)[3]
    (node,) = [n for n in swarm.nodes if n.name == host]
    swarm.cli("node", "update", "--availability", "drain", node.node_id)
    try:
        wait_for(lambda: all(t["NodeID"] != node.node_id for t in swarm.tasks(svc)), 60, what="tasks to move")
        after = settle(swarm, source, svc, overlay, 2)
    finally:
        swarm.cli("node", "update", "--availability", "active", node.node_id)
    assert host not in {h for *_, h in after}
    assert len(after - before) == len([r for r in before if r[3] == host])


def test_a_service_label_change_shows_in_the_next_listing_on_the_same_tasks(swarm, overlay, source):
    svc = service(swarm, "relabel", overlay)
    rows = settle(swarm, source, svc, overlay, 2)
    swarm.cli("service", "update", "--detach", "--label-add", "dockerlb.weight=5", svc.name)
    weights = {c.id: c.labels.get("dockerlb.weight") for c in source.list_containers()}
    assert {tid: weights.get(tid) for tid, *_ in rows} == {tid: "5" for tid, *_ in rows}


def test_in_swarm_mode_container_netns_is_refused_with_a_reason(source):
    with pytest.raises(ConfigError, match="container:director does not apply in Swarm mode"):
        source.pid_of("director")


@pytest.mark.parametrize(("node", "ok"), [(0, True), (1, False)])
def test_dockerlb_doctor_swarm_passes_a_managers_engine_and_fails_a_workers(swarm, node, ok):
    # The CLI as an operator runs it: the env var to the option to the source it opens.
    env = {**os.environ, "DOCKER_HOST": swarm.nodes[node].url, "DOCKERLB_SWARM": "true"}
    argv = [sys.executable, "-m", "dockerlb.app.cli", "doctor", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    (engine,) = [c for c in json.loads(done.stdout) if c["name"] == "Docker engine"]
    assert engine["ok"] is ok
    assert ("answers as a Swarm manager" if ok else "This node is not a swarm manager") in engine["detail"]


def test_a_service_change_is_a_full_pass_trigger(swarm, overlay, source):
    svc = service(swarm, "event", overlay, replicas=1)
    watch = Watch(source)
    swarm.cli("service", "update", "--detach", "--label-add", "dockerlb.weight=3", svc.name)
    _, t = watch.first(lambda t: t.container_id is None, 10)
    assert t.reason == f"service update {svc.name}"


@pytest.mark.parametrize("poll", [POLL, Settings().swarm_poll])
def test_a_killed_task_is_a_down_trigger_within_a_few_polls(swarm, overlay, poll):
    source = SwarmSource(Settings(swarm=True, swarm_poll=poll), base_url=swarm.nodes[0].url)
    try:
        svc = service(swarm, f"latency{int(poll * 10)}", overlay)
        victim, _ = swarm.tasks(svc)
        watch = Watch(source)
        watch.first(lambda t: t.container_id == victim["ID"] and t.started, 10)  # the first poll: it runs
        killed = time.monotonic()
        swarm.container_of(victim).kill()
        stopped = wait_for(
            lambda: (
                swarm.manager.api.inspect_task(victim["ID"])["Status"]["State"] != "running"
                and time.monotonic()
            ),
            30,
            interval=0.02,
        )
        when, t = watch.first(lambda t: t.container_id == victim["ID"], 3 * poll + 5)
        assert t.down and not t.stopping
        print(
            f"\npoll {poll} s: after the kill, Swarm said stopped in {stopped - killed:.2f} s, "
            f"the trigger came in {when - killed:.2f} s"
        )
        assert when - stopped < poll + 2 * READ
    finally:
        source.close()


def test_a_scaled_down_task_drains_before_it_is_down(swarm, overlay, source):
    grace = 4
    svc = service(swarm, "shrink", overlay, grace=grace * 1_000_000_000)
    watch = Watch(source)
    for t in swarm.tasks(svc):
        watch.first(lambda x, tid=t["ID"]: x.container_id == tid and x.started, 10)
    swarm.cli("service", "scale", "--detach", f"{svc.name}=1")
    began, stopping = watch.first(lambda t: t.stopping, 10)
    tid = stopping.container_id
    # Swarm's own word, while the task drains: it is to go ("remove", for a
    # scale-down in 20.10), and it still runs.
    task = swarm.manager.api.inspect_task(tid)
    assert (task["DesiredState"], task["Status"]["State"]) == ("remove", "running")
    assert source.inspect(tid).running is True  # type: ignore[union-attr]
    ended, down = watch.first(lambda t: t.container_id == tid, grace + 10)
    assert down.down
    print(f"\nthe task drained {ended - began:.2f} s (stop grace period {grace} s, poll {POLL} s)")
    # Swarm's executor takes a task out of its own load balancing, waits a
    # hard-coded 2 s (defaultGossipConvergeDelay, moby's
    # daemon/cluster/executor/container/controller.go), and only then sends
    # the stop signal: sleep ignores SIGTERM, so the grace period follows.
    # So the drain cannot end sooner than that, less the lateness of the
    # stopping trigger (a poll interval and two readings). No upper bound is
    # asserted: on top of the same, it holds Swarm's dispatch of the scale to
    # the worker and the worker's report of the stop, which no one bounds.
    gossip = 2
    assert ended - began > gossip + grace - (POLL + 2 * READ)


def test_a_controller_drains_the_task_swarm_shuts_down_and_drops_it_once_down(swarm, overlay, source):
    # The real controller on the real source; only IPVS and the director are in memory.
    ipvs = MemoryIpvs()
    ctl = Controller(Settings(swarm=True, swarm_poll=POLL, vip_cidr=TEST_NET), source, ipvs, MemoryDirector())
    svc = service(swarm, "ctl", overlay, labels={"dockerlb.vip": "192.0.2.20:80"}, grace=3_000_000_000)
    rows = settle(swarm, source, svc, overlay, 2)
    key = ServiceKey(Proto.TCP, ip_address("192.0.2.20"), 80)

    def weights() -> dict[str, int]:
        vs = ipvs.read().table.get(key)
        return {} if vs is None else {str(s.addr): s.weight for s in vs.servers.values()}

    ctl.reconcile(None)
    assert weights() == {addr: 1 for _, _, addr, _ in rows}
    watch = Watch(source)
    swarm.cli("service", "scale", "--detach", f"{svc.name}=1")
    ids = {tid: addr for tid, _, addr, _ in rows}
    _, stopping = watch.first(lambda t: t.stopping and t.container_id in ids, 10)
    ctl.reconcile([stopping])
    (stays,) = set(ids.values()) - {ids[stopping.container_id]}  # type: ignore[index]
    assert weights() == {ids[stopping.container_id]: 0, stays: 1}  # type: ignore[index]
    _, down = watch.first(lambda t: t.container_id == stopping.container_id, 15)
    ctl.reconcile([down])
    assert weights() == {stays: 1}


def test_the_loop_on_the_swarm_source_drops_a_killed_task_and_adds_its_replacement(swarm, overlay, source):
    ipvs, settings = MemoryIpvs(), Settings(swarm=True, swarm_poll=POLL, vip_cidr=TEST_NET)
    loop = Loop(Controller(settings, source, ipvs, MemoryDirector()), source, settings)
    svc = service(swarm, "loop", overlay, labels={"dockerlb.vip": "192.0.2.30:80"})
    before = settle(swarm, source, svc, overlay, 2)
    key = ServiceKey(Proto.TCP, ip_address("192.0.2.30"), 80)

    def servers() -> set[str] | None:
        try:
            vs = ipvs.read().table.get(key)
        except RuntimeError:  # the loop's thread changed the table while it was read
            return None
        return set() if vs is None else {str(s.addr) for s in vs.servers.values()}

    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: servers() == {addr for _, _, addr, _ in before}, 10, what="the start-up sync")
        victim = min(before)
        killed = time.monotonic()
        swarm.container_of(swarm.manager.api.inspect_task(victim[0])).kill()
        gone = wait_for(lambda: victim[2] not in (servers() or {victim[2]}) and time.monotonic(), 10)
        after = settle(swarm, source, svc, overlay, 2)
        wait_for(lambda: servers() == {addr for _, _, addr, _ in after}, 10, what="the replacement")
    finally:
        loop.stop()
        runner.join(timeout=10)
    assert not runner.is_alive()
    print(f"\nkilled task out of IPVS {gone - killed:.2f} s after the kill (poll {POLL} s)")


def test_a_stop_ends_the_stream_at_once_whether_it_comes_before_or_after_the_subscription(swarm, source):
    # Before: the loop stopped while its watcher was still subscribing.
    early = Watch(source, stopped=True)
    early.thread.join(timeout=5)
    assert not early.thread.is_alive() and early.error is None
    # After: the generator waits on its queue for the next poll.
    watch = Watch(source)
    wait_for(lambda: source._wake is not None, 30, what="the source subscribed to the manager's events")
    stopped = time.monotonic()
    watch.stop.set()
    source.stop_events()
    watch.thread.join(timeout=5)
    assert not watch.thread.is_alive() and watch.error is None
    # At once: no poll interval waited out, at most the reading under way.
    assert time.monotonic() - stopped < READ


# The source is closed and its leaks collected inside the test (see LEAKED_UNIX_SOCKET).
def test_across_a_restart_of_the_only_managers_dockerd_the_source_says_unavailable_then_works(swarm, overlay):
    source = SwarmSource(Settings(swarm=True, swarm_poll=POLL), base_url=swarm.nodes[0].url)
    try:
        took, errors = restart_under(swarm, overlay, source)
    finally:
        source.close()
        gc.collect()
    print(f"\nthe manager's engine was gone {took:.1f} s; the source saw {errors} DockerUnavailable")


def restart_under(swarm: SwarmLab, overlay, source: SwarmSource) -> tuple[float, int]:
    """Restart the manager's dockerd while the source lists and listens; then
    it must list and listen again. Returns the outage and the errors seen."""
    svc = service(swarm, "restart", overlay)
    settle(swarm, source, svc, overlay, 2)
    watch = Watch(source)
    took: list[float] = []
    restart = threading.Thread(target=lambda: took.append(swarm.restart_dockerd(swarm.nodes[0])))
    restart.start()
    errors: list[type] = []  # types alone: no exception (and no leaked socket) kept
    while restart.is_alive():
        try:
            source.list_containers()
        except DockerlbError as e:
            errors.append(type(e))
        time.sleep(0.1)
    restart.join()
    assert took, "the manager's dockerd did not come back"
    assert errors and set(errors) == {DockerUnavailable}
    watch.thread.join(timeout=10)
    assert isinstance(watch.error, DockerUnavailable)  # the stream broke: the loop reconnects
    settle(swarm, source, svc, overlay, 2, timeout=120)
    source.ping()  # what the loop asks before it listens again
    again = Watch(source)
    swarm.cli("service", "update", "--detach", "--label-add", "dockerlb.weight=4", svc.name)
    again.first(lambda t: t.container_id is None, 30)
    source.stop_events()
    again.thread.join(timeout=5)  # its stream's socket closed here, not in the next test
    assert not again.thread.is_alive() and again.error is None
    return took[0], len(errors)
