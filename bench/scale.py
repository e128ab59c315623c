"""The control plane at scale, end to end (issue 31), as root in the UML guest:

    bash bench/run-vm.sh bench/scale.py [WHAT] [RUNS] [EVENTS] [SERVICES SERVERS]

10,000 real servers present (1,000 services x 10, or one service of
10,000 for ``big``), each a labelled container of the STAND-IN Docker
engine (bench/stand_in_dockerd.py: the Engine API over a unix socket, its
answers encoded once; starting 10,000 real containers in the guest would
take hours), the real IPVS kernel of the guest. WHAT is a comma-separated
list of (default all of them):

- ``events``: the controller as ``dockerlb run`` wires it
  (``dockerlb.app.cli._open``) driven by the real ``Loop``
  (dockerlb/app/loop.py) in a thread of this process, its events read from
  the engine's event stream by the real Docker adapter. The stand-in is
  told to change one container at a time, and sends dockerd's events for
  it (with their ``timeNano``); per event, the time from the trigger's
  receipt (the adapter yielding it to the loop's queue) to the return of
  the batched IPVS write that carries its operation (the kernel's ack),
  and from Docker's ``timeNano`` to that ack. EVENTS (default 100) of each
  kind, one after the other, each once the loop is idle again:
  ``event_start`` (a spare container of an existing service starts: the
  network's connect, then its start; one AddServer), ``event_die`` (the
  same spares die: die, then the disconnect; one RemoveServer),
  ``event_new_service`` (a container whose VIP no one has starts: a VIP,
  a service, a server; its death after, untimed), ``event_health`` (a
  running container's HEALTHCHECK says unhealthy, then healthy again: its
  weight to 0 and back; both directions are health changes, each is
  reported apart too). The periodic resync runs as configured (every 30
  s): an event that meets one waits for it, as it would in production;
  how many ran is in the file;
- ``big``: the same for ``event_big_service``, with one service of 10,000
  replicas: a spare of it starts (timed) and dies (reported, not the
  figure);
- ``resync``: the same controller and loop with ``--resync-interval 1``
  and no event: ``noop_resync``, each periodic full pass timed as the loop
  calls it (``reconcile_safely``: Docker's listing when the pass relists,
  Docker's networks, the director's addresses, the IPVS read, the plan;
  nothing to write, checked); 30 of them;
- ``rss``: ``rss_peak``: ``dockerlb run`` as a user starts it, as a process
  of its own with ``--resync-interval 1``: its VmHWM (/proc/PID/status)
  once 30 periodic resyncs have ended after its start-up (counted by the
  engine's ``GET /networks``: one per full pass).

RUNS (default 5) runs of each, each a fresh process (and a fresh stand-in
and namespace). One results file per figure, bench/results/FIGURE-<time>.json:
the median over the runs of each run's p50 and p99 (nearest rank), with
their ranges, and every run's figures. With DOCKERLB_BENCH_PROFILE=1, one
more run of each WHAT with its passes after the start-up under cProfile
(untimed: its clock reads are system calls in UML, so read its call counts
and proportions), its text saved as
scale-profile-WHAT-<time>.txt. These are measurements, not tests: nothing
here fails on a slow figure.
"""

from __future__ import annotations

import cProfile
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.cold_sync import ROOT, RunProcess, StandIn, memory_kib, netns
from bench.event_pass import percentile
from bench.results_file import RESULTS, save_figure
from bench.stand_in_dockerd import SERVER_FIRST, VIP_FIRST, container_id

# SERVICES x SERVERS: 1000 x 10 unless the command says (a smoke run); the
# runs, processes of their own, are told through the environment.
SERVICES, SERVERS = (int(x) for x in os.environ.get("DLB_SCALE_SIZE", "1000x10").split("x"))
RESYNCS = 30
GAP = 0.1  # seconds between one event's pass and the next event: a lone event each time
ENGINE = "STAND-IN Engine API server (bench/stand_in_dockerd.py, answers encoded once), not dockerd"
WHATS = ("events", "big", "resync", "rss")
COMMAND = "bash bench/run-vm.sh bench/scale.py"


# -- one run, in a process of its own --------------------------------------------------------
@dataclass
class Ack:
    at: float  # perf_counter when the batched write returned
    wall_ns: int  # time.time_ns() then
    writes: tuple


