"""Cold sync as a user runs it (issue 16), as root in the IPVS guest:

    bash bench/run-vm.sh bench/cold_sync.py [RUNS] [SERVICES] [SERVERS] [PROFILE]

SERVICES x SERVERS (default 1000 x 10) real servers, each a labelled
container of a STAND-IN Docker engine (bench/stand_in_dockerd.py: it
answers the Engine API over a unix socket for containers that do not exist;
starting 10,000 real ones in the guest would take hours). Three sides, each
into a fresh network namespace of its own (a veth pair with an address in
the containers' subnet, so IPVS has a route to the servers):

- ``dockerlb run --netns NS`` as a user starts it (``DOCKER_HOST`` pointing
  at the stand-in), timed from just before the process is started to the
  moment its "ready: start-up sync done" line is read: interpreter, imports,
  Docker API negotiation, the listing (with 10,000 labelled containers), the desired
  build, the director's set-up (interface, 1,000 VIPs, sysctls, nft) and
  every IPVS write. Then, from the same process: its peak and current RSS
  (/proc/PID/status VmHWM, VmRSS) and its CPU time; and the stand-in's CPU
  time over the run, which the one-CPU guest took from the controller;
- ``ip netns exec NS ipvsadm -R`` restoring the same table from a rules
  file, timed as a whole process (``ip`` and ``ipvsadm``, parsing and
  writing);
- in process: what control_plane.py times (read the empty table, plan, the
  controller's Applier), in this benchmark's own process, no process start,
  no Docker, no desired build, no VIPs.

First one check round, not timed into the figures: the three tables must be
the same (``ipvsadm -Sn``, sorted); every timed run checks them again. Then
RUNS (default 5) runs; dockerlb and ipvsadm take turns going first, the
in-process side runs between them. Last, if PROFILE is 1, one more
``dockerlb run`` under cProfile, for where its time goes (not timed). Off
by default: in the UML guest cProfile's clock reads are system calls, and
a profiled run with 10,000 servers had not ended after six minutes.

Writes cold_sync-<time>.json with every run's figures and, for each figure,
median, min and max over the runs (see run-vm.sh for where it lands).
These are measurements, not tests: nothing here fails on a slow figure.
"""

from __future__ import annotations

import compileall
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from ipaddress import ip_network
from pathlib import Path

import docker
from loguru import logger

from bench.cold_sync_biases import (
    dockerd_listing,
    minflt,
    page_fault_us,
    summarize,
    syscall_us,
    traced,
    traced_until,
)
from bench.control_plane import restore_file, sync, table
from bench.event_pass import profile_text
from bench.results_file import save, save_figure
from bench.stand_in_dockerd import GATEWAY, SUBNET, VIP_FIRST, _labels
from dockerlb.adapters.ipvs import IpvsAdapter
from dockerlb.settings import Settings
from harness.dockerlab import busybox_image

ROOT = Path(__file__).resolve().parent.parent
# In the containers' subnet (so IPVS has a route to every server), neither
# a server's address nor the Docker network's gateway.
DIRECTOR_ADDR = f"{ip_network(SUBNET)[-3]}/{ip_network(SUBNET).prefixlen}"
assert DIRECTOR_ADDR.split("/")[0] != GATEWAY
READY = "ready: start-up sync done"
INTERFACE_MADE = "created dummy interface"
READY_TIMEOUT = 1800  # seconds: the guest is slow, and a stuck run must still end
SIDES = ("dockerlb_run", "in_process", "ipvsadm_restore")
STAND_IN = "STAND-IN Engine API server (bench/stand_in_dockerd.py, answers encoded once), not dockerd"
LISTED = 250  # dockerd's listing timed with this many created containers, and twice as many


