"""Controller passes with the real adapters at 10,000 real servers (issue 16),
as root in the IPVS guest (the UML kernel: Python runs natively there):

    bash bench/run-vm.sh bench/passes.py [EVENTS] [FULL_PASSES] [SERVICES] [SERVERS]

The controller as ``dockerlb run`` wires it (``dockerlb.app.cli._open``: the
Docker adapter, the IPVS adapter and the director on a fresh namespace, the
real-server preparer and health checker), talking to the STAND-IN Docker
engine of bench/stand_in_dockerd.py (SERVICES x SERVERS labelled containers,
default 1000 x 10, plus EVENTS spares that are not running). After its
start-up sync (``Controller.start_up``; the kernel table then holds 10,000
real servers, checked):

- FULL_PASSES (default 20) no-op periodic resyncs, ``reconcile(None)``: the
  listing of 10,000 containers over HTTP, Docker's networks, the director's
  addresses, the whole IPVS table read (1 + SERVICES dumps), the plan;
  nothing to write (checked). Also timed alone, as many times: the listing
  (``DockerSource.list_containers``), the IPVS read and the director's
  address reads (its VIPs, its own addresses), the reads a resync cannot
  skip; and how many dumped real servers the IPVS adapter read through
  its learned layout and how many the generic way;
- EVENTS (default 100) starts: a spare starts in the stand-in (untimed),
  then ``reconcile([Trigger(id, "start")])``: inspect over HTTP, the scope's
  desired entries, the plan, one AddServer written and acknowledged by the
  kernel; timed from the trigger's creation to the return, i.e. event ->
  netlink ack, without Docker's own event delivery;
- EVENTS deaths: the spare exits (untimed), then ``reconcile([Trigger(id,
  "die", down=True)])`` as a "die" event gives it: one RemoveServer.

Every pass is checked to do exactly that (nothing, one AddServer, one
RemoveServer; none failed). Reported: p50/p99/min/max wall ms
(nearest-rank) of each, the process's VmRSS/VmHWM after the start-up sync
and at the end (the controller's state and the benchmark's lists; the
stand-in is a process of its own), and its CPU. With DOCKERLB_BENCH_PROFILE=1,
then (untimed) a profile of two full passes and of PROFILED starts and
deaths. Writes passes-<time>.json.
These are measurements, not tests: nothing here fails on a slow figure.
"""

from __future__ import annotations

import cProfile
import os
import socket
import sys
import tempfile
import time

from loguru import logger

from bench.cold_sync import StandIn, memory_kib, netns
from bench.event_pass import percentile, profile_text
from bench.results_file import save
from bench.stand_in_dockerd import VIP_FIRST, container_id
from dockerlb.adapters.docker_source import DockerSource
from dockerlb.app.cli import _open
from dockerlb.core.plan import AddServer, RemoveServer
from dockerlb.core.ports import Trigger
from dockerlb.settings import Settings


def figures(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def post(path: str, target: str) -> None:
    """The stand-in's own control request (not Docker's API)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(f"POST {target} HTTP/1.1\r\nHost: stand-in\r\nContent-Length: 0\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 200"), target


# An event: how the stand-in changes, and the one operation it must cause.
EVENTS = {"start": ("/_stand_in/start/", AddServer), "die": ("/_stand_in/stop/", RemoveServer)}


def event(reconcile, path: str, cid: str, kind: str) -> float:
    """Container ``cid`` starts or dies in the stand-in (untimed), then the
    pass for its event: seconds from the trigger to the pass's return
    (checked: exactly its one operation, not failed)."""
    where, op = EVENTS[kind]
    post(path, where + cid)
    trigger = Trigger(cid, kind, time.time_ns(), started=kind == "start", down=kind == "die")
    outcome = reconcile([trigger])
    took = (time.time_ns() - trigger.time_nano) / 1e9
    assert [type(o) for o in outcome.ops] == [op] and not outcome.failed, outcome
    return took


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


PROFILED = 10  # starts and deaths profiled, after the timed runs


def profiled(ctl, path: str, spares: list[str]) -> dict:
    """Where the time goes (untimed: cProfile's clock reads are system calls
    in the guest): two no-op full passes, then starts and deaths of ``spares``."""
    full = cProfile.Profile()
    for _ in range(2):
        full.runcall(ctl.reconcile, None)
    events = cProfile.Profile()
    for kind in ("start", "die"):
        for cid in spares:
            event(lambda triggers: events.runcall(ctl.reconcile, triggers), path, cid, kind)
    return {"profile_full_passes": profile_text(full), "profile_event_passes": profile_text(events)}


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    full_passes = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    services = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    servers = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    n = services * servers
    logger.remove()  # a line per operation at start-up: not what is measured
    path = os.path.join(tempfile.mkdtemp(prefix="dlb-passes-"), "docker.sock")
    stand_in = StandIn(path, services, servers, spares=events)
    os.environ["DOCKER_HOST"] = f"unix://{path}"
    ns = netns("dlbpasses")
    vip_range = f"{VIP_FIRST}/16"  # as bench/cold_sync.py
    settings = Settings(netns=ns, vip_cidr=(vip_range,))
    docker = DockerSource(settings)
    opened = _open(settings, docker)
    ctl = opened.ctl
    ipvs = ctl._ipvs  # the adapters the controller uses, for the reads timed alone
    director = ctl._director
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        ctl.start_up()
        start_up_s = time.perf_counter() - wall0
        table = ipvs.read(counters=False).table
        assert sum(len(vs.servers) for vs in table.values()) == n, "not every real server is in the table"
        rss_ready = memory_kib(os.getpid())

        full, listing, reading, addressing = [], [], [], []
        for _ in range(full_passes):
            wall = time.perf_counter()
            outcome = ctl.reconcile(None)
            full.append(time.perf_counter() - wall)
            assert not outcome.ops and not outcome.failed, outcome
            listing.append(timed(lambda: docker.list_containers()))
            reading.append(timed(lambda: ipvs.read(counters=False)))
            addressing.append(timed(lambda: (director.vips(), director.addresses())))

        spares = [container_id(n + j) for j in range(events)]
        starts = [event(ctl.reconcile, path, cid, "start") for cid in spares]
        deaths = [event(ctl.reconcile, path, cid, "die") for cid in spares]
        cpu = time.process_time() - cpu0
        rss_end = memory_kib(os.getpid())
        profiles = profiled(ctl, path, spares[:PROFILED]) if os.environ.get("DOCKERLB_BENCH_PROFILE") else {}
    finally:
        opened.close()
        docker.close()
        stand_in.close()

    results = {
        "docker": "STAND-IN Engine API server (bench/stand_in_dockerd.py), not dockerd",
        "adapters": "real (dockerlb.app.cli._open): DockerSource over HTTP, IpvsAdapter, Director",
        "services": services,
        "servers_per_service": servers,
        "servers_present": n,
        "start_up_sync_s": round(start_up_s, 3),
        "noop_full_pass": figures(full),
        "listing_alone": figures(listing),
        "ipvs_read_alone": figures(reading),
        "director_reads_alone": figures(addressing),
        "dest_replies": {"layout": ipvs.servers.fast, "generic": ipvs.servers.generic},
        "event_start": figures(starts),
        "event_death": figures(deaths),
        "event_start_and_death": figures(starts + deaths),
        "rss_after_start_up_kib": rss_ready,
        "rss_at_end_kib": rss_end,
        "cpu_s": round(cpu, 2),
        **profiles,
    }
    save("passes", results)


if __name__ == "__main__":
    main()
