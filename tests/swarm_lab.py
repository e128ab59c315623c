"""A real Docker Swarm of several nodes on one machine, for the host tier and
the kernel tier (inside the UML guest: tests/kernel/test_swarm.py).

Each node is a dockerd of its own (with the containerd it starts for itself)
in fresh network, mount, PID and UTS namespaces: its own address, ports 2377,
7946 and 4789, iptables, docker0 and hostname. Its mounts are private, the
paths dockerd and containerd hard-code get a tmpfs each, and its state is
under $TMPDIR/dlbt-swarm-<suffix>/ (not build/: in a UML guest that is
hostfs, where overlay2 cannot mount; the guest's TMPDIR is tmpfs). A bridge,
in a namespace of its own, joins the nodes' eth0 on one subnet with no
default route: a registry pull fails at once
instead of timing out, and nothing touches the host's network or its dockerd.

Teardown is a SIGKILL to each node's PID 1: the kernel then kills everything
in that PID namespace (dockerd, containerd, shims, tasks) and with the last of
them drops the node's namespaces and every mount, veth and VXLAN device in
them. A graceful dockerd shutdown would wait out each task's stop timeout to
save state that is deleted next. What the kernel does not drop (the cgroup
directories, the state directory) is removed after. Teardown runs however far
the setup got, and a test process that dies takes its nodes with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from docker.models.containers import Container
from docker.models.networks import Network
from docker.models.services import Service
from docker.types import EndpointSpec, IPAMConfig, IPAMPool, ServiceMode

from harness.dockerlab import busybox_image, in_netns, wait_for

SUBNET = "198.18.231"  # RFC 2544's benchmark range: in none of Docker's own address pools
PORT = 2377
CGROUPS = Path("/sys/fs/cgroup")
# 20.10's swarm executor pulls every task's image before it runs it, unless told
# to prefer the image it has; the test image exists in no registry.
ENV = {**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}

# Run by sh inside a node's namespaces: $1 the hostname, $2 the node's state
# directory, the rest dockerd's arguments.
NODE_SH = """set -e
# Paths dockerd and containerd hard-code (shim sockets, libnetwork's key socket,
# key.json) get a tmpfs each: nodes share none with each other or the host's engine.
for d in /run/docker /run/containerd /etc/docker; do mkdir -p $d && mount -t tmpfs tmpfs $d; done
hostname "$1" && restart="$2/restart" && shift 2
ip link set lo up
# dockerd starts once eth0 is wired: the swarm advertises that address.
read -r go
# Started again only when SwarmLab.restart_dockerd asked (the file says so):
# a dockerd that exits on its own ends the node, as it always did.
while :; do
  rm -f "$restart"
  dockerd "$@" || true
  [ -e "$restart" ] || exit 1
done
"""


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def children(pid: int) -> list[int]:
    """From each process's parent (/proc/N/task/N/children needs a kernel
    built with CONFIG_PROC_CHILDREN; the UML guest's is not)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError):  # gone while we looked
                if _parent(int(entry.name)) == pid:
                    found.append(int(entry.name))
    return found


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: PPid


def answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def dockerd_args(root: Path, name: str) -> list[str]:
    return [
        # Not /etc/docker/daemon.json: the host's settings stay the host's.
        *("--config-file", str(root / "daemon.json")),
        *("--data-root", str(root / "data")),
        *("--exec-root", str(root / "exec")),
        *("--pidfile", str(root / "docker.pid")),
        *("--host", f"unix://{root / 'docker.sock'}"),  # Node.socket
        # Its own parent: teardown knows which cgroup directories are the node's.
        *("--cgroup-parent", f"/{name}"),
    ]