def netns(name: str) -> str:
    """A fresh namespace with a veth pair (both ends inside, both up) holding
    DIRECTOR_ADDR: a route to the servers, and no Docker gateway."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for argv in (
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "link", "add", "dlbv0", "type", "veth", "peer", "name", "dlbv1"],
        ["ip", "-n", name, "addr", "add", DIRECTOR_ADDR, "dev", "dlbv0"],
        ["ip", "-n", name, "link", "set", "dlbv1", "up"],
        ["ip", "-n", name, "link", "set", "dlbv0", "up"],
    ):
        subprocess.run(argv, check=True)
    return name


def saved_table(ns: str) -> list[str]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ipvsadm", "-Sn"], capture_output=True, text=True, check=True
    )
    return sorted(done.stdout.splitlines())


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime + stime (+ the waited-for children's) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            found[name] = int(value.split()[0])
    return found


class StandIn:
    """The stand-in dockerd, in a process of its own (as dockerd is)."""

    def __init__(
        self,
        path: str,
        services: int,
        servers: int,
        spares: int = 0,
        new_services: int = 0,
        health: bool = False,
    ) -> None:
        self.path = path
        argv = [path, str(services), str(servers), str(spares), str(new_services), "1" if health else "0"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.stand_in_dockerd", *argv],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("stand-in dockerd:"), f"the stand-in did not start: {line!r}"

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid, children=False)

    def calls(self) -> dict[str, int]:
        """What it has been asked so far (its own counting endpoint left out)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.path)
            s.sendall(b"GET /_stand_in/calls HTTP/1.1\r\nHost: stand-in\r\n\r\n")
            s.shutdown(socket.SHUT_WR)  # the stand-in answers, then sees the end and closes
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        body = reply.partition(b"\r\n\r\n")[2]
        calls = json.loads(body)
        calls.pop("GET /_stand_in/calls", None)
        return calls

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class RunProcess:
    """One ``dockerlb run`` process, its log read as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.lines: list[str] = []
        self.ready_at: float | None = None
        self.ready = threading.Event()

    def start(self) -> float:
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=self.env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        return started

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if self.ready_at is None and READY in line:
                self.ready_at = time.perf_counter()
                self.ready.set()
            self.lines.append(line.rstrip("\n"))
        self.ready.set()  # it ended: whoever waits must not wait forever

    def wait_ready(self) -> float:
        self.ready.wait(READY_TIMEOUT)
        if self.ready_at is None:
            self.stop()
            tail = "\n".join(self.lines[-30:])
            raise RuntimeError(f"dockerlb run did not get ready (exit {self.proc.returncode}):\n{tail}")
        return self.ready_at

    def logged_at(self, text: str) -> float:
        """Epoch seconds of the first log line holding ``text`` (loguru's
        local time, to the millisecond)."""
        line = next(line for line in self.lines if text in line)
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Bench:
    def __init__(self, services: int, servers: int, socket_path: str) -> None:
        self.want = table(services, servers)
        self.rules = restore_file(self.want)
        self.reference: list[str] | None = None
        self.stand_in = StandIn(socket_path, services, servers)
        # PYTHONPATH: this tree's dockerlb, whatever the virtualenv's
        # editable install points at (a worktree may share another's .venv).
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{socket_path}", "PYTHONPATH": str(ROOT)}
        # As a user runs it: the console script, options as the README has
        # them (--vip-cidr is the allow-list it asks everyone to set).
        vip_range = f"{VIP_FIRST}/16"
        self.argv = [str(Path(sys.executable).parent / "dockerlb"), "run", "--vip-cidr", vip_range]

    def check(self, ns: str, side: str) -> None:
        """Every side must leave the same table as the first one did."""
        got = saved_table(ns)
        if self.reference is None:
            assert len(got) == len(self.want) * (1 + len(next(iter(self.want.values())).servers)), got[:5]
            self.reference = got
        assert got == self.reference, f"{side}: the table differs from the first one's"

    def dockerlb_run(self, ns: str, argv: list[str] | None = None) -> dict:
        ctl = RunProcess(argv or [*self.argv, "--netns", ns], self.env)
        stand_in_cpu, calls = self.stand_in.cpu(), self.stand_in.calls()
        wall_started = time.time()
        started = ctl.start()
        ready = ctl.wait_ready()
        out = {"wall_s": ready - started}
        pid = ctl.proc.pid
        out["faults"] = minflt(pid)
        out.update(memory_kib(pid))
        out["cpu_s"] = cpu_seconds(pid)
        out["stand_in_cpu_s"] = self.stand_in.cpu() - stand_in_cpu
        after = self.stand_in.calls()
        out["stand_in_calls"] = {k: v - calls.get(k, 0) for k, v in after.items() if v != calls.get(k, 0)}
        made = ctl.logged_at(INTERFACE_MADE)
        # Its own log splits the wall: up to the director's interface
        # (process start, imports, Docker API negotiation, netlink sockets,
        # the host-namespace check), and from there to ready (sysctls, the
        # start-up pass: listing, inspects, desired, plan, VIPs, nft, IPVS).
        out["to_interface_s"] = made - wall_started
        out["interface_to_ready_s"] = ctl.logged_at(READY) - made
        self.check(ns, "dockerlb run")
        rc = ctl.stop()
        assert rc == 0, f"dockerlb run exited {rc}: " + "\n".join(ctl.lines[-20:])
        out["log_lines"] = len(ctl.lines)
        return out

    def ipvsadm_restore(self, ns: str) -> dict:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", ns, "ipvsadm", "-R"], input=self.rules, text=True, check=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        self.check(ns, "ipvsadm -R")
        return {"wall_s": wall, "cpu_s": cpu, "faults": after.ru_minflt - before.ru_minflt}

    def in_process(self, ns: str) -> dict:
        ipvs = IpvsAdapter(f"/run/netns/{ns}", Settings())
        try:
            wall, ops = sync(ipvs, self.want)
        finally:
            ipvs.close()
        self.check(ns, "in process")
        return {"wall_s": wall, "operations": ops}

    def biases(self, run: int) -> dict:
        """The two biases' inputs (bench/cold_sync_biases.py), untimed runs."""
        guest = {"syscall_us": round(syscall_us(), 3), "page_fault_us": round(page_fault_us(), 3)}
        host_file = ROOT / "build" / "host-costs.json"
        host = json.loads(host_file.read_text()) if host_file.exists() else None
        calls = {}
        for name, counted in (
            ("ipvsadm_syscalls", self._traced_ipvsadm),
            ("dockerlb_run_syscalls", self._traced_run),
        ):
            ns = netns(f"dlbcs-{run}")
            try:
                calls[name] = counted(ns)
            finally:
                subprocess.run(["ip", "netns", "del", ns], check=True)
        image = busybox_image(docker.from_env())
        listing = dockerd_listing(LISTED, lambda i: _labels(i // 10, i % 10), image)
        return {"guest": guest, "host": host, "host_file": str(host_file), "calls": calls, "listing": listing}

    def _traced_ipvsadm(self, ns: str) -> int:
        return traced(["ip", "netns", "exec", ns, "ipvsadm", "-R"], stdin=self.rules)

    def _traced_run(self, ns: str) -> int:
        return traced_until([*self.argv, "--netns", ns], READY, self.env)

    def side(self, side: str, run: int) -> dict:
        ns = netns(f"dlbcs-{run}")
        try:
            return getattr(self, side)(ns)
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=True)

    def profiled(self, run: int, out_dir: str) -> list[str]:
        """One more ``dockerlb run`` under cProfile: where its time goes."""
        stats = f"{out_dir}/dockerlb-run.prof"
        ns = netns(f"dlbcs-{run}")
        try:
            argv = [sys.executable, "-m", "cProfile", "-o", stats, "-m", "dockerlb.app.cli", *self.argv[1:]]
            self.dockerlb_run(ns, [*argv, "--netns", ns])
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=True)
        return profile_text(stats)