class Probe:
    """What the benchmark watches: when the loop receives each trigger (the
    Docker adapter's stream, wrapped for the loop only), when each batched
    IPVS write returns, and each pass the loop runs."""

    def __init__(self, ctl, docker) -> None:
        self.ctl, self.docker = ctl, docker
        self.received: dict[tuple[str, str], tuple[float, int]] = {}  # (id, reason) -> (perf, timeNano)
        self.acks: list[Ack] = []
        self.passes: list[tuple[str, float, float]] = []  # (full or partial, started, ended)
        self.busy = 0
        self.changed = threading.Condition()
        ipvs = ctl._doors.ipvs
        write_all, reconcile_safely = ipvs.write_all, ctl.reconcile_safely

        def acked(writes):
            results = write_all(writes)
            at, wall = time.perf_counter(), time.time_ns()
            with self.changed:
                self.acks.append(Ack(at, wall, tuple(writes)))
                self.changed.notify_all()
            return results

        def timed(triggers, *args, **kwargs):
            with self.changed:
                self.busy += 1
            started = time.perf_counter()
            try:
                return reconcile_safely(triggers, *args, **kwargs)
            finally:
                ended = time.perf_counter()
                with self.changed:
                    self.busy -= 1
                    self.passes.append(("full" if triggers is None else "partial", started, ended))
                    self.changed.notify_all()

        ipvs.write_all = acked  # the applier calls it through the same object
        ctl.reconcile_safely = timed  # the loop calls it on the controller

    def loop_source(self):
        """The Docker adapter as the loop sees it: its stream stamped on receipt."""
        probe = self

        class Stamped:
            def __getattr__(self, name):
                return getattr(probe.docker, name)

            def events(self, since, stop) -> Iterator:
                for t in probe.docker.events(since, stop):
                    probe.received[(t.container_id or "", t.reason)] = (time.perf_counter(), t.time_nano)
                    yield t

        return Stamped()

    def wait_ack(self, after: int, match: Callable[[object], bool], timeout: float = 60.0) -> Ack:
        """The first write batch from index ``after`` on with a write ``match`` takes."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for ack in self.acks[after:]:
                    if any(match(w) for w in ack.writes):
                        return ack
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no write for the event")
                self.changed.wait(left)

    def wait_idle(self, loop, quiet: float = 0.05) -> None:
        """No pass running, none queued, and none for ``quiet`` seconds."""
        while True:
            with self.changed:
                last = self.passes[-1][2] if self.passes else 0.0
                idle = self.busy == 0 and loop.triggers.empty()
            if idle and time.perf_counter() - last >= quiet:
                return
            time.sleep(quiet / 5)


def server_write(verb: str, addr, weight: int | None = None) -> Callable[[object], bool]:
    def match(w) -> bool:
        return (
            w.verb == verb
            and w.server is not None
            and w.server.addr == addr
            and (weight is None or w.server.weight == weight)
        )

    return match


def service_write(verb: str, vip) -> Callable[[object], bool]:
    def match(w) -> bool:
        return w.verb == verb and w.server is None and w.service.key.vip == vip

    return match


def post(path: str, target: str) -> None:
    """The stand-in's own control request (not Docker's API)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(f"POST {target} HTTP/1.1\r\nHost: stand-in\r\nContent-Length: 0\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 200"), target


class Running:
    """A stand-in, a namespace and the controller on them, run by the real
    loop in a thread of this process. The controller is made in that thread
    too, as ``dockerlb run`` makes it in the thread that runs the loop:
    pyroute2's sockets answer only in the thread that opened them."""

    def __init__(self, services: int, servers: int, spares: int, new_services: int, resync: float) -> None:
        from dockerlb.adapters.docker_source import DockerSource
        from dockerlb.settings import Settings

        self.path = os.path.join(tempfile.mkdtemp(prefix="dlb-scale-"), "docker.sock")
        self.stand_in = StandIn(self.path, services, servers, spares, new_services, health=True)
        os.environ["DOCKER_HOST"] = f"unix://{self.path}"
        ns = netns("dlbscale")
        self.settings = Settings(netns=ns, vip_cidr=(f"{VIP_FIRST}/16",), resync_interval=resync)
        self.docker = DockerSource(self.settings)
        self._made = threading.Event()
        self._failed: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="loop", daemon=True)
        started = time.perf_counter()
        self.thread.start()
        self._made.wait()
        if self._failed is not None:
            raise RuntimeError("the controller could not be made") from self._failed
        while not self.ctl.ready.wait(0.1):
            assert self.thread.is_alive(), "the loop ended before its start-up sync was done"
        self.start_up_s = time.perf_counter() - started
        self.rss_ready = memory_kib(os.getpid())
        # The watcher subscribes after the start-up: no event before it is there.
        while self.stand_in.calls().get("GET /events", 0) < 1:
            time.sleep(0.05)
        self.probe.wait_idle(self.loop)

    def _serve(self) -> None:
        from dockerlb.app.cli import _open
        from dockerlb.app.loop import Loop

        try:
            opened = _open(self.settings, self.docker)
            self.ctl = opened.ctl
            self.probe = Probe(self.ctl, self.docker)
            self.loop = Loop(self.ctl, self.probe.loop_source(), self.settings)
        except BaseException as e:
            self._failed = e
            raise
        finally:
            self._made.set()
        try:
            self.loop.run()
        finally:
            opened.close()

    def full_passes(self) -> int:
        return sum(1 for kind, _, _ in self.probe.passes if kind == "full")

    def close(self) -> None:
        self.loop.stop()
        self.thread.join(timeout=60)
        self.docker.close()
        self.stand_in.close()


