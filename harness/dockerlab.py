"""Real Docker helpers shared by the host and kernel tiers.

Everything here talks to a real dockerd; nothing is faked. Names carry a
per-run suffix so a failed run never collides with the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import docker
from docker.models.containers import Container

IMAGE = "dockerlb-test-busybox:1"
HERE = Path(__file__).parent


SAVED = HERE.parent / "build/images/busybox.tar"  # scripts/build-image.sh saves it


def busybox_image(client: docker.DockerClient) -> str:
    """The FROM-scratch busybox image, once per engine: loaded from the tar
    scripts/build-image.sh saved where there is one (the guests: a load costs
    them far less than a build), else built."""
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        if SAVED.exists():
            subprocess.run(["docker", "load", "-q", "-i", str(SAVED)], check=True, timeout=900)
            return IMAGE
        with tempfile.TemporaryDirectory() as ctx:
            shutil.copy(HERE.parent / "tests/images/busybox/Dockerfile", ctx)
            shutil.copy(shutil.which("busybox") or "/bin/busybox", Path(ctx) / "busybox")
            client.images.build(path=ctx, tag=IMAGE, rm=True)
    return IMAGE


def http_server_cmd(port: int = 8000) -> list[str]:
    # Answers with its own hostname, so the client can tell servers apart.
    return ["sh", "-c", f"mkdir -p /www && hostname > /www/index.html && exec httpd -f -p {port} -h /www"]


class Lab:
    """Containers and networks created by one test, removed at the end."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.suffix = uuid.uuid4().hex[:6]
        self.image = busybox_image(client)
        self._containers: list[Container] = []
        self._networks: list = []

    def name(self, base: str) -> str:
        return f"dlbt-{base}-{self.suffix}"

    def network(self, base: str, subnet: str | None = None, ipv6_subnet: str | None = None):
        kwargs = {}
        if subnet or ipv6_subnet:
            pools = [docker.types.IPAMPool(subnet=s) for s in (subnet, ipv6_subnet) if s]
            kwargs["ipam"] = docker.types.IPAMConfig(pool_configs=pools)
        net = self.client.networks.create(
            self.name(base), driver="bridge", enable_ipv6=bool(ipv6_subnet), **kwargs
        )
        self._networks.append(net)
        return net

    def run(self, base: str, command=None, *, labels=None, network=None, image=None, **kwargs) -> Container:
        c = self.client.containers.run(
            image or self.image,
            # A day: an hour ran out under the 200-container storm (over an hour in the guest).
            command or ["sleep", "86400"],
            name=self.name(base),
            labels=labels or {},
            network=network.name if network is not None else None,
            detach=True,
            **kwargs,
        )
        self._containers.append(c)
        c.reload()
        return c

    def ip(self, container: Container, network) -> str:
        container.reload()
        return container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]

    def close(self) -> None:
        """Remove everything, going on past a failure (a container left
        running would be served by the next test's controller), then raise
        the first failure."""
        failures: list[Exception] = []
        for c in reversed(self._containers):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
            except Exception as e:
                failures.append(e)
        for n in self._networks:
            with contextlib.suppress(docker.errors.APIError):
                n.remove()
        if failures:
            raise failures[0]


def pid_of(container: Container) -> int:
    container.reload()
    return int(container.attrs["State"]["Pid"])


def in_netns(pid: int, *argv: str, check: bool = True) -> str:
    """Run a host command inside a process's network namespace."""
    done = subprocess.run(
        # util-linux's, by path: a venv with the python nsenter package (a
        # dependency once) has a different `nsenter` script first on PATH.
        ["/usr/bin/nsenter", "-t", str(pid), "-n", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} failed: {done.stderr}")
    return done.stdout


def outside_client(
    director_pid: int, suffix: str, address: str, gateway: str, route: str
) -> subprocess.Popen:
    """A client namespace outside Docker (as a LAN client is), wired to the
    director by a veth: ``address``/24 in it, ``gateway``/24 on the
    director's end, ``route`` via the director. The process holds the
    namespace: kill it and the namespace and veth go."""
    proc = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
    own = os.readlink("/proc/self/ns/net")
    wait_for(lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != own, 30, what="a new namespace")
    here, there = f"dlbd{suffix}", f"dlbo{suffix}"
    for argv in (
        ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
        ["ip", "link", "set", here, "netns", str(director_pid)],
        ["ip", "link", "set", there, "netns", str(proc.pid)],
    ):
        subprocess.run(argv, check=True)
    for pid, dev, addr in ((director_pid, here, gateway), (proc.pid, there, address)):
        in_netns(pid, "ip", "addr", "add", f"{addr}/24", "dev", dev)
        in_netns(pid, "ip", "link", "set", dev, "up")
    in_netns(proc.pid, "ip", "link", "set", "lo", "up")
    in_netns(proc.pid, "ip", "route", "add", route, "via", gateway)
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value (a bound, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