def spread(values: list[float], digits: int = 3) -> dict:
    """Median and range over the runs: never the best alone."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    services = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    servers = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    profiling = len(sys.argv) > 4 and sys.argv[4] == "1"
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    # A pip-installed dockerlb has its bytecode; the guest writes none
    # (PYTHONDONTWRITEBYTECODE), so without this every run would compile.
    compileall.compile_dir(str(ROOT / "dockerlb"), quiet=1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dlb-cold-") as tmp:
        bench = Bench(services, servers, f"{tmp}/docker.sock")
        try:
            # The check round: every side once, tables compared, not timed in.
            check = {side: bench.side(side, 0) for side in SIDES}
            logger.info("check round done, the three tables are the same: {}", check)
            timed: list[dict] = []
            for run in range(1, runs + 1):
                # dockerlb and ipvsadm take turns going first.
                order = SIDES if run % 2 else tuple(reversed(SIDES))
                figures = {"order": list(order)}
                for side in order:
                    figures[side] = bench.side(side, run)
                figures["ratio_whole_process"] = (
                    figures["dockerlb_run"]["wall_s"] / figures["ipvsadm_restore"]["wall_s"]
                )
                logger.info("run {}: {}", run, figures)
                timed.append(figures)
            profile = bench.profiled(runs + 1, tmp) if profiling else []
            try:
                biases = bench.biases(runs + 2)
            except Exception as e:  # the timed runs are kept whatever this does
                logger.exception("measuring the biases failed")
                biases = {"error": f"{type(e).__name__}: {e}"}
        finally:
            bench.stand_in.close()

    def over(side: str, name: str, digits: int = 3) -> dict:
        return spread([r[side][name] for r in timed], digits)

    whole, restore = over("dockerlb_run", "wall_s"), over("ipvsadm_restore", "wall_s")
    result = {
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "docker": "STAND-IN Engine API server (bench/stand_in_dockerd.py), not dockerd",
        "services": services,
        "servers_per_service": servers,
        "servers_present": services * servers,
        "runs": runs,
        "dockerlb_run_to_ready_s": whole,
        "ipvsadm_restore_s": restore,
        "ratio_whole_process_of_medians": round(whole["median"] / restore["median"], 2),
        "ratio_whole_process_per_run": spread([r["ratio_whole_process"] for r in timed], 2),
        "in_process_sync_s": over("in_process", "wall_s"),
        "ratio_in_process_of_medians": round(
            statistics.median(r["in_process"]["wall_s"] for r in timed) / restore["median"], 2
        ),
        "dockerlb_to_interface_s": over("dockerlb_run", "to_interface_s"),
        "dockerlb_interface_to_ready_s": over("dockerlb_run", "interface_to_ready_s"),
        "dockerlb_cpu_s": over("dockerlb_run", "cpu_s"),
        "ipvsadm_cpu_s": over("ipvsadm_restore", "cpu_s"),
        "stand_in_cpu_s": over("dockerlb_run", "stand_in_cpu_s"),
        "rss_after_ready_kib": {
            "VmHWM": over("dockerlb_run", "VmHWM", 0),
            "VmRSS": over("dockerlb_run", "VmRSS", 0),
        },
        "stand_in_calls_per_run": timed[0]["dockerlb_run"]["stand_in_calls"],
        "each_run": timed,
        "check_round": check,
        "dockerlb_run_profile": profile,
        "biases": biases,
    }
    saved = save("cold_sync", result)
    if "error" in biases:
        return
    cold = {
        "dockerlb_run_s": whole["median"],
        "ipvsadm_restore_s": restore["median"],
        "dockerlb_run_faults": statistics.median(r["dockerlb_run"]["faults"] for r in timed),
        "ipvsadm_faults": statistics.median(r["ipvsadm_restore"]["faults"] for r in timed),
    }
    sized = summarize(cold, biases, biases["calls"], biases["listing"], services * servers)
    per_run = [r["ratio_whole_process"] for r in timed]
    save_figure(
        "cold_sync_ratio",
        services * servers,
        runs,
        {
            "ratio": round(whole["median"] / restore["median"], 4),
            "ratio_per_run": spread(per_run, 4),
            "measured": "`dockerlb run` process start to its ready line over `ip netns exec NS ipvsadm -R` "
            "of the same table, whole process each, medians of the runs (dockerlb and ipvsadm taking turns)",
            "dockerlb_run_s": whole,
            "ipvsadm_restore_s": restore,
            "docker": STAND_IN,
            "bias_uml_system_calls_and_faults": {
                "what": "UML's system calls and page faults cost far more than a native kernel's; each "
                "side's count times the guest's cost (less the host's, where measured) is the time the "
                "guest added to it",
                "guest_costs": biases["guest"],
                "host_costs": biases["host"],
                "syscalls": biases["calls"],
                "faults": {k: v for k, v in cold.items() if k.endswith("faults")},
                "dockerlb_run_s": sized["uml_cost_of_dockerlb_s"],
                "ipvsadm_restore_s": sized["uml_cost_of_ipvsadm_s"],
                "ratio_without_it": sized["ratio_without_uml_costs"],
            },
            "bias_stand_in_listing": {
                "what": "the stand-in answers the listing from JSON encoded once; dockerd's time to list "
                "as many containers (measured in this guest, created ones, per container) is added to "
                "dockerlb's side",
                "dockerd": biases["listing"],
                "dockerd_at_servers_present_s": sized["dockerd_listing_at_servers_s"],
                "ratio_with_it": sized["ratio_with_dockerd_listing"],
            },
            "ratio_without_both_biases_estimate": sized["ratio_without_both"],
            "file": saved.name,
        },
        shlex.join(["bash", "bench/run-vm.sh", "bench/cold_sync.py", *sys.argv[1:]]),
    )


if __name__ == "__main__":
    main()
