"""Kernel tier: examples/bgp-two-directors as its README runs it, on two
hosts of a real Swarm, each with its own dockerd (issue 30).

    client ns (10.64.19.2) ── router ns: BIRD 2, merge paths (ECMP)
                                 │ 192.168.50.1 on the Swarm fixture's switch
      n1: manager, leader    n2: manager              n3: manager
                             compose/bgp director a   compose/bgp director b
                             (macvlan 192.168.50.11)  (macvlan 192.168.50.12)
      web tasks of the stack (4 replicas, busybox httpd) on the overlay dockerlb-bgp

The three nodes are dockerd in namespaces of their own (tests/swarm_lab.py),
all managers: the Swarm keeps its quorum when a director's host is lost.
What the README says is run as it says it: the stack deployed with `docker
stack deploy` on a manager, compose/bgp brought up with `docker-compose up
-d` against each director host's engine (DOCKER_HOST), the images the ones
scripts/build-image.sh built. The router and the client are namespaces
beside the nodes, as the site's network is.

Losing a host is a SIGKILL to its node's PID 1: its dockerd, containers,
BIRD and namespaces go at once, and its link to the switch with them; the
router's own link stays up, so only its BGP hold timer (3 s) tells it.
Swarm tasks on other hosts get NAT, which SNATs to the director's own
address: a connection the router moves to the other director reaches its
server from a new source and is reset (docs/several-hosts.md). So what is
shown here is that new connections keep working; a long-lived connection
keeping its server is tests/kernel/test_bgp.py's (DR, mh, sloppy_tcp).

What each step expects comes from Docker (the task list, the tasks' own
hostnames) and from the router's kernel, never from dockerlb. The failover
figures of one run are written to OUT/swarm-bgp-failover.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from dockerlb.adapters.netns import entered
from harness.dockerlab import in_netns, wait_for
from tests.kernel.conftest import DOCKERLB_IMAGE, OUT
from tests.kernel.test_bgp import HOLD, ROUTER_BIRD, Bird, Prober, client_socket, next_hops, sh
from tests.swarm_lab import swarm_fixture

pytestmark = pytest.mark.kernel
swarm = swarm_fixture(size=3, managers=3)

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "build/images"
BIRD_IMAGE, KEEPALIVED_IMAGE = "dockerlb-bird:test", "dockerlb-keepalived:test"
VIP, PORT = "10.20.30.1", 8000  # examples/bgp-two-directors/stack.yml
ROUTER, CLIENT, CLIENT_GW = "192.168.50.1", "10.64.19.2", "10.64.19.1"
# More client addresses: mh hashes the source address, so each picks one task;
# among 32 some picks a task on the host the test loses (each does with
# odds of at least 1 in 4: 4 tasks, spread over 3 nodes).
SOURCES = [f"10.64.19.{i}" for i in range(2, 34)]
DIRECTORS = {"a": "192.168.50.11", "b": "192.168.50.12"}  # compose/bgp/bird/director-*.conf
SERVICE = "web_web"  # the stack `web`, its service `web`
REPLICAS = 4


@dataclass(frozen=True)
class Pair:
    """What a director host runs: a compose project, its images' tars (from
    scripts/build-image.sh), each director's own settings; and whether the
    router learns the VIP by BGP (else it reaches it on the shared link)."""

    project: str
    tars: tuple[str, ...]
    settings: dict[str, dict[str, str]]
    bgp: bool


BGP_PAIR = Pair(
    "compose/bgp",
    ("dockerlb.tar", "bird.tar"),
    {key: {"DIRECTOR": key, "DIRECTOR_ADDRESS": address} for key, address in DIRECTORS.items()},
    bgp=True,
)


class Site:
    """The router and the client beside the Swarm, and the two director hosts."""

    def __init__(self, swarm, suffix: str, pair: Pair) -> None:
        self.swarm, self.pair, self.suffix = swarm, pair, suffix
        self.rtr, self.cli = f"rtr{suffix}", f"cli{suffix}"
        self.hosts = {"a": swarm.nodes[1], "b": swarm.nodes[2]}
        # BIRD as the router when the pair speaks BGP; else the router has a static route.
        conf = ROUTER_BIRD.format(router=ROUTER, hold=HOLD, log="{log}", **DIRECTORS)
        self.router = Bird(self.rtr, conf) if pair.bgp else None
        self.routes: IPRoute | None = None

    # -- the site's network -------------------------------------------------

    def wire(self) -> None:
        suffix = self.suffix
        for n in (self.rtr, self.cli):
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        switch = str(self.swarm.switch.pid)
        # The router's leg on the switch, beside the nodes' eth0.
        sh("ip", "link", "add", f"t{suffix}r", "type", "veth", "peer", "name", f"t{suffix}s")
        sh("ip", "link", "set", f"t{suffix}r", "netns", self.rtr)
        sh("ip", "-n", self.rtr, "link", "set", f"t{suffix}r", "name", "eth0")
        sh("ip", "link", "set", f"t{suffix}s", "netns", switch)
        in_netns(int(switch), "ip", "link", "set", f"t{suffix}s", "master", "br0", "up")
        # The client's leg.
        sh("ip", "link", "add", f"t{suffix}c", "type", "veth", "peer", "name", f"t{suffix}d")
        sh("ip", "link", "set", f"t{suffix}c", "netns", self.rtr)
        sh("ip", "-n", self.rtr, "link", "set", f"t{suffix}c", "name", "cli")
        sh("ip", "link", "set", f"t{suffix}d", "netns", self.cli)
        sh("ip", "-n", self.cli, "link", "set", f"t{suffix}d", "name", "eth0")
        for argv in (
            ["addr", "add", f"{ROUTER}/24", "dev", "eth0"],
            ["addr", "add", f"{CLIENT_GW}/24", "dev", "cli"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "cli", "up"],
        ):
            sh("ip", "-n", self.rtr, *argv)
        for source in SOURCES:
            sh("ip", "-n", self.cli, "addr", "add", f"{source}/24", "dev", "eth0")
        sh("ip", "-n", self.cli, "link", "set", "eth0", "up")
        sh("ip", "-n", self.cli, "route", "add", "default", "via", CLIENT_GW)
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            # ECMP by the 5-tuple, from the headers, as a router does (test_bgp.py says why).
            ("net.ipv4.fib_multipath_hash_policy", "3"),
            ("net.ipv4.fib_multipath_hash_fields", "0x0037"),
        ):
            sh("ip", "netns", "exec", self.rtr, "sysctl", "-qw", f"{key}={value}")
        with entered(f"/run/netns/{self.rtr}"):
            self.routes = IPRoute()
        if self.router is not None:
            self.router.start()
        else:  # the master answers ARP for the VIP on the shared link
            sh("ip", "-n", self.rtr, "route", "add", f"{VIP}/32", "dev", "eth0")

    def paths(self) -> list[str]:
        assert self.routes is not None
        return next_hops(self.routes, VIP)

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
        if self.routes is not None:
            self.routes.close()
        for n in (self.rtr, self.cli):
            subprocess.run(["ip", "netns", "del", n], check=False)

    # -- the README's commands ----------------------------------------------

    def load_images(self) -> None:
        """`docker build -t dockerlb . && docker build -t dockerlb-bird compose/bgp/bird`
        (or the keepalived one) on each director host: here the images
        scripts/build-image.sh built, loaded."""
        for node in self.hosts.values():
            for tar in self.pair.tars:
                assert (IMAGES / tar).exists(), f"{IMAGES / tar} is missing: run scripts/build-image.sh first"
                docker(node.url, "load", "-q", "-i", str(IMAGES / tar))

    def deploy(self) -> None:
        """`docker stack deploy -c examples/bgp-two-directors/stack.yml web`, on a manager."""
        stack = ROOT / "examples/bgp-two-directors/stack.yml"
        docker(
            self.swarm.nodes[0].url, "stack", "deploy", "-c", str(stack), "web", WEB_IMAGE=self.swarm.image
        )

    def compose_up(self) -> None:
        """`DIRECTOR=a DIRECTOR_ADDRESS=192.168.50.11 docker-compose up -d` on host A, and
        b's on host B (both at once: each is its own engine). DOCKER_SOCKET: a node's
        engine listens in its state folder, not at /var/run/docker.sock."""
        runs = []
        for key, node in self.hosts.items():
            env = {
                **os.environ,
                "DOCKER_HOST": node.url,
                "DOCKER_SOCKET": str(node.socket),
                **self.pair.settings[key],
                "DOCKERLB_IMAGE": DOCKERLB_IMAGE,
                "BIRD_IMAGE": BIRD_IMAGE,
                "KEEPALIVED_IMAGE": KEEPALIVED_IMAGE,
                "COMPOSE_HTTP_TIMEOUT": "300",  # a guest's engine can take longer than compose's 60 s
            }
            runs.append(
                subprocess.Popen(
                    ["docker-compose", "up", "-d"],
                    cwd=ROOT / self.pair.project,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        for run in runs:
            out, _ = run.communicate(timeout=900)
            assert run.returncode == 0, f"docker-compose up -d: {out}"

    def director(self, key: str):
        client = self.hosts[key].client
        (found,) = client.containers.list(filters={"label": "com.docker.compose.service=director"})
        return found

    def director_pid(self, key: str) -> int:
        node = self.hosts[key]
        return node.host_pid(int(self.director(key).attrs["State"]["Pid"]))

    def logs(self, key: str, lines: int = 60) -> str:
        """The director's last log lines (`docker-compose logs director`)."""
        return self.director(key).logs(tail=lines).decode(errors="replace")

    def status(self, key: str) -> str:
        """`docker-compose exec director dockerlb status` (as `docker exec`: a compose
        start costs 10-30 s of Python in a guest)."""
        done = self.director(key).exec_run(["dockerlb", "status"])
        assert done.exit_code == 0, done.output
        return done.output.decode()

    # -- what Docker and the directors' kernels say -------------------------

    def serving(self, node=None) -> dict[str, str]:
        """Docker's word on who serves: each running task's overlay address -> its
        hostname (Swarm makes it "<service>.<slot>"); on ``node`` only, if given."""
        found = {}
        for task in self.swarm.tasks(SERVICE):
            if task["DesiredState"] != "running" or node not in (None, self.swarm.node_of(task)):
                continue
            networks = {a["Network"]["Spec"]["Name"]: a["Addresses"] for a in task["NetworksAttachments"]}
            found[networks["dockerlb-bgp"][0].split("/")[0]] = f"{SERVICE}.{task['Slot']}"
        return found

    def table(self, key: str) -> dict[str, str]:
        """The VIP's real servers in a director's IPVS table: address -> weight."""
        listing = in_netns(self.director_pid(key), "ipvsadm", "-Ln")
        rows = [line.split() for line in listing.split(f"{VIP}:{PORT}", 1)[-1].splitlines()[1:]]
        return {r[1].rsplit(":", 1)[0]: r[3] for r in rows if len(r) >= 4 and r[0] == "->"}

    def client_ports(self, key: str) -> set[int]:
        """The client's source ports in a director's IPVS connection table."""
        listing = in_netns(self.director_pid(key), "ipvsadm", "-Lnc")
        return {int(p) for p in re.findall(rf"\s{re.escape(CLIENT)}:(\d+)\s", listing)}


