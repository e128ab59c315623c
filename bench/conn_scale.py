"""Data-plane scale benchmark (issue 7), run as root in the IPVS guest:

    IPVS_VM_MEMORY=6G bash bench/run-vm.sh bench/conn_scale.py [CONNECTIONS] [CONN_TAB_BITS]

How many simultaneous TCP connections one VIP holds (default target
100,000), on bench/data_plane.py's topology: a client namespace opens
connections to the VIP (NAT, rr over two server namespaces that accept and
hold them) and keeps them open. Reports the count reached, the kernel memory
they took (the ip_vs_conn slab, all slabs, MemAvailable), and dockerlb's
resync time (read the kernel table + plan) with no connection and with all
of them: IPVS dumps services and servers, never connections, so it should
not change.

IPVS keeps connections in a hash table of 2^conn_tab_bits buckets, a
parameter of the ip_vs module (default 12: 4,096). Its Kconfig help asks
for a table "not far less than" the connections it holds; with
CONN_TAB_BITS (default 17) the script reloads ip_vs with that value first,
which it can only do while nothing uses IPVS. `dockerlb doctor` reports the
size. Writes conn_scale-<time>.json (see run-vm.sh).
"""

from __future__ import annotations

import os
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from ipaddress import ip_address

from bench.data_plane import NS, VIP, in_ns, topology
from bench.results_file import save
from dockerlb.adapters.ipvs import IpvsAdapter
from dockerlb.core.model import KernelState, Proto, RealServer, Service, ServiceKey, VirtualService
from dockerlb.core.plan import ADD, Write, plan
from dockerlb.settings import Settings

SOURCES = ("10.77.1.2", "10.77.1.3", "10.77.1.4")  # 64,511 ports each towards one VIP:port
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), per destination
IN_FLIGHT = 1000  # connects waiting for their handshake at once
IPVS_MODULES = ("ip_vs_rr", "ip_vs_wrr", "ip_vs_wlc", "ip_vs_sh", "ip_vs")


def raise_fd_limit() -> None:
    with open("/proc/sys/fs/nr_open") as f:
        most = int(f.read())
    resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))


def hold(port: int) -> None:
    """Server role: accept and keep every connection until killed."""
    raise_fd_limit()
    listener = socket.create_server(("0.0.0.0", port), backlog=4096)
    held = []
    while True:
        conn, _ = listener.accept()
        held.append(conn)


