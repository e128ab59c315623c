"""Event-to-applied benchmark (issue 7), run as root in the IPVS guest:

    bash bench/run-vm.sh bench/events.py [SINGLES] [BURST] [FIRSTS]

A controller (``dockerlb run``, as a user runs it) on a director namespace
outside Docker, wired into a Docker network by a veth. Then:
- SINGLES (default 20) containers started one at a time, each waited for
  in the table, then stopped one at a time (``docker kill``, so "die" is the
  event, not a drain);
- a burst of BURST (default 100) containers started at once, then killed
  at once;
- FIRSTS (default 10) web servers started one at a time, each on a VIP of
  its own, while a client container probes that VIP every 10 ms.
For each event the controller logs how long after the event's own
nanosecond timestamp (Docker's ``timeNano``) the pass that applied it had
its netlink operations acknowledged; this reports p50/p99/max per group.
For the web servers it also reports the time from the start event to the
client's first successful HTTP exchange through the new VIP.
Writes events-<time>.json (see run-vm.sh).
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import docker

from bench.results_file import save
from dockerlb.adapters.netns import entered
from harness.dockerlab import busybox_image, wait_for

VIP = "10.30.0.1"
FIRST_VIP = "10.30.1.{}"  # one VIP per web server: only it can answer there
DIRECTOR = "172.29.3.250"
LINE = re.compile(r"event (\w+) ([0-9a-f]{12}) applied ([\d.]+) ms after it happened")


def director(bridge: str) -> subprocess.Popen:
    proc = subprocess.Popen(["unshare", "-n", "sleep", "86400"])
    own = os.readlink("/proc/self/ns/net")
    wait_for(lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != own, 30, what="a new namespace")
    for argv in (
        ["ip", "link", "add", "bevd", "type", "veth", "peer", "name", "bevb"],
        ["ip", "link", "set", "bevb", "master", bridge, "up"],
        ["ip", "link", "set", "bevd", "netns", str(proc.pid)],
        ["nsenter", "-t", str(proc.pid), "-n", "ip", "addr", "add", f"{DIRECTOR}/22", "dev", "bevd"],
        ["nsenter", "-t", str(proc.pid), "-n", "ip", "link", "set", "bevd", "up"],
    ):
        subprocess.run(argv, check=True)
    return proc


def servers(proc: subprocess.Popen) -> int:
    out = subprocess.run(
        ["nsenter", "-t", str(proc.pid), "-n", "ipvsadm", "-Ln", "-t", f"{VIP}:80"],
        capture_output=True,
        text=True,
    ).stdout
    return out.count("Masq")


def first_answer(client_pid: int, vip: str, done: list[int]) -> threading.Thread:
    """Probe VIP:80 from the client's namespace every 10 ms; on the first
    HTTP answer append the wall-clock time (ns) to ``done``."""

    def probe() -> None:
        with entered(f"/proc/{client_pid}/ns/net"):
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection((vip, 80), timeout=0.5) as s:
                        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                        if s.recv(5) == b"HTTP/":
                            done.append(time.time_ns())
                            return
                except OSError:
                    pass
                time.sleep(0.01)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    return thread


def first_connections(client, image, net, count: int, made: list) -> list[float]:
    """Start event -> first answer through a new VIP, ms, per web server."""
    prober = client.containers.run(image, ["sleep", "86400"], network=net.name, cap_add=["NET_ADMIN"],
                                   detach=True, name="bench-prober")  # fmt: skip
    made.append(prober)
    route = prober.exec_run(["ip", "route", "add", "10.30.0.0/16", "via", DIRECTOR])
    assert route.exit_code == 0, route.output
    pid = prober.attrs["State"]["Pid"] or client.containers.get(prober.id).attrs["State"]["Pid"]
    out = []
    for i in range(count):
        vip = FIRST_VIP.format(i + 1)
        c = client.containers.create(image, ["httpd", "-f", "-p", "80", "-h", "/"], name=f"bench-web-{i}",
                                     labels={"dockerlb.vip": f"{vip}:80"}, network=net.name)  # fmt: skip
        made.append(c)
        answered: list[int] = []
        since = datetime.now()
        probe = first_answer(pid, vip, answered)
        c.start()
        probe.join(timeout=310)
        assert answered, f"no answer through {vip}"
        # The SDK sends whole seconds: an answer within the start's second
        # (as in UML) would put `until` before the event. Look a second on.
        events = client.events(since=since, until=datetime.now() + timedelta(seconds=1), decode=True,
                               filters={"container": c.id, "event": "start"})  # fmt: skip
        started = next(e["timeNano"] for e in events)
        out.append((answered[0] - started) / 1e6)
    return out


def stats(ms: list[float]) -> dict:
    ms = sorted(ms)
    if not ms:
        return {"n": 0}
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(p99, 1),
        "max_ms": ms[-1],
    }


def main() -> None:
    singles = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    burst = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    firsts = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    client = docker.from_env(timeout=600)
    image = busybox_image(client)
    pool = docker.types.IPAMPool(subnet="172.29.0.0/22", iprange="172.29.0.0/23")
    net = client.networks.create("bench-events", ipam=docker.types.IPAMConfig(pool_configs=[pool]))
    d = director(f"br-{net.id[:12]}")
    log_path = Path("/run/bench-events-controller.log")
    with log_path.open("w") as log:
        ctl = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dockerlb.app.cli",
                "run",
                "--netns",
                f"/proc/{d.pid}/ns/net",
                "--log-level",
                "DEBUG",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    made = []
    try:
        wait_for(lambda: "ready: start-up sync done" in log_path.read_text(), 300, interval=0.5, what="ready")
        labels = {"dockerlb.vip": f"{VIP}:80"}

        def make(name: str):
            c = client.containers.create(
                image, ["sleep", "86400"], name=name, labels=labels, network=net.name
            )
            made.append(c)
            return c

        ids: dict[str, set[str]] = {"single": set(), "burst": set()}
        for i in range(singles):
            c = make(f"bench-single-{i}")
            c.start()
            ids["single"].add(c.id[:12])
            wait_for(lambda n=i + 1: servers(d) == n, 120, interval=0.05, what=f"{i + 1} servers")
        for n, c in enumerate(list(made)):
            c.kill()
            wait_for(lambda n=n: servers(d) == singles - n - 1, 120, interval=0.05, what="one server fewer")
        group = [make(f"bench-burst-{i}") for i in range(burst)]
        ids["burst"] = {c.id[:12] for c in group}
        with ThreadPoolExecutor(8) as workers:
            list(workers.map(lambda c: c.start(), group))
        wait_for(lambda: servers(d) == burst, 600, interval=0.5, what=f"{burst} servers")
        with ThreadPoolExecutor(8) as workers:
            list(workers.map(lambda c: c.kill(), group))
        wait_for(lambda: servers(d) == 0, 600, interval=0.5, what="no server")
        first_ms = first_connections(client, image, net, firsts, made)
        time.sleep(1)
    finally:
        ctl.terminate()
        ctl.wait(timeout=60)
        for c in made:
            c.remove(force=True)
        net.remove()
        d.kill()
    seen: dict[str, list[float]] = {}
    for reason, cid, ms in LINE.findall(log_path.read_text()):
        group = "single" if cid in ids["single"] else "burst" if cid in ids["burst"] else None
        if group and reason in ("start", "die"):
            seen.setdefault(f"{group}_{reason}", []).append(float(ms))
    result = {"kernel": os.uname().release, "singles": singles, "burst": burst, "firsts": firsts}
    result |= {k: stats(v) for k, v in sorted(seen.items())}
    result["start_to_first_answer_new_vip"] = stats(first_ms)
    save("events", result)


if __name__ == "__main__":
    main()
