"""Kernel tier fixtures: the seed's lab on a real IPVS kernel with a real dockerd.

The controller runs as its own process (``python -m dockerlb.app.cli run``), the
way a user runs it, and is stopped with SIGTERM.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPVS, IPVSService

from harness.dockerlab import Lab, http_server_cmd, in_netns, pid_of, stop_process, wait_for

VIP, PORT = "1.2.3.4", 8000
LABELS = {"dockerlb.vip": f"{VIP}:{PORT}"}
# A client's shell loop: {n} new connections to the VIP, each answer (the
# answering server's hostname) ended by <end>.
ASK = (
    f"for i in $(seq {{n}}); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {VIP} {PORT} | tail -n 1; "
    "echo '<end>'; done"
)
OUT = Path(os.environ.get("DOCKERLB_TEST_OUT") or tempfile.gettempdir())
# Controller logs are written and polled on a local tmpfs, not on the
# guest's 9p share (polling 9p while the emulated guest is busy stalled it),
# and copied to OUT when the controller stops.
# The VIPs the kernel tier's labs use (1.2.3.x as the README does, the
# storm's 10.20.0.3, IPv6 ULAs): dockerlb takes only private addresses
# unless told, so every controller and CLI the tests start is told, through
# the environment they inherit; a test of the default unsets it.
LAB_VIP_CIDRS = "1.2.3.0/24 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7"
os.environ.setdefault("DOCKERLB_VIP_CIDR", LAB_VIP_CIDRS)
DOCKERLB_IMAGE = "dockerlb:test"
DOCKERLB_TAR = Path(__file__).resolve().parents[2] / "build/images/dockerlb.tar"
LOGS = Path(tempfile.mkdtemp(prefix="dockerlb-logs-", dir="/run" if os.path.isdir("/run") else None))


class ControllerProcess:
    def __init__(self, *args: str, name: str = "controller", env: dict[str, str] | None = None) -> None:
        self.log_path = LOGS / f"{name}-{os.getpid()}-{id(self)}.log"
        self._log = self.log_path.open("w")
        # faulthandler: SIGUSR1 makes a stuck controller print its stacks.
        boot = (
            "import faulthandler, signal; faulthandler.register(signal.SIGUSR1); "
            "from dockerlb.app.cli import main; main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, "run", "--log-level", "DEBUG", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 180) -> None:
        try:
            wait_for(
                lambda: "ready: start-up sync done" in self.log() or self.proc.poll() is not None,
                timeout,
                interval=0.5,
                what="controller ready",
            )
        except AssertionError:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            raise AssertionError(f"controller not ready after {timeout}s:\n{self.log()}") from None
        assert self.proc.poll() is None, f"controller exited early:\n{self.log()}"

    def passes(self, kind: str = "full") -> int:
        """How many reconcile passes of this kind the controller has logged."""
        return self.log().count(f"{kind} pass: ")

    def wait_passes(self, n: int, kind: str = "full", timeout: float = 60) -> None:
        """Until n passes of this kind have completed: what "nothing more
        happens" is measured in, instead of a sleep."""
        wait_for(lambda: self.passes(kind) >= n, timeout, interval=0.2, what=f"{n} {kind} passes")

    def stop(self) -> int:
        stop_process(self.proc)
        self._log.close()
        shutil.copy(self.log_path, OUT / self.log_path.name)
        return self.proc.returncode


@pytest.fixture
def controllers():
    started: list[ControllerProcess] = []

    def start(*args: str, name: str = "controller", env: dict[str, str] | None = None) -> ControllerProcess:
        c = ControllerProcess(*args, name=name, env=env)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def ipvsadm_stats(text: str) -> dict[str, tuple[int, ...]]:
    """`ipvsadm -Ln --stats --exact` as {"TCP 1.2.3.4:8000": counters, "1.2.3.4:8000 -> rs:port": ...},
    counters in ipvsadm's order: conns, inpkts, outpkts, inbytes, outbytes."""
    out: dict[str, tuple[int, ...]] = {}
    service = ""
    for line in text.splitlines():
        if m := re.match(r"^(TCP|UDP)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", line):
            service = m[2]
            out[f"{m[1]} {m[2]}"] = tuple(int(m[i]) for i in range(3, 8))
        elif m := re.match(r"^\s+->\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", line):
            out[f"{service} -> {m[1]}"] = tuple(int(m[i]) for i in range(2, 7))
    return out


def ipvs_table(listing: str) -> dict[tuple[str, str, str], set[tuple[str, str, str]]]:
    """`ipvsadm -Ln` as {(proto, vip:port, scheduler): {(rs:port, forward, weight)}}."""
    table: dict = {}
    current = None
    for line in listing.splitlines():
        if m := re.match(r"^(TCP|UDP|SCTP)\s+(\S+)\s+(\S+)", line):
            current = (m[1], m[2], m[3])
            table[current] = set()
        elif (m := re.match(r"^\s+->\s+(\S+)\s+(\S+)\s+(\d+)", line)) and current:
            table[current].add((m[1], m[2], m[3]))
    return table


DR_SYSCTLS = [
    "net.ipv4.conf.all.arp_ignore",
    "net.ipv4.conf.all.arp_announce",
    "net.ipv4.conf.eth0.arp_ignore",
]
TUN_SYSCTLS = [*DR_SYSCTLS, "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.tunl0.rp_filter"]


