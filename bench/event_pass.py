"""Event-pass benchmark (issue 16: event-scoped control plane), natively on any host:

    taskset -c 1 .venv/bin/python -m bench.event_pass [N_SERVICES] [SERVERS_PER_SERVICE] [RUNS]

What one controller pass costs in the controller's own Python when a table
of N_SERVICES x SERVERS_PER_SERVICE real servers (default 1000 x 10) is
present. It drives the real ``dockerlb.app.controller.Controller`` (refresh,
desired, plan, applier) over the in-memory ports of harness/memory_ports.py:
stand-ins, not the real adapters, so no Docker round trip, netlink dump or
kernel write is in these figures (the kernel tier tests the real ones).
Each container is labelled ``dockerlb.vip=<vip>:80`` (one VIP per service,
in 10.200.0.0/16, the allowed --vip-cidr) and has its own address on one
Docker network (172.16.0.0/12). After an initial full pass creates
everything (checked: the in-memory table holds every real server):
- a no-op full pass, ``reconcile(None)``, FULL_RUNS times;
- an event pass for one container start: a new container appears in the
  Docker port, then ``reconcile([Trigger(id, "start", started=True)])``,
  RUNS (default 100) times;
- an event pass for that container's death, ``Trigger(id, "die",
  down=True)``, RUNS times. (Its "destroy" pass follows, untimed, so every
  start sees the same N servers.)
Each is reported as p50/p99/max wall time (perf_counter) and p50 CPU time
(process_time), in ms, nearest-rank percentiles; then the process's peak
RSS (KiB), and a profile of 20 more event passes (10 starts, 10 deaths):
the top 15 functions by cumulative time. The garbage collector runs as it
does in the controller. Every pass is checked to do exactly what it should
(no operation, one AddServer, one RemoveServer; none failed).
Starts and deaths together give the event pass figure (``p50_ms``,
``p99_ms`` at the top of the file). Writes bench/results/event_pass-<time>.json
(``where``: host; DOCKERLB_BENCH_LABEL, e.g. before/after, is kept as
``label``). These are measurements, not tests: nothing here fails
on a slow figure.
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import math
import os
import platform
import pstats
import resource
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network

from loguru import logger

from bench.results_file import save
from dockerlb.app.controller import Controller, Outcome
from dockerlb.core.model import Container, DockerNetwork, NetworkAddress
from dockerlb.core.plan import AddServer, RemoveServer
from dockerlb.core.ports import Trigger
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs

FULL_RUNS = 10
PROFILED_PAIRS = 10  # start + die: 20 event passes
PROFILE_TOP = 15

VIP_RANGE = "10.200.0.0/16"
FIRST_VIP = IPv4Address("10.200.0.1")
NETWORK = "bench"
SUBNET = IPv4Network("172.16.0.0/12")
GATEWAY = IPv4Address("172.16.0.1")
FIRST_ADDR = IPv4Address("172.16.0.2")
CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def container(serial: int, service: int) -> Container:
    """The ``serial``-th container (its own address), a real server of ``service``."""
    name = f"svc{service:04d}-{serial}"
    created = (CREATED + timedelta(seconds=serial)).strftime("%Y-%m-%dT%H:%M:%S.000000000Z")
    return Container(
        id=hashlib.sha256(name.encode()).hexdigest(),
        name=name,
        created=created,
        labels={
            "dockerlb.vip": f"{FIRST_VIP + service}:80",
            # As compose labels them: one project, so one group owns every VIP.
            "com.docker.compose.project": "bench",
            "com.docker.compose.service": f"svc{service:04d}",
        },
        networks={NETWORK: NetworkAddress(FIRST_ADDR + serial, None, GATEWAY, None)},
        pid=100_000 + serial,
    )


def timed(reconcile: Callable[[list[Trigger] | None], Outcome], triggers: list[Trigger] | None):
    """(wall s, CPU s, outcome) of one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = reconcile(triggers)
    return time.perf_counter() - wall, time.process_time() - cpu, outcome


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(walls: list[float], cpus: list[float], ops: int) -> dict:
    ms = 1e3
    return {
        "n": len(walls),
        "p50_ms": round(percentile(walls, 50) * ms, 3),
        "p99_ms": round(percentile(walls, 99) * ms, 3),
        "max_ms": round(max(walls) * ms, 3),
        "cpu_p50_ms": round(percentile(cpus, 50) * ms, 3),
        "cpu_p99_ms": round(percentile(cpus, 99) * ms, 3),
        "operations_per_pass": ops,
    }


class Lifecycle:
    """New containers started, killed and removed one at a time: each step
    changes the Docker port and gives the triggers its events would."""

    def __init__(self, controller: Controller, docker: MemoryDocker, services: int, first: int) -> None:
        self._controller, self._docker, self._services = controller, docker, services
        self._serial = first

    def start(self) -> tuple[Container, list[Trigger]]:
        c = container(self._serial, self._serial % self._services)
        self._serial += 1
        self._docker.start(c)
        return c, [Trigger(c.id, "start", time.time_ns(), started=True)]

    def die(self, c: Container) -> list[Trigger]:
        self._docker.die(c.id)
        return [Trigger(c.id, "die", time.time_ns(), down=True)]

    def destroy(self, c: Container) -> None:
        self._docker.destroy(c.id)
        done = self._controller.reconcile([Trigger(c.id, "destroy", time.time_ns(), down=True, gone=True)])
        assert not done.ops, done.ops