@dataclass
class Node:
    name: str  # also its hostname and its containers' cgroup parent
    address: str
    root: Path
    # unshare: in the node's network, mount and UTS namespaces (not its PID one);
    # its one child is the node's PID 1, tini, which reaps the shims dockerd orphans.
    proc: subprocess.Popen
    client: docker.DockerClient | None = None
    node_id: str = ""

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def url(self) -> str:
        """Its engine, for DOCKER_HOST or a DockerClient."""
        return f"unix://{self.socket}"

    @property
    def netns(self) -> str:
        """Its network namespace, to enter from the host."""
        return f"/proc/{self.proc.pid}/ns/net"

    def host_pid(self, pid: int) -> int:
        """This machine's PID of the process the node's engine calls ``pid``
        (a container's State.Pid: dockerd lives in the node's PID namespace).
        /proc/N/status's NSpid lists a process's PID in each namespace from
        ours down: the second is the node's, and the process must descend from
        the node's PID 1 (the other nodes reuse the same small numbers)."""
        (init,) = children(self.proc.pid)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):  # gone while we looked
                status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines())
                ids = status["NSpid"].split()
                if len(ids) > 1 and int(ids[1]) == pid and _descends(int(entry.name), init):
                    return int(entry.name)
        raise AssertionError(f"no process {pid} in {self.name}")

    def log_tail(self, lines: int = 20) -> str:
        log = self.root / "dockerd.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def keep_log(self, folder: Path) -> None:
        """Copy the node's whole dockerd log into ``folder`` (its state goes
        with the teardown, and in a guest with the guest's tmpfs)."""
        log = self.root / "dockerd.log"
        if log.exists():
            shutil.copyfile(log, folder / f"{self.name}.log")