def docker(url: str, *argv: str, **env: str) -> str:
    done = subprocess.run(
        ["docker", "-H", url, *argv], capture_output=True, text=True, timeout=900, env={**os.environ, **env}
    )
    assert done.returncode == 0, f"docker {' '.join(argv)}: {done.stderr}"
    return done.stdout


def ask(site: Site, source: str = CLIENT, timeout: float = 3.0) -> tuple[int, str | None]:
    """One new connection from the client to the VIP: (its port, who answered or None)."""
    port = 0
    with contextlib.suppress(OSError), client_socket(site.cli, source, timeout) as s:
        port = s.getsockname()[1]
        s.connect((VIP, PORT))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        lines = answer.decode(errors="replace").strip().splitlines()
        if lines and lines[0].startswith("HTTP/1.") and " 200 " in lines[0]:
            return port, lines[-1].strip()
    return port, None


def after_the_loss(
    site: Site, cut: float, on_lost: set[str], moved: tuple[str, Callable[[], bool]], survivor: str = "a"
) -> dict[str, float]:
    """Seconds after ``cut`` until: ``moved`` holds (the traffic's way
    moved to the survivor: the router has only its path, or it holds the
    VIP; polled every 20 ms); the survivor's table has every task of the lost
    host at weight 0 ("quiesced": no new connection goes there), then none
    of them (each polled every 0.2 s, an ipvsadm run, and counted when the
    run that saw it ended). Two minutes at most."""
    found: dict[str, float] = {}
    table_due = 0.0
    name, has_moved = moved
    while len(found) < 3:
        now = time.monotonic()
        assert now < cut + 120, f"120 s after the loss, only {found}"
        if name not in found and has_moved():
            found[name] = now - cut
        if now >= table_due:
            left = {a: w for a, w in site.table(survivor).items() if a in on_lost}
            read = time.monotonic()
            if all(w == "0" for w in left.values()):
                found.setdefault("lost_tasks_quiesced_s", read - cut)
            if not left:
                found.setdefault("lost_tasks_out_of_the_table_s", read - cut)
            table_due = read + 0.2
        time.sleep(0.02)
    return found


