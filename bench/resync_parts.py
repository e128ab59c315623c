"""What each read of a periodic resync costs in the guest (issue 31), as root
in the UML guest:

    bash bench/run-vm.sh bench/resync_parts.py [RUNS] [SERVICES] [SERVERS]

A namespace with SERVICES x SERVERS (default 1000 x 10) real servers
restored by ``ipvsadm -R``, the director's interface holding the SERVICES
VIPs, and the stand-in Docker engine (bench/stand_in_dockerd.py) with the
same containers. Each part timed RUNS times (default 20), median and range:

- ``ipvs_read``: ``IpvsAdapter.read(counters=False)``, as a resync reads
  (from /proc/net/ip_vs: ipvs_text.py); ``ipvs_read_netlink``: the same
  table by netlink (1 + SERVICES dumps);
- ``ipvs_services_dump``: ``IpvsAdapter.services()`` (one dump, no servers);
- ``proc_ip_vs_read``: /proc/net/ip_vs of the namespace read whole (one
  open file, read from its start: the kernel's text of the same table),
  not parsed;
- ``getppid``: one system call, for the guest's cost of one (x1000);
- ``director_vips_and_addresses``: ``Director.vips()`` and ``addresses()``;
- ``nft_masquerade``: ``Director.sync_masquerade(keys, force=True)`` with
  the SERVICES keys (an ``nft`` process and its transaction);
- ``docker_networks`` and ``docker_listing``: ``DockerSource.networks()``
  and ``list_containers()`` from the stand-in.

And a cProfile of 3 netlink reads (call counts: read those; its clock
reads are system calls in UML). Writes resync_parts-<time>.json. A
measurement, not a test.
"""

from __future__ import annotations

import cProfile
import os
import statistics
import sys
import tempfile
import time

from loguru import logger

from bench.cold_sync import StandIn, netns
from bench.control_plane import ipvsadm, restore_file, table
from bench.event_pass import profile_text
from bench.results_file import save
from bench.stand_in_dockerd import VIP_FIRST
from dockerlb.adapters.director import Director
from dockerlb.adapters.docker_source import DockerSource
from dockerlb.adapters.ipvs import IpvsAdapter
from dockerlb.adapters.netns import entered
from dockerlb.settings import Settings


def timed(fn, runs: int, per: int = 1) -> dict:
    ms = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - started) * 1e3 / per)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
        "n": runs,
    }


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    services = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    servers = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    logger.remove()
    ns = netns("dlbparts")
    path = f"/run/netns/{ns}"
    want = table(services, servers)
    ipvsadm(ns, "-R", stdin=restore_file(want))
    settings = Settings(netns=ns, vip_cidr=(f"{VIP_FIRST}/8",))
    ipvs, director = IpvsAdapter(path, settings), Director(path, settings)
    director.prepare()
    for key in want:
        director.add_vip(key.vip)
    sock = os.path.join(tempfile.mkdtemp(prefix="dlb-parts-"), "docker.sock")
    stand_in = StandIn(sock, services, servers, health=True)
    os.environ["DOCKER_HOST"] = f"unix://{sock}"
    docker = DockerSource(settings)
    with entered(path):
        proc = os.open("/proc/thread-self/net/ip_vs", os.O_RDONLY)

    def read_proc() -> bytes:
        chunks, offset = [], 0
        while data := os.pread(proc, 1 << 20, offset):  # a few KB a read: seq_file's buffer
            chunks.append(data)
            offset += len(data)
        text = b"".join(chunks)
        assert text.count(b"\n") >= services * (1 + servers), text[:200]
        return text

    try:
        got = ipvs.read(counters=False).table
        assert sum(len(vs.servers) for vs in got.values()) == services * servers
        results = {
            "services": services,
            "servers_per_service": servers,
            "ipvs_read": timed(lambda: ipvs.read(counters=False), runs),
            "ipvs_read_netlink": timed(lambda: ipvs._call(lambda: ipvs._read(False, None)), runs),
            "ipvs_reads_by": {"text": ipvs.text_reads, "netlink": ipvs.netlink_reads},
            "ipvs_services_dump": timed(ipvs.services, runs),
            "proc_ip_vs_read": timed(read_proc, runs),
            "proc_ip_vs_bytes": len(read_proc()),
            "getppid": timed(lambda: [os.getppid() for _ in range(1000)], runs, per=1000),
            "director_vips_and_addresses": timed(lambda: (director.vips(), director.addresses()), runs),
            "nft_masquerade": timed(lambda: director.sync_masquerade(want.keys(), force=True), runs),
            "docker_networks": timed(docker.networks, runs),
            "docker_listing": timed(docker.list_containers, min(runs, 5)),
        }
        profiler = cProfile.Profile()
        for _ in range(3):
            profiler.runcall(ipvs.read, counters=False)
        results["profile_netlink_reads"] = profile_text(profiler)
    finally:
        os.close(proc)
        docker.close()
        stand_in.close()
        ipvs.close()
        director.close()
    save("resync_parts", results)


if __name__ == "__main__":
    main()
