"""The two biases of bench/cold_sync.py's ratio, measured in the same guest
(issue 31), so the figure can say their size:

1. UML's system calls and page faults cost far more than a native
   kernel's (a system call and a page fault are each a round trip through
   ptrace to the UML kernel's process). ``ipvsadm -R`` makes one netlink
   request per rule; dockerlb batches 500 writes to a send, but its
   interpreter and imports fault in tens of MB. Measured here: what one
   system call (``getppid``) and one minor page fault (a fresh page of an
   anonymous mapping, written) cost in the guest; how many system calls
   each side makes (``strace -f -c``, in a run of its own: strace slows
   what it traces) and how many page faults (the kernel's minflt count,
   from the timed runs' own process). Their product is how much of each
   side's time is the guest's cost of those, which a native kernel makes
   nearly free (``native_syscall_us`` says what one costs on the host,
   when the host measured it: see ``host_costs``).
2. The stand-in engine answers the listing from JSON encoded once; dockerd
   encodes it for every request, on the same one CPU. Measured here:
   dockerd's listing (``GET /containers/json?all=1``) with COUNT and
   2 x COUNT created containers labelled as the stand-in's are, timed as a
   client of it; per container, times 10,000, is what dockerd would have
   spent during a start-up that the stand-in did not.

A measurement, not a test: nothing fails on a large figure.
"""

from __future__ import annotations

import http.client
import json
import mmap
import os
import resource
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

PAGE = mmap.PAGESIZE


def syscall_us(calls: int = 200_000) -> float:
    """What one system call costs here (getppid: the kernel's least work)."""
    started = time.perf_counter()
    for _ in range(calls):
        os.getppid()
    return (time.perf_counter() - started) / calls * 1e6


def page_fault_us(megabytes: int = 128) -> float:
    """What one minor page fault costs here: fresh pages of an anonymous
    mapping, each written once (the faults counted, not assumed)."""
    area = mmap.mmap(-1, megabytes << 20)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        for offset in range(0, megabytes << 20, PAGE):
            area[offset] = 1
        took = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        area.close()
    return took / max(faults, 1) * 1e6


def host_costs() -> dict:
    """The same two costs on this machine's own kernel (run natively)."""
    return {"syscall_us": round(syscall_us(), 3), "page_fault_us": round(page_fault_us(), 3)}


def strace_calls(summary: str) -> int:
    """The total of calls in ``strace -c`` output."""
    for line in summary.splitlines():
        if line.rstrip().endswith("total"):
            fields = line.split()
            return int(fields[3] if len(fields) >= 6 else fields[2])
    raise ValueError(f"no total in strace's summary: {summary[-400:]!r}")


def traced(argv: list[str], stdin: str | None = None, env: dict | None = None) -> int:
    """System calls ``argv`` makes, every thread and child (strace -f -c)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(
            ["strace", "-f", "-c", "-o", out.name, "--", *argv],
            input=stdin,
            text=True,
            env=env,
            check=True,
            capture_output=True,
        )
        return strace_calls(Path(out.name).read_text())


def traced_until(argv: list[str], ready: str, env: dict, timeout: float = 1800) -> int:
    """System calls of a process that runs until stopped: from its start to
    the log line ``ready`` (then it is stopped; its stop's calls are few)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        proc = subprocess.Popen(
            ["strace", "-f", "-c", "-o", out.name, "--", *argv],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        for line in proc.stderr:
            if ready in line or time.monotonic() > deadline:
                break
        os.kill(child_of(proc.pid), signal.SIGTERM)
        proc.stderr.close()
        proc.wait(timeout=300)
        return strace_calls(Path(out.name).read_text())


def child_of(pid: int) -> int:
    """The first child of a process, found by the parent field of each
    /proc/PID/stat (the UML kernel has no /proc/PID/task/TID/children:
    CONFIG_PROC_CHILDREN is off)."""
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: (len(p.name), p.name)):
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(int(entry.name))
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            return int(entry.name)
    raise LookupError(f"process {pid} has no child")


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command's name (state first, then the parent)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def minflt(pid: int) -> int:
    """Minor and major page faults of a process so far (/proc/PID/stat)."""
    fields = stat_fields(pid)
    return int(fields[7]) + int(fields[9])