def lose_a_host(
    swarm, site: Site, lost_key: str, moved: tuple[str, Callable[[], bool]]
) -> tuple[dict, list[str | None]]:
    """Director ``lost_key``'s host lost while a client asks every 0.1 s from
    an address that mh sends to a task on that host: the figures (see
    after_the_loss), and who answered each new connection started once
    ``moved`` held and the lost host's tasks were quiesced (None: not answered)."""
    survivor = next(key for key in DIRECTORS if key != lost_key)
    lost = site.hosts[lost_key]
    on_lost = site.serving(lost)
    picks = {source: ask(site, source)[1] for source in SOURCES}
    chosen = next((src for src, who in picks.items() if who in on_lost.values()), None)
    assert chosen, (picks, on_lost)
    prober = Prober(lambda: ask(site, chosen))
    try:
        time.sleep(1)
        cut = time.monotonic()
        swarm.lose(lost)
        moments = after_the_loss(site, cut, set(on_lost), moved, survivor)
        time.sleep(3)  # new connections, all through the survivor, after the lost tasks were quiesced
    finally:
        prober.stop()
    probes = sorted((t - cut, who) for t, _, who in prober.results if t >= cut)
    failed = [t for t, who in probes if who is None]
    settled = max(moments[moved[0]], moments["lost_tasks_quiesced_s"])
    print(f"lost director {lost_key}'s host; client {chosen} (mh: {picks[chosen]}, on the lost host)")
    print("new connections after the loss (started, answered by):", [(round(t, 1), w) for t, w in probes])
    figures = {
        "lost": f"director {lost_key}",
        **{key: round(seconds, 2) for key, seconds in moments.items()},
        "lost_tasks": len(on_lost),
        "new_connections": len(probes),
        "new_connections_failed": len(failed),
        "last_failed_s": round(max(failed, default=0.0), 2),
    }
    print(f"failover: {figures}")
    return figures, [who for t, who in probes if t >= settled]