def server_netns(pid: int) -> dict:
    """What dockerlb may set in a real server's namespace, as the kernel
    shows it: lo's and tunl0's addresses, tunl0 up, the default route, the
    DR and TUN sysctls (by their dotted names)."""
    return {
        "lo": in_netns(pid, "ip", "-o", "-4", "addr", "show", "dev", "lo"),
        "tunl0": in_netns(pid, "ip", "-o", "addr", "show", "dev", "tunl0", check=False),
        "tunl0 up": ",UP" in in_netns(pid, "ip", "link", "show", "dev", "tunl0", check=False),
        "default": in_netns(pid, "ip", "route", "show", "default").strip(),
        **{k: in_netns(pid, "cat", "/proc/sys/" + k.replace(".", "/")).strip() for k in TUN_SYSCTLS},
    }


def peer(remote_addr: str) -> str:
    """busybox httpd's REMOTE_ADDR on a dual-stack socket: [::ffff:a.b.c.d]."""
    return remote_addr.strip("[]").removeprefix("::ffff:")


def dockerlb_image(client) -> str:
    """The image scripts/build-image.sh built and saved on the host, loaded here once."""
    if not client.images.list(name=DOCKERLB_IMAGE):
        assert DOCKERLB_TAR.exists(), f"{DOCKERLB_TAR} is missing: run scripts/build-image.sh first"
        subprocess.run(["docker", "load", "-q", "-i", str(DOCKERLB_TAR)], check=True, timeout=900)
    return DOCKERLB_IMAGE


@dataclass
class SeedLab:
    lab: Lab
    net: object
    director: object
    client: object
    webs: dict  # name -> container

    @functools.cached_property
    def director_pid(self) -> int:
        return pid_of(self.director)

    def ipvsadm(self, *args: str) -> str:
        return in_netns(self.director_pid, "ipvsadm", *args)

    def table(self) -> dict[tuple[str, str, str], set[tuple[str, str, str]]]:
        return ipvs_table(self.ipvsadm("-Ln"))

    def ip(self, name: str) -> str:
        return self.lab.ip(self.webs[name], self.net)

    def stats(self) -> dict[str, tuple[int, ...]]:
        """The counters as ipvsadm shows them (see ipvsadm_stats). The kernel
        folds its per-CPU counters into these totals every 2 s (a timer in
        6.1, kthreads from 6.2): a read may lag the traffic by that much, and
        two equal reads do not prove it has caught up. Counters only grow."""
        return ipvsadm_stats(self.ipvsadm("-Ln", "--stats", "--exact"))

    def answers_directly(self, name: str) -> bool:
        """Whether the server itself listens yet (asked by the client, not via the VIP)."""
        probe = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {self.ip(name)} {PORT}"
        return "200 OK" in self.client.exec_run(["sh", "-c", probe]).output.decode(errors="replace")

    def requests(self, n: int) -> list[str | None]:
        """n HTTP requests from the client through the VIP, one new connection
        each (in one `docker exec`): the answering container's name per
        request, or None for a request that failed."""
        script = (
            f"for i in $(seq {n}); do "
            f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {VIP} {PORT} | tail -n 1 || true; "
            "echo '<end>'; done"
        )
        out = self.client.exec_run(["sh", "-c", script]).output.decode(errors="replace")
        answers = [chunk.strip() for chunk in out.split("<end>")[:n]]
        by_host = {c.id[:12]: name for name, c in self.webs.items()}
        return [by_host.get(a) for a in answers]


class TableWatcher:
    """Watches the VIP's real servers from a thread, started before a change
    is made, so the moment the change shows is known to within one poll. It
    dumps IPVS itself (pyroute2, in process): a fork of nsenter+ipvsadm per
    poll took up to a second under emulation."""

    def __init__(self, lab: SeedLab) -> None:
        self._netns = f"/proc/{lab.director_pid}/ns/net"
        self._service = IPVSService(addr=VIP, port=PORT, protocol=socket.IPPROTO_TCP)
        self._seen: list[tuple[float, set[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # pyroute2's sockets belong to the thread that opens them.
        with IPVS(netns=self._netns, flags=0) as sock:
            while not self._stop.is_set():
                dests = [m.get_attr("IPVS_CMD_ATTR_DEST") for m in sock.dest("dump", service=self._service)]
                servers = {
                    f"{d.get_attr('IPVS_DEST_ATTR_ADDR')}:{d.get_attr('IPVS_DEST_ATTR_PORT')}" for d in dests
                }
                self._seen.append((time.time(), servers))  # time the read had finished
                self._stop.wait(0.01)  # leave the emulated CPUs to the controller

    def first_time(self, wanted: set[str], timeout: float) -> float:
        """When the real servers were first seen to be ``wanted`` (an upper bound)."""

        def found():
            return next((t for t, servers in list(self._seen) if servers == wanted), None)

        try:
            return wait_for(found, timeout, what=f"real servers {wanted}")
        finally:
            self._stop.set()
            self._thread.join(timeout=30)

    @property
    def polls(self) -> int:
        return len(self._seen)


@pytest.fixture
def seed_lab(lab):
    """Director, two labelled real servers, a client routing the VIP via the director."""
    net = lab.network("lab")
    director = lab.run("director", network=net)
    # No HEALTHCHECK, as in the seed's lab: a server joins as soon as it runs.
    # (Docker healthchecks every second overloaded the emulated guest.)
    webs = {n: lab.run(n, http_server_cmd(PORT), labels=LABELS, network=net) for n in ("web1", "web2")}
    client = lab.run("client", network=net, cap_add=["NET_ADMIN"])
    r = client.exec_run(["ip", "route", "add", f"{VIP}/32", "via", lab.ip(director, net)])
    assert r.exit_code == 0, r.output
    return SeedLab(lab, net, director, client, webs)
