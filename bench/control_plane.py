"""Control-plane benchmark (issue 7), run as root in the IPVS guest:

    bash bench/run-vm.sh bench/control_plane.py [SERVICES] [SERVERS]

Side by side in one run, each in a fresh network namespace:
- cold sync of SERVICES x SERVERS (default 1000 x 10) by dockerlb's own path
  (read the kernel, plan, and the controller's Applier: batched writes
  through the IPVS adapter), against `ipvsadm -R` restoring the identical
  table (checked equal with `ipvsadm -Sn`);
- the same sync one message per call through pyroute2's IPVS records (the
  path before dockerlb batched and packed its own messages) on the first 100
  services, as operations/s;
- with the whole table present: a no-op resync (read + plan, nothing to do)
  and a single change (one weight, through the Applier), medians;
- the benchmark process's peak RSS with the table read into memory;
- a profile of the cold sync (top functions by own time).

Writes control_plane-<time>.json (in the guest's output directory, which
bench/run-vm.sh copies to bench/results/) and prints a summary.
These are measurements, not tests: nothing here fails on a slow figure.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from ipaddress import IPv4Address

from loguru import logger
from pyroute2 import IPVS

from bench.results_file import save
from dockerlb.adapters.ipvs import IpvsAdapter
from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.app.applier import Applier
from dockerlb.core.model import KernelState, Proto, RealServer, Service, ServiceKey, VirtualService
from dockerlb.core.plan import AddServer, AddService, EditServer, plan
from dockerlb.settings import Settings
from harness.pyroute2_reference import server_record, service_record

PER_CALL_SERVICES = 100  # the one-message-per-call path is slow: measured on a slice

VIPS = IPv4Address("10.0.0.1")
SERVERS_FROM = IPv4Address("10.128.0.1")


def table(services: int, servers: int) -> dict[ServiceKey, VirtualService]:
    out = {}
    for i in range(services):
        key = ServiceKey(Proto.TCP, VIPS + i, 80)
        rs = [RealServer(SERVERS_FROM + i * servers + k, 8080) for k in range(servers)]
        out[key] = VirtualService.of(Service(key, "wlc"), rs)
    return out


def netns(name: str) -> str:
    """A fresh namespace whose dummy interface makes 10.128.0.0/10 routable
    (IPVS refuses a NAT real server it has no route to)."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for argv in (
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "add", "d0", "type", "dummy"],
        ["ip", "-n", name, "link", "set", "d0", "up"],
        ["ip", "-n", name, "addr", "add", "10.128.0.0/10", "dev", "d0"],
    ):
        subprocess.run(argv, check=True)
    return f"/run/netns/{name}"


def restore_file(t: dict[ServiceKey, VirtualService]) -> str:
    lines = []
    for key, vs in t.items():
        lines.append(f"-A -t {key.vip}:{key.port} -s {vs.service.scheduler}")
        lines += [
            f"-a -t {key.vip}:{key.port} -r {s.addr}:{s.port} -m -w {s.weight}" for s in vs.servers.values()
        ]
    return "\n".join(lines) + "\n"


def ipvsadm(ns: str, *args: str, stdin: str | None = None) -> list[str]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ipvsadm", *args], input=stdin, capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


def applier(ipvs: IpvsAdapter) -> Applier:
    return Applier(ipvs, director=None, metrics=ControllerMetrics())  # type: ignore[arg-type]  # no VIP ops here


def per_call(path: str, ops) -> None:
    """One netlink message per call through pyroute2's IPVS records: how
    dockerlb wrote before it batched and packed its own messages."""
    sock = IPVS(netns=path, flags=0)
    try:
        for op in ops:
            if isinstance(op, AddService):
                sock.service("add", service=service_record(op.service))
            elif isinstance(op, AddServer):
                sock.dest("add", service=service_record(Service(op.key)), dest=server_record(op.server))
    finally:
        sock.close()