def write_figures(name: str, figures: dict) -> None:
    """OUT/``name``: the figures, with the commit and whether the tree was clean."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    porcelain = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout
    result = {"commit": commit, "dirty": bool(porcelain.strip()), **figures}
    (OUT / name).write_text(json.dumps(result, indent=2) + "\n")


def site_fixture(pair: Pair):
    """The module's ``site`` fixture: a Site with ``pair`` on each director host."""

    @pytest.fixture(scope="module", name="site")
    def fixture(swarm):
        yield from _site(swarm, pair)

    return fixture


def _site(swarm, pair: Pair):
    s = Site(swarm, swarm.suffix[:4], pair)
    try:
        with swarm.explained("the site: router, client, images, stack, both directors"):
            began = time.monotonic()
            s.wire()
            s.load_images()
            loaded = time.monotonic()
            s.deploy()
            # Every replica running, on every node (spread): the overlay is set up
            # on both director hosts before their directors attach to it as
            # standalone containers (SwarmLab.overlay says why that matters).
            on = {swarm.node_of(t).name for t in swarm.wait_for_tasks(SERVICE, REPLICAS, timeout=600)}
            assert {n.name for n in s.hosts.values()} <= on, on
            deployed = time.monotonic()
            s.compose_up()
            print(
                f"set-up: swarm {swarm.timings['daemons']:.0f} + {swarm.timings['swarm']:.0f} s, images "
                f"{loaded - began:.0f} s, stack {deployed - loaded:.0f} s, compose up "
                f"{time.monotonic() - deployed:.0f} s"
            )
        yield s
    finally:
        s.close()