class SwarmLab:
    """``size`` nodes, the first ``managers`` of them managers, node 0 the leader.
    ``timings`` has, in seconds, ``daemons`` (until every engine answers and has
    the test image), ``swarm`` (init, joins, every node Ready) and, after
    close(), ``teardown``. Start it from a thread that outlives it: the
    parent-death signals fire when the thread that started the nodes ends."""

    def __init__(self, host: docker.DockerClient, size: int = 3, managers: int = 1) -> None:
        self.host = host
        self.size, self.managers = size, managers
        self.suffix = uuid.uuid4().hex[:6]
        self.root = Path(tempfile.gettempdir()) / f"dlbt-swarm-{self.suffix}"
        self.image = busybox_image(host)
        self.nodes: list[Node] = []
        self.switch: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}

    def name(self, base: str) -> str:
        return f"dlbt-{base}-{self.suffix}"

    @property
    def manager(self) -> docker.DockerClient:
        client = self.nodes[0].client
        assert client is not None, "the swarm was not formed"
        return client

    # -- setup ---------------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        image = b"".join(self.host.images.get(self.image).save(named=True))
        self.root.mkdir(parents=True)
        self._switch()
        for index in range(self.size):
            self._spawn(index)
        for index, node in enumerate(self.nodes):
            self._wire(node, index)
        for node in self.nodes:
            self._go(node)
        for node in self.nodes:
            self._connect(node)
            node.client.images.load(image)  # type: ignore[union-attr]
        formed = time.monotonic()
        self.timings["daemons"] = formed - began
        self._form()
        self.timings["swarm"] = time.monotonic() - formed

    def _switch(self) -> None:
        # setpriv: the test process dying takes the namespace (and the bridge) with it.
        switch = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "unshare", "--net", "sleep", "inf"])
        self.switch = switch
        own = netns_of(os.getpid())
        wait_for(lambda: netns_of(switch.pid) != own, 30, what="the switch's namespace")
        in_netns(switch.pid, "ip", "link", "add", "br0", "type", "bridge")
        in_netns(switch.pid, "ip", "link", "set", "br0", "up")

    def _spawn(self, index: int) -> None:
        name = f"dlbt-swarm-{self.suffix}-n{index + 1}"
        root = self.root / f"n{index + 1}"
        root.mkdir()
        (root / "daemon.json").write_text("{}\n")
        argv = [
            *("setpriv", "--pdeathsig", "KILL"),
            # --kill-child: unshare killed, PID 1 goes too, and with it everything in the node.
            *("unshare", "--net", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc"),
            *("--propagation", "private", "docker-init", "--", "sh", "-c", NODE_SH, "sh", name, str(root)),
            *dockerd_args(root, name),
        ]
        with open(root / "dockerd.log", "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=log, env=ENV)
        self.nodes.append(Node(name, f"{SUBNET}.{11 + index}", root, proc))
        own = netns_of(os.getpid())
        wait_for(lambda: netns_of(proc.pid) != own, 30, what=f"{name}'s namespaces")

    def _wire(self, node: Node, index: int) -> None:
        link = f"n{index + 1}"  # the switch's end; the node's is eth0
        sw = self.switch.pid  # type: ignore[union-attr]
        peer = ("peer", "name", "eth0", "netns", str(node.proc.pid))
        in_netns(sw, "ip", "link", "add", link, "type", "veth", *peer)
        in_netns(sw, "ip", "link", "set", link, "master", "br0", "up")
        in_netns(node.proc.pid, "ip", "addr", "add", f"{node.address}/24", "dev", "eth0")
        in_netns(node.proc.pid, "ip", "link", "set", "eth0", "up")

    def _go(self, node: Node) -> None:
        stdin = node.proc.stdin
        assert stdin is not None
        stdin.write(b"go\n")
        stdin.close()

    def _connect(self, node: Node) -> None:
        def up() -> bool:
            if node.proc.poll() is not None:
                raise AssertionError(f"{node.name}'s dockerd exited:\n{node.log_tail()}")
            return answers(node.socket)

        wait_for(up, 60, what=f"{node.name}'s dockerd")
        # No version pinned: the SDK asks the engine which it speaks.
        node.client = docker.DockerClient(base_url=node.url, timeout=120)

    def _form(self) -> None:
        first, *others = self.nodes
        manager = self.manager
        manager.swarm.init(advertise_addr=first.address, listen_addr=f"{first.address}:{PORT}")
        tokens = manager.swarm.attrs["JoinTokens"]
        for index, node in enumerate(others, start=1):
            token = tokens["Manager" if index < self.managers else "Worker"]
            join = {"listen_addr": f"{node.address}:{PORT}", "advertise_addr": node.address}
            node.client.swarm.join([f"{first.address}:{PORT}"], token, **join)  # type: ignore[union-attr]
        for node in self.nodes:
            node.node_id = node.client.info()["Swarm"]["NodeID"]  # type: ignore[union-attr]
        wait_for(self.all_ready, 60, what="every node Ready")

    def all_ready(self) -> bool:
        """Every node is in the manager's list, and ready."""
        listed = self.manager.nodes.list()
        return len(listed) == self.size and all(n.attrs["Status"]["State"] == "ready" for n in listed)

    # -- what tests use ------------------------------------------------------

    def overlay(self, base: str, subnet: str, ready_on: Iterable[Node] = ()) -> Network:
        """An attachable overlay network on ``subnet``, made on the manager.

        ``ready_on``: nodes where the network is set up before this returns,
        by a task of a service that only sleeps, so that standalone containers
        can attach there. A node sets a swarm network up (its VXLAN sandbox and
        its load balancer's: a dozen iptables calls, a re-exec of the 90 MB
        dockerd, new namespaces) when the first task or container there needs
        it. For a standalone container swarmkit waits 20 s for that and no
        longer ("attaching to network failed ... context deadline exceeded"),
        then takes it all down, so every later try starts over: in a UML guest
        the set-up takes longer than that (issue 28). A service task has no
        such deadline."""
        pool = IPAMPool(subnet=subnet)
        network = self.manager.networks.create(
            self.name(base), driver="overlay", attachable=True, ipam=IPAMConfig(pool_configs=[pool])
        )
        keepers = [
            self.service(
                f"{base}-on-{node.name[-2:]}", network, replicas=1, constraints=[f"node.id=={node.node_id}"]
            )
            for node in ready_on
        ]
        for keeper in keepers:
            self.wait_for_tasks(keeper, 1, timeout=600)
        return network

    def service(self, base: str, network: Network, replicas: int = 2, command=None, **kwargs) -> Service:
        """A replicated service of the test image on ``network``. DNS round robin by
        default: a virtual IP needs IPVS in every task's namespace, and the host
        kernel has none. The image reference goes to the engine as it is: API
        1.30 and later never ask a registry for its digest."""
        kwargs.setdefault("endpoint_spec", EndpointSpec(mode="dnsrr"))
        kwargs.setdefault("mode", ServiceMode("replicated", replicas=replicas))
        return self.manager.services.create(
            self.image, command or ["sleep", "86400"], name=self.name(base), networks=[network.id], **kwargs
        )

    def tasks(self, service: Service | str, state: str | None = "running") -> list[dict]:
        """The service's tasks in ``state`` (all with None), from /tasks: Docker
        sends no task events. ``service``: the object, or its name (a stack's
        service is named ``<stack>_<service>``)."""
        ref = service if isinstance(service, str) else service.id
        listed = self.manager.api.tasks(filters={"service": ref})
        return [t for t in listed if state is None or t["Status"]["State"] == state]

    def wait_for_tasks(self, service: Service | str, count: int, timeout: float = 60) -> list[dict]:
        """Exactly ``count`` running tasks of ``service``, once there are."""

        def running() -> tuple[list[dict]] | None:
            found = self.tasks(service)
            return (found,) if len(found) == count else None  # a tuple: true even when empty

        try:
            return wait_for(running, timeout, interval=0.1)[0]
        except AssertionError as e:
            states = [(t["Status"]["State"], t["Status"].get("Err", "")) for t in self.tasks(service, None)]
            name = service if isinstance(service, str) else service.name
            raise AssertionError(f"{e}: {count} running tasks of {name}; tasks: {states}") from None

    def restart_dockerd(self, node: Node, timeout: float = 120) -> float:
        """Stop ``node``'s dockerd with SIGTERM, as a service manager would, and
        wait until its successor answers; returns the seconds the engine was
        gone. Its tasks' containers are stopped with it (no live-restore),
        each within its stop grace period."""
        began = time.monotonic()
        pid = _dockerd_pid(node)
        (node.root / "restart").touch()
        os.kill(pid, signal.SIGTERM)

        def successor() -> bool:
            with contextlib.suppress(ValueError, OSError):  # between the two: no dockerd
                return _dockerd_pid(node) != pid
            return False

        wait_for(successor, timeout, what=f"{node.name}'s dockerd to exit and start again")

        def up() -> bool:
            if node.proc.poll() is not None:
                raise AssertionError(f"{node.name} ended instead of restarting:\n{node.log_tail()}")
            return answers(node.socket) and _answers_ping(node)

        wait_for(up, timeout, what=f"{node.name}'s dockerd to come back")
        return time.monotonic() - began

    def cli(self, *args: str) -> None:
        """The docker CLI against the manager (``service scale``, ``service
        update``): it sends back the service's own spec with one thing changed;
        the SDK's update re-sends a spec that redeploys every task."""
        subprocess.run(["docker", "-H", self.nodes[0].url, *args], check=True, capture_output=True)

    def log_tails(self, lines: int = 40) -> str:
        """Every node's last log lines, for a failure's message."""
        return "\n".join(f"--- {node.name} (dockerd.log)\n{node.log_tail(lines)}" for node in self.nodes)

    @contextlib.contextmanager
    def explained(self, what: str) -> Iterator[None]:
        """A failure inside the block comes with every node's log tail: the
        engines' own words on why (they are gone after the teardown)."""
        try:
            yield
        except Exception as e:
            raise AssertionError(f"{what} failed: {e}\n{self.log_tails()}") from e

    def cut_off(self, node: Node, connected: bool = False) -> None:
        """Unplug ``node`` from the switch (its eth0 loses carrier, as with a
        pulled cable): no heartbeat, gossip or VXLAN gets through until it is
        plugged in again with ``connected=True``."""
        link = f"n{self.nodes.index(node) + 1}"
        in_netns(self.switch.pid, "ip", "link", "set", link, "up" if connected else "down")  # type: ignore[union-attr]

    def lose(self, node: Node) -> None:
        """The host gone at once, as a machine that loses its power: unplugged
        first, then a SIGKILL to ``node``'s PID 1 takes its dockerd,
        containers and namespaces. In that order because a killed process's
        TCP sockets still say goodbye (the kernel sends their FIN), which a
        dead machine never does; the others' links stay up, so no one is
        told. The node stays listed: close() keeps its log and finds it ended."""
        self.cut_off(node)
        _kill(node)

    def node_of(self, task: dict) -> Node:
        (node,) = [n for n in self.nodes if n.node_id == task["NodeID"]]
        return node

    def container_of(self, task: dict) -> Container:
        client = self.node_of(task).client
        assert client is not None
        return client.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])

    # -- teardown ------------------------------------------------------------

    def close(self) -> None:
        """Kill and remove everything, going on past a failure, then raise the first."""
        began = time.monotonic()
        failures: list[Exception] = []
        kept = os.environ.get("DOCKERLB_TEST_OUT")  # a guest's output folder, on the host
        for node in self.nodes:
            if kept:
                _attempt(failures, node.keep_log, Path(kept))
            _attempt(failures, _kill, node)
        if self.switch is not None:
            self.switch.kill()
            _attempt(failures, _wait, self.switch)
        for node in self.nodes:
            _attempt(failures, _remove_cgroups, node.name)
        if self.root.exists():
            _attempt(failures, shutil.rmtree, self.root)
        self.timings["teardown"] = time.monotonic() - began
        if failures:
            raise failures[0]