def connect(target: str, count: int) -> None:
    """Client role: open COUNT connections to TARGET, keep them, print the
    tally, then hold them until stdin closes."""
    raise_fd_limit()
    host, port = target.rsplit(":", 1)
    poller = select.epoll()
    pending: dict[int, socket.socket] = {}
    held: list[socket.socket] = []
    failed = opened = 0
    errors: dict[str, int] = {}
    start = time.monotonic()
    while (opened < count or pending) and failed < 1000:
        while opened < count and len(pending) < IN_FLIGHT:
            s = socket.socket()
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((SOURCES[opened % len(SOURCES)], 0))
            s.connect_ex((host, int(port)))
            pending[s.fileno()] = s
            poller.register(s.fileno(), select.EPOLLOUT)
            opened += 1
        for fd, _ in poller.poll(5):
            s = pending.pop(fd)
            poller.unregister(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                failed += 1
                errors[os.strerror(err)] = errors.get(os.strerror(err), 0) + 1
                s.close()
            else:
                held.append(s)
        if opened % 10000 == 0 and not pending:
            print(f"client: {len(held)} open", flush=True)
    elapsed = time.monotonic() - start
    print(f"reached {len(held)} failed {failed} seconds {elapsed:.1f} errors {errors}", flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}


def slab(name: str) -> tuple[int, int]:
    """(objects, bytes each incl. metadata) of one slab cache. SLUB may merge
    a cache with others of its size: its objects are then the merged
    cache's, which the growth over the run still shows."""
    base = f"/sys/kernel/slab/{name}"
    with open(f"{base}/objects") as f:
        objects = int(f.read().split()[0])
    with open(f"{base}/slab_size") as f:
        return objects, int(f.read())


def conn_tab_bits() -> int:
    with open("/sys/module/ip_vs/parameters/conn_tab_bits") as f:
        return int(f.read())


def reload_ipvs(bits: int) -> bool:
    """ip_vs with conn_tab_bits=BITS, if nothing holds the module."""
    if conn_tab_bits() == bits:
        return True
    done = subprocess.run(["modprobe", "-r", *IPVS_MODULES], capture_output=True, text=True)
    if done.returncode:
        print(f"cannot unload ip_vs to resize its table: {done.stderr.strip()}")
        return False
    subprocess.run(["modprobe", "ip_vs", f"conn_tab_bits={bits}"], check=True)
    for m in IPVS_MODULES[:-1]:
        subprocess.run(["modprobe", m], check=True)
    return conn_tab_bits() == bits


def resync_seconds(ipvs: IpvsAdapter, want: dict[ServiceKey, VirtualService]) -> float:
    """Median of 5 of what every periodic resync does to IPVS: read + plan."""
    vips = frozenset(k.vip for k in want)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        ops = plan(want, KernelState(ipvs.read().table, vips))
        times.append(time.perf_counter() - start)
        assert not ops, ops
    return statistics.median(times)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    bits = int(sys.argv[2]) if len(sys.argv) > 2 else 17
    bits_before = conn_tab_bits()
    resized = reload_ipvs(bits)
    topology()
    client_ns, director = NS["client"], NS["director"]
    for extra in SOURCES[1:]:
        subprocess.run(["ip", "-n", client_ns, "addr", "add", f"{extra}/24", "dev", "dp1b"], check=True)
    subprocess.run(in_ns(client_ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"), check=True)
    me = [sys.executable, "-m", "bench.conn_scale"]
    holders = [subprocess.Popen(in_ns(NS[s], *me, "hold", "80")) for s in ("s1", "s2")]
    key = ServiceKey(Proto.TCP, ip_address(VIP), 80)
    servers = [RealServer(ip_address(a), 80) for a in ("10.77.2.2", "10.77.3.2")]
    want = {key: VirtualService.of(Service(key, "rr"), servers)}
    ipvs = IpvsAdapter(f"/run/netns/{director}", Settings())
    ipvs.write(Write(ADD, want[key].service))
    for s in servers:
        ipvs.write(Write(ADD, Service(key), s))
    time.sleep(3)  # the holders listen
    idle_resync = resync_seconds(ipvs, want)
    mem0, conn0 = meminfo(), slab("ip_vs_conn")
    client = subprocess.Popen(
        in_ns(client_ns, *me, "connect", f"{VIP}:80", str(count)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    tally = ""
    for line in client.stdout:
        print(line, end="")
        if line.startswith("reached"):
            tally = line
            break
    time.sleep(2)
    snap = ipvs.read()
    active = sum(st.active for st in snap.stats.values())
    mem1, conn1 = meminfo(), slab("ip_vs_conn")
    busy_resync = resync_seconds(ipvs, want)
    client.stdin.close()
    client.wait(timeout=300)
    for h in holders:
        h.kill()
        h.wait()
    ipvs.close()
    for ns in NS.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    reached, failed, seconds = re.match(r"reached (\d+) failed (\d+) seconds ([\d.]+)", tally).groups()
    save(
        "conn_scale",
        {
            "kernel": os.uname().release,
            "memory_total_mb": mem0["MemTotal"] // 1024,
            "target": count,
            "conn_tab_bits_before": bits_before,
            "conn_tab_bits": conn_tab_bits() if resized else bits_before,
            "connections_reached": int(reached),
            "connections_failed": int(failed),
            "seconds_to_open": float(seconds),
            "ipvs_active_connections": active,
            "ip_vs_conn_objects": conn1[0] - conn0[0],
            "ip_vs_conn_object_bytes": conn1[1],
            "ip_vs_conn_mb": round((conn1[0] - conn0[0]) * conn1[1] / 2**20, 1),
            "slab_growth_mb": round((mem1["Slab"] - mem0["Slab"]) / 1024, 1),
            "mem_available_drop_mb": round((mem0["MemAvailable"] - mem1["MemAvailable"]) / 1024, 1),
            "note": "slab and MemAvailable include both ends' sockets (client and servers run in this guest)",
            "resync_idle_s": round(idle_resync, 4),
            "resync_with_connections_s": round(busy_resync, 4),
        },
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "hold":
        hold(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]))
    else:
        main()
