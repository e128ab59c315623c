"""Kernel tier: the sidecar image under docker-compose, as a user runs it.

The image is the one scripts/build-image.sh built (and saved) on the host,
loaded into the guest's dockerd; the web image is the FROM-scratch busybox.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import docker
import pytest

from tests.dockerlab import busybox_image, in_netns, outside_client, pid_of, wait_for
from tests.kernel.conftest import ASK, DR_SYSCTLS, TUN_SYSCTLS, dockerlb_image, ipvs_table, peer, server_netns

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
# Every folder of examples/, written out: a new one must be added here to count.
WORKING_EXAMPLES = [
    "nat-web-pair",
    "weighted-canary",
    "persistence",
    "health-checked",
    "direct-routing",
    "tunnel",
    "udp-dns",
    "ipv6",
    "swarm",
]
# Folders whose README says they need more than one machine, and the kernel
# test that proves them instead.
PROVEN_ELSEWHERE = {"bgp-two-directors": "tests/kernel/test_bgp.py"}


@pytest.fixture(scope="module")
def images(client) -> dict[str, str]:
    return {"DOCKERLB_IMAGE": dockerlb_image(client), "WEB_IMAGE": busybox_image(client)}


class Project:
    """One docker-compose project, always taken down at the end."""

    def __init__(
        self, client: docker.DockerClient, directory: Path, images: dict[str, str], *files: str
    ) -> None:
        self.client = client
        self.dir = directory
        self.name = f"dlbt{uuid.uuid4().hex[:6]}"
        # docker-compose gives up on dockerd after 60 s by default; a guest's
        # dockerd starting four containers at once can take longer.
        self.env = {**os.environ, **images, "COMPOSE_PROJECT_NAME": self.name, "COMPOSE_HTTP_TIMEOUT": "300"}
        self.files = [a for f in files for a in ("-f", f)]

    def sh(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "-c", command], cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def compose(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["docker-compose", *self.files, *args],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"docker-compose {' '.join(args)}: {done.stderr}"
        return done

    def containers(self, service: str | None = None) -> list:
        labels = [f"com.docker.compose.project={self.name}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.client.containers.list(all=True, filters={"label": labels})

    def one(self, service: str):
        (c,) = self.containers(service)
        return c

    def servers(self, director: str = "director") -> list[str]:
        """Real servers of 1.2.3.4:8000 in the director's IPVS table (ipvsadm -Ln)."""
        table = in_netns(pid_of(self.one(director)), "ipvsadm", "-Ln")
        if "1.2.3.4:8000" not in table:
            return []
        return re.findall(r"->\s+(\S+)\s+Masq", table.split("1.2.3.4:8000", 1)[1])

    def requests(self, n: int) -> Counter:
        """n new connections from the client to the VIP: who answered (None: failed)."""
        out = self.one("client").exec_run(["sh", "-c", ASK.format(n=n)]).output.decode(errors="replace")
        by_host = {c.id[:12]: c.labels["com.docker.compose.service"] for c in self.containers()}
        return Counter(by_host.get(answer.strip()) for answer in out.split("<end>")[:n])

    def down(self) -> None:
        subprocess.run(
            ["docker-compose", *self.files, "down", "--remove-orphans"],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            timeout=600,
        )


@pytest.fixture
def project(client, images):
    made: list[Project] = []

    def make(directory: Path, *files: str) -> Project:
        p = Project(client, directory, images, *files)
        made.append(p)
        return p

    yield make
    for p in made:
        p.down()