def one_event(run: Running, target: str, match: Callable[[object], bool], cid: str, reason: str) -> dict:
    """Tell the stand-in; wait for the write; the event's figures (ms)."""
    probe = run.probe
    probe.wait_idle(run.loop)
    time.sleep(GAP)
    before = len(probe.acks)
    post(run.path, target)
    ack = probe.wait_ack(before, match)
    received, time_nano = probe.received[(cid, reason)]
    return {
        "received_to_ack_ms": (ack.at - received) * 1e3,
        "docker_to_ack_ms": (ack.wall_ns - time_nano) / 1e6,
    }


def start(run: Running, cid: str, addr) -> dict:
    return one_event(run, f"/_stand_in/start/{cid}", server_write("add", addr), cid, "start")


def die(run: Running, cid: str, addr) -> dict:
    return one_event(run, f"/_stand_in/stop/{cid}", server_write("remove", addr), cid, "die")


def health(run: Running, cid: str, addr, status: str) -> dict:
    weight = 0 if status == "unhealthy" else 1
    return one_event(
        run, f"/_stand_in/health/{cid}/{status}", server_write("edit", addr, weight), cid, "health_status"
    )


def stats(samples: list[dict]) -> dict:
    """p50/p99 (nearest rank) of a kind's events in one run."""
    own = [s["received_to_ack_ms"] for s in samples]
    docker = [s["docker_to_ack_ms"] for s in samples]
    return {
        "n": len(own),
        "p50_ms": round(percentile(own, 50), 3),
        "p99_ms": round(percentile(own, 99), 3),
        "max_ms": round(max(own), 3),
        "docker_p50_ms": round(percentile(docker, 50), 3),
        "docker_p99_ms": round(percentile(docker, 99), 3),
    }


def run_events(events: int) -> dict:
    n = SERVICES * SERVERS
    run = Running(SERVICES, SERVERS, events, events, resync=30.0)
    try:
        spares = [(container_id(n + j), SERVER_FIRST + n + j) for j in range(events)]
        news = [(container_id(n + events + j), SERVER_FIRST + n + events + j) for j in range(events)]
        olds = [(container_id(k * SERVERS), SERVER_FIRST + k * SERVERS) for k in range(events)]
        full_before = run.full_passes()
        found: dict[str, list[dict]] = {}
        found["event_start"] = [start(run, cid, a) for cid, a in spares]
        found["event_die"] = [die(run, cid, a) for cid, a in spares]
        found["event_new_service"] = []
        for j, (cid, a) in enumerate(news):
            found["event_new_service"].append(start(run, cid, a))
            # Its death removes the service (and its VIP): untimed.
            gone = service_write("remove", VIP_FIRST + SERVICES + j)
            one_event(run, f"/_stand_in/stop/{cid}", gone, cid, "die")
        down, up = [], []
        for cid, a in olds:
            down.append(health(run, cid, a, "unhealthy"))
            up.append(health(run, cid, a, "healthy"))
        found["event_health"] = down + up
        run.probe.wait_idle(run.loop)
        out = {kind: stats(samples) for kind, samples in found.items()}
        out["event_health"]["to_unhealthy"] = stats(down)
        out["event_health"]["to_healthy"] = stats(up)
        return {
            **out,
            "start_up_s": round(run.start_up_s, 3),
            "full_passes_during_events": run.full_passes() - full_before,
            "rss_after_start_up_kib": run.rss_ready,
            "rss_at_end_kib": memory_kib(os.getpid()),
        }
    finally:
        run.close()


def run_big(events: int) -> dict:
    n = 1 * SERVICES * SERVERS
    run = Running(1, n, events, 0, resync=30.0)
    try:
        spares = [(container_id(n + j), SERVER_FIRST + n + j) for j in range(events)]
        full_before = run.full_passes()
        starts = [start(run, cid, a) for cid, a in spares]
        deaths = [die(run, cid, a) for cid, a in spares]
        run.probe.wait_idle(run.loop)
        return {
            "event_big_service": {**stats(starts), "deaths": stats(deaths)},
            "start_up_s": round(run.start_up_s, 3),
            "full_passes_during_events": run.full_passes() - full_before,
        }
    finally:
        run.close()