def _dockerd_pid(node: Node) -> int:
    """The host's PID of ``node``'s dockerd: the child of the node's shell,
    itself a child of the node's PID 1 (beside the shims PID 1 adopted)."""

    def named(pids: list[int], comm: str) -> list[int]:
        return [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == comm]

    (init,) = children(node.proc.pid)
    (shell,) = named(children(init), "sh")
    (dockerd,) = named(children(shell), "dockerd")
    return dockerd


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def _answers_ping(node: Node) -> bool:
    try:
        return bool(node.client.ping())  # type: ignore[union-attr]
    except Exception:
        return False


def _attempt(failures: list[Exception], fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        failures.append(e)


def _kill(node: Node) -> None:
    if node.client is not None:
        node.client.close()
    if node.proc.stdin is not None:
        node.proc.stdin.close()
    if node.proc.poll() is None:
        # While unshare lives its child is the node's PID 1 (or that one's
        # zombie), never a PID reused by someone else's process.
        init = []
        with contextlib.suppress(FileNotFoundError):  # unshare has just exited
            init = children(node.proc.pid)
        if init:
            # It may have just exited on its own (a node not yet told to
            # start ends when its stdin closes, above).
            with contextlib.suppress(ProcessLookupError):
                os.kill(init[0], signal.SIGKILL)
        else:  # not forked yet
            node.proc.kill()
    # unshare returns once PID 1 is reaped, and PID 1 is reaped only once
    # every other process in its namespace is.
    _wait(node.proc)


def _wait(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise


def _remove_cgroups(parent: str) -> None:
    """The node's containers' cgroup directories, deepest first: runc removes
    them only when it deletes a container, which a SIGKILLed node never does."""
    for hierarchy in CGROUPS.iterdir():
        top = hierarchy / parent
        if top.is_dir():
            for path, _dirs, _files in os.walk(top, topdown=False):
                os.rmdir(path)


@contextlib.contextmanager
def swarm_lab(host: docker.DockerClient, size: int = 3, managers: int = 1) -> Iterator[SwarmLab]:
    """A formed swarm for the block, torn down after it however far setup got."""
    lab = SwarmLab(host, size, managers)
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


def swarm_fixture(scope: str = "module", name: str = "swarm", size: int = 3, managers: int = 1):
    """A pytest fixture ``name`` yielding a formed SwarmLab; needs the ``client``
    fixture (the host's engine, whose test image the nodes load). Assign it in
    a test module: ``swarm = swarm_fixture()``."""

    @pytest.fixture(scope=scope, name=name)  # type: ignore[call-overload]
    def fixture(client):
        with swarm_lab(client, size, managers) as lab:
            yield lab

    return fixture