def sync(ipvs: IpvsAdapter, want, apply=None) -> tuple[float, int]:
    """dockerlb's pass without the VIP interface: read, plan, apply."""
    start = time.perf_counter()
    snap = ipvs.read()
    ops = plan(want, KernelState(snap.table, frozenset(k.vip for k in want)))
    # The applier returns an Outcome (what took, what failed): its failures, not its truth.
    failed = apply(ops) if apply else applier(ipvs).apply(ops).failed
    assert not failed, f"{failed} operations failed"
    return time.perf_counter() - start, len(ops)


def median_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    services = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    servers = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    logger.remove()
    logger.add(sys.stderr, level="INFO")  # as `dockerlb run` logs by default
    want = table(services, servers)
    rules = restore_file(want)

    ours = netns("bench-dockerlb")
    ipvs = IpvsAdapter(ours, Settings())
    cold, ops = sync(ipvs, want)

    sliced = dict(list(want.items())[:PER_CALL_SERVICES])
    path = netns("bench-percall")
    slow = IpvsAdapter(path, Settings())
    per_call_s, per_call_ops = sync(slow, sliced, apply=lambda ops: per_call(path, ops))
    slow.close()
    subprocess.run(["ip", "netns", "del", "bench-percall"], check=True)
    # Where a cold sync's time goes: the same sync once more, profiled, into
    # a third namespace (the profiler's own overhead makes it slower).
    profiled = IpvsAdapter(netns("bench-profile"), Settings())
    profiler = cProfile.Profile()
    profiler.runcall(sync, profiled, want)
    profiled.close()
    subprocess.run(["ip", "netns", "del", "bench-profile"], check=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)

    netns("bench-ipvsadm")
    start = time.perf_counter()
    subprocess.run(
        ["ip", "netns", "exec", "bench-ipvsadm", "ipvsadm", "-R"], input=rules, text=True, check=True
    )
    restore = time.perf_counter() - start
    same = subprocess.run(
        ["ip", "netns", "exec", "bench-ipvsadm", "ipvsadm", "-Sn"], capture_output=True, text=True
    )
    ours_saved = subprocess.run(
        ["ip", "netns", "exec", "bench-dockerlb", "ipvsadm", "-Sn"], capture_output=True, text=True
    )
    assert sorted(same.stdout.splitlines()) == sorted(ours_saved.stdout.splitlines()), "tables differ"

    vips = frozenset(k.vip for k in want)
    noop = median_of(lambda: plan(want, KernelState(ipvs.read().table, vips)))
    key = next(iter(want))
    server = next(iter(want[key].servers.values()))
    flip = [replace(server, weight=2), server]

    apply = applier(ipvs)

    def one_change():
        s = flip.pop(0)
        flip.append(s)
        assert not apply.apply([EditServer(key, s, server)])

    single = median_of(one_change, 9)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ipvs.close()
    for name in ("bench-dockerlb", "bench-ipvsadm"):
        subprocess.run(["ip", "netns", "del", name], check=True)

    result = {
        "kernel": os.uname().release,
        "services": services,
        "servers_per_service": servers,
        "netlink_operations": ops,
        "cold_sync_dockerlb_s": round(cold, 3),
        "cold_sync_ipvsadm_restore_s": round(restore, 3),
        "ratio_dockerlb_to_ipvsadm": round(cold / restore, 2),
        "cold_sync_operations_per_s": round(ops / cold),
        "ipvsadm_restore_rules_per_s": round(ops / restore),
        "per_call_path_operations_per_s": round(per_call_ops / per_call_s),
        "per_call_path_sample_operations": per_call_ops,
        "noop_resync_s": round(noop, 4),
        "single_change_s": round(single, 5),
        "peak_rss_mb": round(rss_mb, 1),
        "cold_sync_profile_top_by_own_time": text.getvalue().splitlines()[-16:],
    }
    save("control_plane", result)


if __name__ == "__main__":
    main()