def run_resync(resyncs: int) -> dict:
    run = Running(SERVICES, SERVERS, 0, 0, resync=1.0)
    try:
        listings = [0]
        list_containers = run.docker.list_containers

        def counted(*args, **kw):
            listings[0] += 1
            return list_containers(*args, **kw)

        run.docker.list_containers = counted
        start, writes = len(run.probe.passes), len(run.probe.acks)
        with run.probe.changed:
            while True:
                full = [p for p in run.probe.passes[start:] if p[0] == "full"]
                if len(full) >= resyncs:
                    break
                run.probe.changed.wait(5.0)
        ms = [(ended - began) * 1e3 for _, began, ended in full[:resyncs]]
        ops = run.probe.acks[writes:]  # a no-op resync writes nothing
        return {
            "noop_resync": {
                "n": len(ms),
                "p50_ms": round(percentile(ms, 50), 3),
                "p99_ms": round(percentile(ms, 99), 3),
                "min_ms": round(min(ms), 3),
                "max_ms": round(max(ms), 3),
                "each_ms": [round(m, 1) for m in ms],
                "listings": listings[0],
            },
            "writes_during_resyncs": sum(len(a.writes) for a in ops),
            "start_up_s": round(run.start_up_s, 3),
            "rss_at_end_kib": memory_kib(os.getpid()),
        }
    finally:
        run.close()


def run_rss(resyncs: int) -> dict:
    """``dockerlb run`` as a process of its own: VmHWM after RESYNCS resyncs."""
    path = os.path.join(tempfile.mkdtemp(prefix="dlb-rss-"), "docker.sock")
    stand_in = StandIn(path, SERVICES, SERVERS, health=True)
    ns = netns("dlbscalerss")
    argv = [
        str(Path(sys.executable).parent / "dockerlb"),
        "run",
        "--netns",
        ns,
        "--vip-cidr",
        f"{VIP_FIRST}/16",
        "--resync-interval",
        "1",
    ]
    # PYTHONPATH: this tree's dockerlb, whatever the virtualenv's editable
    # install points at (a worktree may share another's .venv).
    proc = RunProcess(argv, {**os.environ, "DOCKER_HOST": f"unix://{path}", "PYTHONPATH": str(ROOT)})
    try:
        started = proc.start()
        ready = proc.wait_ready()
        at_ready = memory_kib(proc.proc.pid)
        base = stand_in.calls().get("GET /networks", 0)
        while stand_in.calls().get("GET /networks", 0) < base + resyncs:
            assert proc.proc.poll() is None, "\n".join(proc.lines[-20:])
            time.sleep(0.2)
        at_end = memory_kib(proc.proc.pid)
        rc = proc.stop()
        assert rc == 0, "\n".join(proc.lines[-20:])
    finally:
        if proc.proc.poll() is None:
            proc.stop()
        stand_in.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return {
        "rss_peak": {
            "mb": round(at_end["VmHWM"] / 1024, 1),
            "VmHWM_kib": at_end["VmHWM"],
            "VmRSS_kib": at_end["VmRSS"],
            "at_ready_kib": at_ready,
            "resyncs": resyncs,
        },
        "start_up_s": round(ready - started, 3),
        "argv": argv[1:],
    }


RUNS = {"events": run_events, "big": run_big, "resync": run_resync, "rss": run_rss}


