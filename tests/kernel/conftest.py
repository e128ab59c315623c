"""Kernel tier fixtures: the seed's lab on a real IPVS kernel with a real dockerd.

The controller runs as its own process (``python -m dockerlb.cli run``), the
way a user runs it, and is stopped with SIGTERM.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dockerlab import Lab, http_server_cmd, in_netns, pid_of, wait_for

VIP, PORT = "1.2.3.4", 8000
LABELS = {"dockerlb.vip": f"{VIP}:{PORT}"}
OUT = Path(os.environ.get("DOCKERLB_TEST_OUT") or tempfile.gettempdir())
# Controller logs are written and polled on a local tmpfs, not on the
# guest's 9p share (polling 9p while the emulated guest is busy stalled it),
# and copied to OUT when the controller stops.
LOGS = Path(tempfile.mkdtemp(prefix="dockerlb-logs-", dir="/run" if os.path.isdir("/run") else None))


class ControllerProcess:
    def __init__(self, *args: str, name: str = "controller") -> None:
        self.log_path = LOGS / f"{name}-{os.getpid()}-{id(self)}.log"
        self._log = self.log_path.open("w")
        # faulthandler: SIGUSR1 makes a stuck controller print its stacks.
        boot = (
            "import faulthandler, signal; faulthandler.register(signal.SIGUSR1); "
            "from dockerlb.cli import main; main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, "run", "--log-level", "DEBUG", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
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

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.copy(self.log_path, OUT / self.log_path.name)
        return self.proc.returncode


@pytest.fixture
def controllers():
    started: list[ControllerProcess] = []

    def start(*args: str, name: str = "controller") -> ControllerProcess:
        c = ControllerProcess(*args, name=name)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


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
        """`ipvsadm -Ln` as {(proto, vip:port, scheduler): {(rs:port, forward, weight)}}."""
        table: dict = {}
        current = None
        for line in self.ipvsadm("-Ln").splitlines():
            if m := re.match(r"^(TCP|UDP)\s+(\S+)\s+(\S+)", line):
                current = (m[1], m[2], m[3])
                table[current] = set()
            elif (m := re.match(r"^\s+->\s+(\S+)\s+(\S+)\s+(\d+)", line)) and current:
                table[current].add((m[1], m[2], m[3]))
        return table

    def ip(self, name: str) -> str:
        return self.lab.ip(self.webs[name], self.net)

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
    """Polls the director's table in a thread, from before a change is made,
    so the moment a change shows is known to within one (cheap) poll."""

    def __init__(self, lab: SeedLab) -> None:
        self._lab = lab
        self._seen: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = self._lab.table()
            self._seen.append((time.time(), table))  # time the read had finished

    def first_time(self, wanted: dict, timeout: float) -> float:
        """When the table was first seen equal to ``wanted`` (an upper bound)."""

        def found():
            return next((t for t, table in list(self._seen) if table == wanted), None)

        try:
            return wait_for(found, timeout, what=f"table {wanted}")
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
