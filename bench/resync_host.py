"""The Python side of a resync at full speed (issue 7), on any host:

    .venv/bin/python -m bench.resync_host [SERVICES] [SERVERS]

The IPVS guest runs under TCG emulation, which slows Python by more than an
order of magnitude, so its no-op resync time says little about a real host.
This host has no IPVS, but most of a resync is Python: parsing the dumped
services and real servers, and planning. So this builds the dump replies a
kernel would send for SERVICES x SERVERS (default 1000 x 10; encoded by
pyroute2, the unit tests' reference) and times, natively:
- a no-op resync's Python: parse every reply (without counters, as a
  reconcile reads) and plan against the desired table (nothing to do);
- a single change's Python: plan the whole table with one weight changed
  and encode that one message (a pass after an event also reads the table:
  add the no-op figure for the whole pass);
- a profile of the no-op (top functions by own time).
The kernel's part (1 + SERVICES dump round trips) is not in these figures;
bench/control_plane.py measures the whole in the guest. Writes
resync_host-<time>.json.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
from dataclasses import replace

from bench.control_plane import median_of, table
from bench.results_file import save
from dockerlb.adapters.ipvs_wire import encode, server_of, service_of
from dockerlb.core.model import KernelState, VirtualService
from dockerlb.core.plan import EDIT, Write, plan
from harness.pyroute2_reference import dumped, server_record, service_record, stats64


def replies(want: dict) -> list[tuple[bytes, list[bytes]]]:
    """(service reply, its servers' replies) as payloads after the netlink header."""
    out = []
    for vs in want.values():
        svc = dumped(
            "IPVS_CMD_ATTR_SERVICE",
            [*service_record(vs.service).dump_nla()["attrs"], stats64("IPVS_SVC_ATTR_")],
        )
        dests = [
            bytes(
                dumped(
                    "IPVS_CMD_ATTR_DEST", [*server_record(s).dump_nla()["attrs"], stats64("IPVS_DEST_ATTR_")]
                )
            )[16:]
            for s in vs.servers.values()
        ]
        out.append((bytes(svc)[16:], dests))
    return out


def main() -> None:
    services = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    servers = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    want = table(services, servers)
    vips = frozenset(k.vip for k in want)
    wire = replies(want)

    def noop() -> None:
        read = {}
        for svc, dests in wire:
            service, _ = service_of(svc, counters=False)
            read[service.key] = VirtualService.of(
                service, [server_of(d, service.key.vip.version, counters=False)[0] for d in dests]
            )
        assert not plan(want, KernelState(read, vips))

    key = next(iter(want))
    server = next(iter(want[key].servers.values()))
    others = [s for s in want[key].servers.values() if s != server]
    changed = {**want, key: VirtualService.of(want[key].service, [replace(server, weight=2), *others])}
    current = KernelState(want, vips)

    def single() -> None:
        (op,) = plan(changed, current)  # the whole table planned, one weight differs
        encode(Write(EDIT, want[key].service, op.server), 0x1C, 1, 0)

    profiler = cProfile.Profile()
    profiler.runcall(noop)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
    result = {
        "machine": f"{os.uname().release}, {os.cpu_count()} cpus, native (no emulation)",
        "services": services,
        "servers_per_service": servers,
        "noop_resync_python_s": round(median_of(noop, 5), 4),
        "single_change_python_s": round(median_of(single, 21), 5),
        "noop_profile_top_by_own_time": text.getvalue().splitlines()[-12:],
    }
    save("resync_host", result)


if __name__ == "__main__":
    main()