class Engine(http.client.HTTPConnection):
    """dockerd's own API over its unix socket (no SDK: its time is what is timed)."""

    def __init__(self, path: str = "/var/run/docker.sock") -> None:
        super().__init__("docker", timeout=600)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self._path)

    def call(self, method: str, target: str, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.request(method, target, body=data, headers=headers)
        response = self.getresponse()
        return response.status, response.read()


def dockerd_listing(count: int, labels_of, image: str, runs: int = 5) -> dict:
    """dockerd's listing with ``count`` then ``2 * count`` created (not
    started) containers labelled as ``labels_of(i)`` says; the time each
    listing takes as its client sees it, median of ``runs``."""
    engine = Engine()
    made: list[str] = []
    found = {}
    try:
        for total in (count, 2 * count):
            while len(made) < total:
                i = len(made)
                status, body = engine.call(
                    "POST",
                    f"/containers/create?name=dlb-listing-{i}",
                    {"Image": image, "Cmd": ["true"], "Labels": labels_of(i)},
                )
                assert status == 201, body[:300]
                made.append(json.loads(body)["Id"])
            took, size = [], 0
            for _ in range(runs):
                started = time.perf_counter()
                status, body = engine.call("GET", "/containers/json?all=1")
                took.append(time.perf_counter() - started)
                assert status == 200
                size = len(body)
            found[str(total)] = {"median_s": round(statistics.median(took), 4), "bytes": size, "runs": runs}
    finally:
        for cid in made:
            engine.call("DELETE", f"/containers/{cid}?force=1")
        engine.close()
    one, two = found[str(count)]["median_s"], found[str(2 * count)]["median_s"]
    return {
        "containers": found,
        "per_container_ms": round((two - one) / count * 1e3, 4),
        "linear_check": "per container from the difference of the two counts",
    }


def summarize(cold: dict, costs: dict, calls: dict, listing: dict | None, servers: int) -> dict:
    """What each bias cost each side, and the ratio without them (an
    estimate: as if system calls, faults and the engine's own listing cost
    what they cost natively, or nothing)."""
    d, i = cold["dockerlb_run_s"], cold["ipvsadm_restore_s"]
    sys_us, pf_us = costs["guest"]["syscall_us"], costs["guest"]["page_fault_us"]
    host = costs.get("host") or {"syscall_us": 0.0, "page_fault_us": 0.0}
    d_uml = (calls["dockerlb_run_syscalls"] * (sys_us - host["syscall_us"])) / 1e6 + (
        cold["dockerlb_run_faults"] * (pf_us - host["page_fault_us"])
    ) / 1e6
    i_uml = (calls["ipvsadm_syscalls"] * (sys_us - host["syscall_us"])) / 1e6 + (
        cold["ipvsadm_faults"] * (pf_us - host["page_fault_us"])
    ) / 1e6
    engine = listing["per_container_ms"] * servers / 1e3 if listing else 0.0
    return {
        "uml_cost_of_dockerlb_s": round(d_uml, 3),
        "uml_cost_of_ipvsadm_s": round(i_uml, 3),
        "dockerd_listing_at_servers_s": round(engine, 3),
        "ratio_as_measured": round(d / i, 3),
        "ratio_without_uml_costs": round((d - d_uml) / (i - i_uml), 3),
        "ratio_with_dockerd_listing": round((d + engine) / i, 3),
        "ratio_without_both": round((d - d_uml + engine) / (i - i_uml), 3),
    }


def main() -> None:
    """Run natively: this host's costs, for the guest's run to compare with."""
    print(json.dumps(host_costs()))


if __name__ == "__main__":
    main()