site = site_fixture(BGP_PAIR)


def test_the_bgp_example_runs_on_two_swarm_hosts_as_its_readme_says_and_outlives_a_host(swarm, site):
    # Both directors announce the VIP once two servers serve: two paths at the router.
    began = time.monotonic()
    router = site.router
    assert router is not None
    wait_for(lambda: router.protocols().count("Established") == 2, 300, interval=0.5, what="both sessions")
    wait_for(lambda: site.paths() == sorted(DIRECTORS.values()), 300, interval=0.2, what="two paths")
    print(f"two paths at the router {time.monotonic() - began:.1f} s after both directors were up")
    serving = site.serving()
    assert len(serving) == REPLICAS, serving
    # The README's "What you will see", line by line (each director's own BIRD
    # may see its session established a moment after the router does).
    first = re.compile(
        r"Announcement: speaker: BIRD 2\.\S+, 1 of 1 BGP sessions established\n"
        r"  VIP 10\.20\.30\.1: announced\n"
    )
    for key in DIRECTORS:
        wait_for(lambda k=key: site.table(k) == dict.fromkeys(serving, "1"), 120, what=f"{key}'s table")
        wait_for(lambda k=key: first.match(site.status(k)), 30, interval=1, what=f"{key}'s status: announced")

    # Many client ports: both directors carry some, each connection one of them,
    # every answer from a task Docker runs.
    got = [ask(site) for _ in range(40)]
    answers = Counter(who for _, who in got)
    assert set(answers) <= set(serving.values()), answers
    ports = {port for port, _ in got}
    carried = {key: site.client_ports(key) & ports for key in DIRECTORS}
    counts = {key: len(ports) for key, ports in carried.items()}
    print(f"40 new connections: answers {dict(answers)}; carried by {counts}")
    assert carried["a"] and carried["b"], carried
    assert carried["a"].isdisjoint(carried["b"]) and carried["a"] | carried["b"] == ports, carried

    # Scaled to one replica: fewer than announce_min (2) serve, both withdraw;
    # back to four, both announce again.
    docker(swarm.nodes[0].url, "service", "scale", "--detach", f"{SERVICE}=1")
    wait_for(lambda: site.paths() == [], 120, interval=0.2, what="the VIP withdrawn at the router")
    withheld = f"VIP {VIP}: withheld: 1 of 1 serving (2 needed)"
    for key in DIRECTORS:
        wait_for(lambda k=key: withheld in site.status(k), 60, interval=1, what=f"{key} saying {withheld!r}")
    docker(swarm.nodes[0].url, "service", "scale", "--detach", f"{SERVICE}={REPLICAS}")
    wait_for(lambda: site.paths() == sorted(DIRECTORS.values()), 300, interval=0.2, what="two paths again")
    wait_for(lambda: len(site.serving()) == REPLICAS, 300, interval=0.5, what=f"{REPLICAS} tasks again")
    serving = site.serving()
    for key in DIRECTORS:
        wait_for(lambda k=key: site.table(k) == dict.fromkeys(serving, "1"), 120, what=f"{key}'s four again")
    assert all(ask(site)[1] in serving.values() for _ in range(8))

    # Director b's host lost: the router drops its path when the hold timer
    # fires; a's checks find b's tasks dead and quiesce them (weight 0), and
    # a client that mh sends to one of them goes to the next task (the
    # scheduler's fallback) while they drain; then Swarm's word removes them.
    # The client asks from an address that mh sends to a task on b's host.
    figures, after = lose_a_host(
        swarm, site, "b", ("path_withdrawn_s", lambda: site.paths() == [DIRECTORS["a"]])
    )
    assert site.paths() == [DIRECTORS["a"]]
    withdrawn = figures["path_withdrawn_s"]
    assert withdrawn < HOLD + 2, withdrawn  # the hold timer, and a little for BIRD and the poll
    # Every one answered once the router had dropped b and a had quiesced b's
    # tasks, though they stayed in a's table (draining) until Swarm's word.
    assert after and all(after), after
    assert first.match(site.status("a")), site.status("a")  # a still announces, its session up
    write_figures("swarm-bgp-failover.json", {"hold_time_s": HOLD, **figures})
