"""Kernel tier: Swarm services as real servers, on a real three-node Swarm.

The Swarm (tests/swarm_lab.py) runs inside the IPVS guest: a manager and two
workers, each a dockerd in namespaces of its own, joined by a bridge. The
director is a container on the manager, attached to an attachable overlay;
dockerlb runs as a process with ``--swarm``, talking to the manager's engine,
in the director's namespace. The client is a container on a worker, routing
the VIP via the director over the overlay (VXLAN), so every request crosses
hosts twice. What each test expects comes from Docker (the manager's task
list, the tasks' own hostnames), never from dockerlb.

The figures the test prints (how soon a change reached the IPVS table) are
filed with the run in bench/results/; no test asserts a duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from docker.types import EndpointSpec

from harness.dockerlab import http_server_cmd, in_netns, wait_for
from tests.kernel.conftest import ASK, PORT, VIP, ipvs_table
from tests.swarm_lab import swarm_fixture

pytestmark = pytest.mark.kernel
swarm = swarm_fixture()
SUBNET = "10.231.5"


class SwarmDirector:
    """The overlay, the web service, the director and the client on it."""

    def __init__(self, swarm) -> None:
        self.swarm = swarm
        manager, worker = swarm.nodes[0], swarm.nodes[1]
        # Set up where the director and the client attach as standalone
        # containers, first (see SwarmLab.overlay).
        self.overlay = swarm.overlay("lb", f"{SUBNET}.0/24", ready_on=[manager, worker])
        name = self.overlay.name
        self.director = manager.client.containers.run(
            swarm.image, ["sleep", "86400"], name=swarm.name("director"), network=name, detach=True
        )
        self.client = worker.client.containers.run(
            swarm.image,
            ["sleep", "86400"],
            name=swarm.name("client"),
            network=name,
            detach=True,
            cap_add=["NET_ADMIN"],
        )
        self.director.reload()
        address = self.director.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
        done = self.client.exec_run(["ip", "route", "add", f"{VIP}/32", "via", address])
        assert done.exit_code == 0, done.output
        self.pid = manager.host_pid(int(self.director.attrs["State"]["Pid"]))
        self.netns = f"/proc/{self.pid}/ns/net"
        # Each task answers with its hostname, which Swarm makes "<service>.<slot>".
        self.web = swarm.service(
            "web",
            self.overlay,
            replicas=2,
            command=http_server_cmd(PORT),
            hostname="{{.Service.Name}}.{{.Task.Slot}}",
            labels={"dockerlb.vip": f"{VIP}:{PORT}", "dockerlb.scheduler": "rr", "dockerlb.network": name},
            constraints=["node.role==worker"],
            endpoint_spec=EndpointSpec(mode="dnsrr"),
        )

    def close(self) -> None:
        for container in (self.client, self.director):
            container.remove(force=True)

    def serving(self) -> list[tuple[str, str, str]]:
        """Docker's own word on who should serve: each task that is running,
        meant to run and on a node the manager has ready, as (its overlay
        address, its hostname, its node)."""
        ready = {n.id for n in self.swarm.manager.nodes.list() if n.attrs["Status"]["State"] == "ready"}
        found = []
        for task in self.swarm.tasks(self.web):
            if task["DesiredState"] != "running" or task["NodeID"] not in ready:
                continue
            networks = {a["Network"]["Spec"]["Name"]: a["Addresses"] for a in task["NetworksAttachments"]}
            address = networks[self.overlay.name][0].split("/")[0]
            found.append((address, f"{self.web.name}.{task['Slot']}", self.swarm.node_of(task).name))
        return found

    def tasks(self, node=None) -> dict[str, str]:
        """Those serving: address -> hostname (on ``node`` only, if given)."""
        return {a: name for a, name, on in self.serving() if node is None or on == node.name}

    def servers(self) -> dict[str, str]:
        """The VIP's real servers in the director's kernel table (ipvsadm): address -> weight."""
        table = ipvs_table(in_netns(self.pid, "ipvsadm", "-Ln"))
        rows = table.get(("TCP", f"{VIP}:{PORT}", "rr"), set())
        assert all(forward == "Masq" for _, forward, _ in rows), rows
        return {server.rsplit(":", 1)[0]: weight for server, _, weight in rows}

    def settle(self, replicas: int, timeout: float = 120) -> dict[str, str]:
        """Until Docker has ``replicas`` tasks serving and the table holds
        exactly those, each at weight 1; prints when each was so."""
        began = time.monotonic()
        swarm_at = None

        def agreed() -> dict[str, str] | None:
            nonlocal swarm_at
            tasks = self.tasks()
            if len(tasks) != replicas:
                return None
            swarm_at = swarm_at or time.monotonic()
            return tasks if self.servers() == dict.fromkeys(tasks, "1") else None

        tasks = wait_for(
            agreed, timeout, interval=0.2, what=f"the table to hold the {replicas} tasks serving"
        )
        print(
            f"  {replicas} tasks serving after {swarm_at - began:.1f} s (Docker's task list); "  # type: ignore[operator]
            f"the table exactly those after {time.monotonic() - began:.1f} s"
        )
        # In the table is not yet answering: a new task's httpd may not listen
        # yet (a RST), or the director's node may not have learned the task's
        # VXLAN peer (a drop). Asked from the director's own namespace, the
        # path IPVS forwards on, each must answer before a test counts.
        # (A `dockerlb.check` would give the same, but it would also move the
        # table timings printed above, filed in bench/results/.)
        wait_for(
            lambda: all(self.answer_from_director(a) == name for a, name in tasks.items()),
            timeout,
            interval=0.5,
            what=f"each of the {replicas} tasks answering the director directly",
        )
        return tasks

    def answer_from_director(self, address: str) -> str:
        """One request from the director straight to a task (not via the VIP): who answered."""
        probe = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {address} {PORT} | tail -n 1"
        return self.director.exec_run(["sh", "-c", probe]).output.decode(errors="replace").strip()

    def status_rows(self, manager_url: str) -> set[tuple[str, str, str]]:
        """`dockerlb status --json --swarm` for the director: (address, task, node) per server."""
        done = subprocess.run(
            [sys.executable, "-m", "dockerlb.app.cli", "status", "--json", "--swarm", "--netns", self.netns],
            env={**os.environ, "DOCKER_HOST": manager_url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        (service,) = [s for s in json.loads(done.stdout)["services"] if s["vip"] == VIP]
        return {(s["address"], s["container"], s["node"]) for s in service["servers"]}

    def requests(self, n: int) -> Counter:
        """n new connections from the client, through the VIP: who answered (None: failed)."""
        out = self.client.exec_run(["sh", "-c", ASK.format(n=n)]).output.decode(errors="replace")
        return Counter(answer.strip() or None for answer in out.split("<end>")[:n])


@pytest.fixture
def lb(swarm):
    with swarm.explained("setting up the director, the client and the web service"):
        setup = SwarmDirector(swarm)
    yield setup
    setup.close()


def test_swarm_tasks_on_two_workers_take_traffic_through_the_vip_and_follow_scale_and_a_lost_node(
    swarm, lb, controllers
):
    manager = swarm.nodes[0]
    ctl = controllers(
        *("--swarm", "--netns", lb.netns, "--vip-cidr", f"{VIP}/32"),
        env={"DOCKER_HOST": manager.url},
    )
    ctl.wait_ready()

    # Two replicas, one on each worker, both answering across hosts.
    print("start:")
    tasks = lb.settle(2)
    assert {swarm.node_of(t).name for t in swarm.tasks(lb.web)} == {n.name for n in swarm.nodes[1:]}
    got = lb.requests(20)
    assert got == Counter({name: 10 for name in tasks.values()}), got
    # `dockerlb status` names each server's task and the node it runs on.
    assert lb.status_rows(manager.url) == set(lb.serving())

    # Scale to 4 and back to 2: the table follows, and all four answer.
    print("scale 2->4:")
    swarm.cli("service", "scale", "--detach", f"{lb.web.name}=4")
    tasks = lb.settle(4)
    got = lb.requests(40)
    assert got == Counter({name: 10 for name in tasks.values()}), got
    print("scale 4->2:")
    four = set(tasks)
    began = time.monotonic()
    swarm.cli("service", "scale", "--detach", f"{lb.web.name}=2")

    # The two tasks Swarm stops drain at once (weight 0), before they exit.
    def both_drained() -> set[str] | None:
        stopped = four - set(lb.tasks())
        weights = lb.servers()
        return stopped if len(stopped) == 2 and all(weights.get(a) == "0" for a in stopped) else None

    wait_for(both_drained, 60, interval=0.2, what="the two stopped tasks at weight 0")
    print(f"  the two told to stop at weight 0 after {time.monotonic() - began:.1f} s")
    tasks = lb.settle(2)
    got = lb.requests(20)
    assert got == Counter({name: 10 for name in tasks.values()}), got

    # A worker cut off: Swarm marks it down, and its task leaves the table.
    lost = swarm.nodes[2]
    on_lost = set(lb.tasks(lost))
    assert len(on_lost) == 1, on_lost
    down_at = gone_at = None
    cut_at = time.monotonic()
    swarm.cut_off(lost)

    def seen() -> bool:
        nonlocal down_at, gone_at
        now = time.monotonic()
        if down_at is None and swarm.manager.nodes.get(lost.node_id).attrs["Status"]["State"] == "down":
            down_at = now
        if gone_at is None and not on_lost & set(lb.servers()):
            gone_at = now
        return down_at is not None and gone_at is not None

    wait_for(seen, 120, interval=0.2, what="the lost node down and its task out of the table")
    print(
        f"node cut off: Swarm marked it down after {down_at - cut_at:.1f} s; its task left the table "
        f"after {gone_at - cut_at:.1f} s ({gone_at - down_at:+.1f} s after down; poll every 1 s)"
    )
    # Swarm's replacement starts on the worker left; the table follows it.
    print("replacement of the lost node's task:")
    tasks = lb.settle(2)
    assert set(lb.tasks(swarm.nodes[1])) == set(tasks)
    got = lb.requests(20)
    assert got == Counter({name: 10 for name in tasks.values()}), got
    assert lb.status_rows(manager.url) == set(lb.serving())
    # Plugged in again: Swarm stops the task it had there (and any other it
    # lost track of), and meanwhile none of them gets new connections.
    began = time.monotonic()
    swarm.cut_off(lost, connected=True)
    wrong: set[str] = set()

    def old_tasks_stopped() -> bool:
        serving, weights = lb.tasks(), lb.servers()
        wrong.update(a for a, weight in weights.items() if weight != "0" and a not in serving)
        on_lost = [t for t in swarm.tasks(lb.web) if swarm.node_of(t) is lost]
        return swarm.all_ready() and not on_lost and weights == dict.fromkeys(serving, "1")

    wait_for(old_tasks_stopped, 120, interval=0.2, what="the node back and its old tasks stopped")
    print(f"the lost node back, its old tasks stopped, the table as before: {time.monotonic() - began:.1f} s")
    assert wrong == set()
    assert lb.tasks() == tasks
    assert ctl.proc.poll() is None, ctl.log()