def check(outcome: Outcome, kind: type | None) -> None:
    """The pass did what it should: nothing (kind None), or one op of that kind."""
    assert outcome.failed == 0, f"{outcome.failed} operations failed"
    if kind is None:
        assert not outcome.ops, outcome.ops
    else:
        assert [type(op) for op in outcome.ops] == [kind], outcome.ops


def profile_text(profiler: cProfile.Profile | str) -> list[str]:
    """The top of a profile (a profiler, or a file it dumped), by cumulative time."""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(PROFILE_TOP)
    lines = text.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    header = [line.strip() for line in lines[:start] if line.strip() and "Ordered by" not in line]
    body = [line for line in lines[start:] if line.strip()]
    for prefix in (os.getcwd() + os.sep, os.path.dirname(os.__file__) + os.sep):
        body = [line.replace(prefix, "") for line in body]
    return header + body


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> None:
    services = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    per_service = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    n = services * per_service
    assert n + runs + 2 * PROFILED_PAIRS < SUBNET.num_addresses - 2, "more containers than addresses"
    assert services < 65_000, "more services than VIPs in " + VIP_RANGE
    load_before = os.getloadavg()
    logger.remove()  # the controller logs a line per operation: not part of what is measured

    docker = MemoryDocker(
        [container(i, i // per_service) for i in range(n)],
        [DockerNetwork(NETWORK, (SUBNET,), (GATEWAY,))],
    )
    ipvs, director = MemoryIpvs(), MemoryDirector()
    controller = Controller(Settings(vip_cidr=(VIP_RANGE,)), docker, ipvs, director)

    initial_wall, initial_cpu, outcome = timed(controller.reconcile, None)
    assert outcome.failed == 0, f"{outcome.failed} operations failed"
    initial_ops = len(outcome.ops)
    # A sanity check, not a test: the table really holds every real server.
    assert ipvs.servers() == n, f"{ipvs.servers()} real servers in the table, not {n}"
    assert len(ipvs.read(counters=False).table) == services
    assert len(director.vips()) == services

    walls, cpus = [], []
    for _ in range(FULL_RUNS):
        wall, cpu, outcome = timed(controller.reconcile, None)
        check(outcome, None)
        walls.append(wall)
        cpus.append(cpu)
    noop = summary(walls, cpus, 0)

    life = Lifecycle(controller, docker, services, n)
    start_walls, start_cpus, die_walls, die_cpus = [], [], [], []
    for _ in range(runs):
        c, started = life.start()
        wall, cpu, outcome = timed(controller.reconcile, started)
        check(outcome, AddServer)
        start_walls.append(wall)
        start_cpus.append(cpu)
        died = life.die(c)
        wall, cpu, outcome = timed(controller.reconcile, died)
        check(outcome, RemoveServer)
        die_walls.append(wall)
        die_cpus.append(cpu)
        life.destroy(c)
    assert ipvs.servers() == n
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    events = summary(start_walls + die_walls, start_cpus + die_cpus, 1)
    profiler = cProfile.Profile()
    for _ in range(PROFILED_PAIRS):
        c, started = life.start()
        check(profiler.runcall(controller.reconcile, started), AddServer)
        check(profiler.runcall(controller.reconcile, life.die(c)), RemoveServer)
        life.destroy(c)

    result = {
        # "before" / "after" when a comparison runs this same script over two commits.
        "label": os.environ.get("DOCKERLB_BENCH_LABEL", ""),
        "machine": f"{cpu_model()}; pinned to CPU(s) {sorted(os.sched_getaffinity(0))}; native",
        "python": platform.python_version(),
        # Others' work shares the machine: its 1-minute load before and after.
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "ports": "in-memory stand-ins (harness/memory_ports.py), not the real adapters",
        "services": services,
        "servers_per_service": per_service,
        "servers_present": n,
        "runs": runs,
        "initial_full_pass": {
            "wall_ms": round(initial_wall * 1e3, 3),
            "cpu_ms": round(initial_cpu * 1e3, 3),
            "operations": initial_ops,  # VIPs, services and real servers
        },
        "noop_full_pass": noop,
        # Every timed event pass, starts and deaths together: issue 16's
        # event -> applied figure with these ports (p50_ms, p99_ms).
        **{k: v for k, v in events.items() if k in ("p50_ms", "p99_ms")},
        "event_pass": events,
        "start_event_pass": summary(start_walls, start_cpus, 1),
        "die_event_pass": summary(die_walls, die_cpus, 1),
        "rss_kib": rss_kib,
        "profile_top": profile_text(profiler),
    }
    save("event_pass", result)


if __name__ == "__main__":
    main()