def test_the_compose_lab_balances_scales_live_and_leaves_nothing_behind(project):
    lab = project(ROOT / "compose")
    lab.compose("up", "-d")
    wait_for(lambda: len(lab.servers()) == 2, 300, interval=2, what="both real servers")
    got = lab.requests(20)
    assert got[None] == 0 and set(got) == {"ipvs_1", "ipvs_2"}, got

    # The image's HEALTHCHECK asks dockerlb's /healthz: healthy once synced.
    director = lab.one("director")
    wait_for(lambda: director.reload() or director.attrs["State"]["Health"]["Status"] == "healthy", 300, 5)

    lab.compose("up", "-d", "--scale", "ipvs_2=3")
    wait_for(lambda: len(lab.servers()) == 4, 300, interval=2, what="four real servers")
    assert lab.requests(12)[None] == 0
    lab.compose("up", "-d", "--scale", "ipvs_2=1")
    wait_for(lambda: len(lab.servers()) == 2, 300, interval=2, what="back to two")

    # What the README says `dockerlb status` shows: each server's container.
    status = lab.compose("exec", "-T", "director", "dockerlb", "status").stdout
    for c in lab.containers("ipvs_1") + lab.containers("ipvs_2"):
        assert c.name in status, status

    # Real servers gone: dockerlb's service and VIP leave the director.
    lab.compose("rm", "-s", "-f", "ipvs_1", "ipvs_2")
    wait_for(lambda: "1.2.3.4" not in in_netns(pid_of(director), "ipvsadm", "-Ln"), 300, 2, what="no service")
    assert "1.2.3.4" not in in_netns(pid_of(director), "ip", "-o", "addr")
    lab.compose("down")
    assert lab.containers() == []


def test_dockerlb_can_join_an_existing_directors_namespace(project):
    lab = project(ROOT / "compose", "join-director.yml")
    lab.compose("up", "-d")
    wait_for(lambda: len(lab.servers()) == 2, 300, interval=2, what="both real servers")
    got = lab.requests(10)
    assert got[None] == 0 and set(got) == {"ipvs_1", "ipvs_2"}, got


def console_steps(readme: str) -> list[tuple[str, list[str]]]:
    """The README's ```console block as (command, expected stdout lines)."""
    block = re.search(r"```console\n(.*?)```", readme, re.S)
    assert block, "no console block"
    steps: list[tuple[str, list[str]]] = []
    for line in block[1].splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line.strip())
    return steps


def fast_form(example: Project, command: str) -> str:
    """The same command with `docker-compose exec -T S` as `docker exec -i <S's id>`.

    Under emulation each docker-compose start costs 10-30 s of Python; the Go
    `docker` CLI is quick, so waiting for the controller to settle uses this
    form, and the README's own command is then run once and checked.
    """
    match = re.match(r"docker-compose exec -T (\S+) ", command)
    if not match:
        return command
    return f"docker exec -i {example.one(match[1]).id} {command[match.end() :]}"


def run_example(example: Project) -> str | None:
    """Every step of the example's README; what went wrong, or None."""
    for command, expected in console_steps((example.dir / "README.md").read_text()):
        if not expected:
            done = example.sh(command)
            if done.returncode != 0:
                return f"{command}: {done.stderr}"
            continue
        if fast_form(example, command) == command:
            # Not a question to a container (`docker service scale`, `docker
            # stack rm`): nothing to wait for, and not one to ask twice.
            done = example.sh(command)
            got = [line.strip() for line in done.stdout.splitlines()]
            if got != expected:
                return f"{command}\nexpected {expected}\ngot {done.stdout}{done.stderr}"
            continue
        # After `up -d` the controller needs a moment (under emulation, a
        # minute): what the README shows is what the user sees once it settled.
        deadline = time.monotonic() + 300
        while True:
            done = example.sh(fast_form(example, command))
            got = [line.strip() for line in done.stdout.splitlines()]
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(3)
        done = example.sh(command)
        got = [line.strip() for line in done.stdout.splitlines()]
        if got != expected:
            return f"{command}\nexpected {expected}\ngot {done.stdout}{done.stderr}"
    return None


@pytest.mark.parametrize("name", WORKING_EXAMPLES)
def test_each_working_example_gives_the_output_its_readme_promises(project, client, name):
    # One at a time: brought up together, they overloaded the emulated guest's
    # dockerd until docker-compose's requests timed out.
    directory = ROOT / "examples" / name
    example = project(directory)
    stack = (directory / "stack.yml").exists()
    with swarm_of_one(client) if stack else contextlib.nullcontext():
        try:
            problem = run_example(example)
        finally:
            example.down()  # before the swarm goes: its containers are on the stack's network
    assert problem is None, f"{name}: {problem}"