def child(what: str, count: int, profile: str | None) -> None:
    """One run of WHAT; its figures as the last line of stdout."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if profile:
        profiler = cProfile.Profile()
        _profile_passes(profiler)
    try:
        out = RUNS[what](count)
    finally:
        if profile:
            profiler.disable()
            from bench.event_pass import profile_text

            text = "\n".join(profile_text(profiler))
            Path(profile).write_text(text + "\n")
    print(json.dumps(out), flush=True)


def _profile_passes(profiler: cProfile.Profile) -> None:
    """Profile the passes that follow the start-up, each while it runs in
    the loop's thread (what the figures time), not the start-up sync: under
    cProfile in UML every call reads the clock by a system call, and a
    profiled start-up with 10,000 servers had not ended after six minutes."""
    from dockerlb.app.controller import Controller

    inner = Controller.reconcile_safely

    def profiled(self, *args, **kwargs):
        if not self.ready.is_set():
            return inner(self, *args, **kwargs)
        profiler.enable()
        try:
            return inner(self, *args, **kwargs)
        finally:
            profiler.disable()

    Controller.reconcile_safely = profiled  # type: ignore[method-assign]


# -- the runs, and the figures -----------------------------------------------------------------
def spawn(what: str, count: int, profile: str | None = None) -> dict:
    argv = [sys.executable, "-m", "bench.scale", "--child", what, str(count)]
    if profile:
        argv.append(profile)
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what}: the run failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def latency_figure(name: str, runs: list[dict], present: int, command: str, extra: dict | None = None):
    each = [r[name] for r in runs]
    p50, p99 = [e["p50_ms"] for e in each], [e["p99_ms"] for e in each]
    d50, d99 = [e["docker_p50_ms"] for e in each], [e["docker_p99_ms"] for e in each]
    save_figure(
        name,
        present,
        len(runs),
        {
            "p50_ms": round(statistics.median(p50), 3),
            "p99_ms": round(statistics.median(p99), 3),
            "p50_range_ms": [min(p50), max(p50)],
            "p99_range_ms": [min(p99), max(p99)],
            "docker_time_nano_to_ack_p50_ms": round(statistics.median(d50), 3),
            "docker_time_nano_to_ack_p99_ms": round(statistics.median(d99), 3),
            "docker_time_nano_to_ack_p50_range_ms": [min(d50), max(d50)],
            "docker_time_nano_to_ack_p99_range_ms": [min(d99), max(d99)],
            "measured": "event received (the Docker adapter yields the trigger from the stream) to the "
            "kernel's ack of the batched IPVS write carrying its operation, through the real Loop; "
            "p50/p99 nearest rank over a run's events, then the median of the runs",
            "docker": ENGINE,
            **(extra or {}),
            "each_run": each,
            "runs_context": [{k: v for k, v in r.items() if not k.startswith("event_")} for r in runs],
        },
        command,
    )


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
        return
    whats = (sys.argv[1] if len(sys.argv) > 1 else ",".join(WHATS)).split(",")
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    events = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    if len(sys.argv) > 5:
        global SERVICES, SERVERS
        SERVICES, SERVERS = int(sys.argv[4]), int(sys.argv[5])
        os.environ["DLB_SCALE_SIZE"] = f"{SERVICES}x{SERVERS}"
    command = shlex.join([*COMMAND.split(), *sys.argv[1:]])
    for what in whats:
        count = RESYNCS if what in ("resync", "rss") else events
        results = []
        for i in range(runs):
            results.append(spawn(what, count))
            print(f"{what} run {i + 1}/{runs}: {json.dumps(results[-1])[:400]}", flush=True)
        if what == "events":
            for name in ("event_start", "event_die", "event_new_service", "event_health"):
                latency_figure(name, results, SERVICES * SERVERS, command)
        elif what == "big":
            latency_figure("event_big_service", results, SERVICES * SERVERS, command, {"services": 1})
        elif what == "resync":
            each = [r["noop_resync"] for r in results]
            p50, p99 = [e["p50_ms"] for e in each], [e["p99_ms"] for e in each]
            save_figure(
                "noop_resync",
                SERVICES * SERVERS,
                runs,
                {
                    "p50_ms": round(statistics.median(p50), 3),
                    "p99_ms": round(statistics.median(p99), 3),
                    "p50_range_ms": [min(p50), max(p50)],
                    "p99_range_ms": [min(p99), max(p99)],
                    "measured": f"{RESYNCS} periodic full passes (--resync-interval 1, no event) as the real "
                    "Loop calls them (reconcile_safely), Docker's side included; p50/p99 nearest rank "
                    "per run, then the median of the runs",
                    "docker": ENGINE,
                    "each_run": results,
                },
                command,
            )
        elif what == "rss":
            mb = [r["rss_peak"]["mb"] for r in results]
            save_figure(
                "rss_peak",
                SERVICES * SERVERS,
                runs,
                {
                    "mb": round(statistics.median(mb), 1),
                    "mb_range": [min(mb), max(mb)],
                    "measured": f"VmHWM of `dockerlb run` (a process of its own, --resync-interval 1) after "
                    f"its start-up and {RESYNCS} periodic resyncs, MiB (KiB / 1024); median of the runs",
                    "docker": ENGINE,
                    "each_run": results,
                },
                command,
            )
    if os.environ.get("DOCKERLB_BENCH_PROFILE"):
        for what in [w for w in whats if w != "rss"]:  # rss is another process
            out = RESULTS / f"scale-profile-{what}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
            spawn(what, RESYNCS if what in ("resync", "rss") else min(events, 20), str(out))
            print(f"profile written to {out}", flush=True)


if __name__ == "__main__":
    main()