@contextlib.contextmanager
def swarm_of_one(client):
    """The guest's engine as a Swarm manager for the block (an example with
    a stack.yml): the README starts on a manager. Leaving removes whatever
    services and overlays the example left behind, but not docker_gwbridge,
    the local bridge `swarm init` made: its gateway address would stay in
    the guest's namespace for the tests after (ci18: one of them names the
    host's own bridge gateways)."""
    before = sorted(n.name for n in client.networks.list())
    client.swarm.init(advertise_addr="127.0.0.1")
    try:
        yield
    finally:
        client.swarm.leave(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            client.networks.get("docker_gwbridge").remove()
    assert sorted(n.name for n in client.networks.list()) == before


def test_every_example_folder_is_checked():
    folders = sorted(p.name for p in (ROOT / "examples").iterdir() if p.is_dir())
    assert folders == sorted([*WORKING_EXAMPLES, *PROVEN_ELSEWHERE])
    for name, test in PROVEN_ELSEWHERE.items():
        assert (ROOT / test).exists() and test in (ROOT / "examples" / name / "README.md").read_text()


# -- dockerlb as a container, entering real servers' namespaces (issue 18) ----
# The examples prove DR and TUN traffic through the sidecar; this proves
# routed NAT's (its client outside Docker) and that a sidecar takes back what
# it set in each server's namespace, through its own procfs.
LAN_CLIENT, LAN_GW = "192.168.78.2", "192.168.78.1"
ASK_PEER = (
    "import urllib.request as u; "
    "print(u.urlopen('http://1.2.3.5:8000/cgi-bin/peer', timeout=5).read().decode().strip())"
)


def test_as_a_container_dockerlb_sets_up_routed_nat_dr_and_tun_servers_and_takes_it_back(project):
    lab = project(ROOT / "tests/kernel/sidecar")
    servers = ("kept", "dr", "tun")
    lab.compose("up", "-d", *servers)  # the servers first: their namespaces before dockerlb
    before = {s: server_netns(pid_of(lab.one(s))) for s in servers}
    lab.compose("up", "-d")
    director = lab.one("director")

    def real_servers() -> int:
        return sum(map(len, ipvs_table(in_netns(pid_of(director), "ipvsadm", "-Ln")).values()))

    wait_for(lambda: real_servers() == 3, 300, 2, what="three real servers")
    outside = outside_client(pid_of(director), lab.name[-6:], LAN_CLIENT, LAN_GW, "1.2.3.0/29")
    try:
        # Routed NAT: the server sees the outside client's own address.
        def ask() -> str:
            return peer(in_netns(outside.pid, sys.executable, "-c", ASK_PEER, check=False).strip())

        wait_for(lambda: ask() == LAN_CLIENT, 60, 1, what="the client's own address at the server")
        kept, dr, tun = (server_netns(pid_of(lab.one(s))) for s in servers)
        assert kept["default"].startswith("default via 172.31.89.10 dev eth0 proto 76"), kept
        assert "inet 1.2.3.4/32" in dr["lo"], dr
        assert [dr[k] for k in DR_SYSCTLS] == ["1", "2", "1"]
        assert "inet 1.2.3.6/32" in tun["tunl0"], tun
        assert [tun[k] for k in TUN_SYSCTLS] == ["1", "2", "1", "0", "0"]

        # Paused, they are no longer real servers: every namespace is as it was.
        for s in servers:
            lab.one(s).pause()
        for s in servers:
            pid = pid_of(lab.one(s))
            with contextlib.suppress(AssertionError):  # the comparison below says what differs
                wait_for(lambda pid=pid, s=s: server_netns(pid) == before[s], 120, 2, what=s)
            assert server_netns(pid) == before[s], s
    finally:
        outside.kill()
        outside.wait()
        for s in servers:
            with contextlib.suppress(docker.errors.APIError):
                lab.one(s).unpause()


# -- compose/ha: a director pair as its README runs it (issue 17) ---------------
# tests/kernel/test_ha_pair.py proves each forwarding method and its
# controls; this is what a user of compose/ha sees.
KEEPALIVED_IMAGE = "dockerlb-keepalived:test"
KEEPALIVED_TAR = ROOT / "build/images/keepalived.tar"
DIRECTORS = ("director_a", "director_b")
# A numbered line every 0.2 s on one connection; the echo sends each back.
TALK = (
    "mkdir -p /tmp && (i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done) "
    "| nc 1.2.3.4 9000 > /tmp/echo"
)


def keepalived_image(client) -> str:
    """The image scripts/build-image.sh built and saved on the host, loaded here once."""
    if not client.images.list(name=KEEPALIVED_IMAGE):
        assert KEEPALIVED_TAR.exists(), f"{KEEPALIVED_TAR} is missing: run scripts/build-image.sh first"
        subprocess.run(["docker", "load", "-q", "-i", str(KEEPALIVED_TAR)], check=True, timeout=900)
    return KEEPALIVED_IMAGE


def holds_vip(p, director: str) -> bool:
    """keepalived's copy of the VIP is on this director's eth0 (the VRRP master)."""
    return "1.2.3.4/32" in in_netns(pid_of(p.one(director)), "ip", "-o", "addr", "show", "dev", "eth0")


def echo_servers(p, director: str) -> list[str]:
    table = in_netns(pid_of(p.one(director)), "ipvsadm", "-Ln")
    if "1.2.3.4:9000" not in table:
        return []
    return re.findall(r"->\s+(\S+)\s+Masq", table.split("1.2.3.4:9000", 1)[1].split("TCP", 1)[0])


def answers(p) -> list[str]:
    return p.one("client").exec_run(["cat", "/tmp/echo"]).output.decode().splitlines()


def pair_line(p, director: str) -> str:
    return p.compose("exec", "-T", director, "dockerlb", "status").stdout.splitlines()[0]


def test_the_pair_fails_over_and_a_clients_connection_keeps_answering(project, client):
    p = project(ROOT / "compose/ha")
    p.env["KEEPALIVED_IMAGE"] = keepalived_image(client)
    p.compose("up", "-d")
    for d in DIRECTORS:  # both directors program the same table
        wait_for(lambda d=d: len(echo_servers(p, d)) == 2, 300, interval=2, what=f"{d}'s table")
    master = wait_for(lambda: next((d for d in DIRECTORS if holds_vip(p, d)), None), 120, 1, what="a master")
    (backup,) = [d for d in DIRECTORS if d != master]
    assert not holds_vip(p, backup)
    daemons = "sync daemons: backup on eth0 id 51 running, master on eth0 id 51 running"
    assert pair_line(p, master) == f"Director pair: role active; {daemons}"
    assert pair_line(p, backup) == f"Director pair: role standby; {daemons}"
    got = p.requests(6)
    assert got[None] == 0 and set(got) == {"web_1", "web_2"}, got

    p.compose("exec", "-d", "client", "sh", "-c", TALK)  # as the README runs it
    wait_for(lambda: len(answers(p)) >= 10, 60, 0.5, what="the connection answering")
    # The backup learned the connection from the master's sync daemon.
    wait_for(
        lambda: "1.2.3.4:9000" in in_netns(pid_of(p.one(backup)), "ipvsadm", "-Lnc"), 60, 1, what="synced"
    )

    p.compose("kill", master)  # the master director dies
    wait_for(lambda: holds_vip(p, backup), 60, 0.5, what="the backup taking the VIP")
    before = len(answers(p))
    wait_for(lambda: len(answers(p)) >= before + 10, 60, 0.5, what="the same connection answering again")
    lines = answers(p)[:-1]  # the last one may be half written
    # One server answered every line, before and after, numbered without a gap.
    assert len({line.split()[0] for line in lines}) == 1, lines[:3]
    assert [int(line.split()[1]) for line in lines] == list(range(1, len(lines) + 1))
    got = p.requests(6)  # new connections, through the new master
    assert got[None] == 0 and set(got) == {"web_1", "web_2"}, got
    assert pair_line(p, backup) == f"Director pair: role active; {daemons}"
