"""Host tier: tests/swarm_lab.py forms a real three-node Docker Swarm on this one
machine (three dockerd, each in namespaces of its own, joined by a bridge),
runs a replicated service whose tasks meet over a user overlay network (VXLAN
between the nodes' namespaces), and leaves nothing behind, even when its setup
fails halfway. Each expected value below is one this file or the lab put there."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from ipaddress import ip_interface, ip_network
from pathlib import Path

import pytest

from harness.dockerlab import IMAGE, http_server_cmd, in_netns, wait_for
from tests.swarm_lab import CGROUPS, SUBNET, SwarmLab, swarm_fixture, swarm_lab

pytestmark = pytest.mark.host
OVERLAY = ip_network("10.231.1.0/24")
swarm = swarm_fixture(scope="module")


@pytest.fixture(scope="module")
def overlay(swarm):
    return swarm.overlay("net", str(OVERLAY))


@pytest.fixture(scope="module")
def web(swarm, overlay):
    """Two replicas of an HTTP server that answers with its hostname."""
    service = swarm.service("web", overlay, replicas=2, command=http_server_cmd())
    return swarm.wait_for_tasks(service, 2)


def attachment(task: dict, network) -> dict:
    (attached,) = [a for a in task["NetworksAttachments"] if a["Network"]["ID"] == network.id]
    return attached


def overlay_address(task: dict, network) -> str:
    (address,) = attachment(task, network)["Addresses"]
    return address


def test_the_swarm_has_one_manager_and_two_workers_all_ready(swarm):
    listed = swarm.manager.nodes.list()
    assert sorted(n.attrs["Spec"]["Role"] for n in listed) == ["manager", "worker", "worker"]
    assert {n.attrs["Status"]["State"] for n in listed} == {"ready"}
    assert {n.id for n in listed} == {node.node_id for node in swarm.nodes}
    assert {n.attrs["Status"]["Addr"] for n in listed} == {f"{SUBNET}.{i}" for i in (11, 12, 13)}
    (leader,) = [n for n in listed if n.attrs.get("ManagerStatus", {}).get("Leader")]
    assert leader.id == swarm.nodes[0].node_id


def test_every_node_is_an_engine_of_its_own_beside_the_hosts(swarm, client):
    infos = [node.client.info() for node in swarm.nodes]
    assert [i["Name"] for i in infos] == [node.name for node in swarm.nodes]
    assert len({i["ID"] for i in infos} | {client.info()["ID"]}) == 4
    assert all(node.client.images.get(IMAGE) for node in swarm.nodes)


def test_a_node_has_no_default_route_so_no_registry_is_reachable(swarm):
    node = swarm.nodes[1]
    assert in_netns(node.proc.pid, "ip", "route", "show", "default") == ""


def test_a_replicated_service_gets_two_running_tasks_on_two_nodes(swarm, web):
    assert len(web) == 2
    assert len({t["NodeID"] for t in web}) == 2
    # The reference as given: nothing asked a registry for a digest to pin.
    assert {t["Spec"]["ContainerSpec"]["Image"] for t in web} == {IMAGE}


def test_each_task_has_its_own_address_on_the_user_overlay_network(overlay, web):
    addresses = [ip_interface(overlay_address(t, overlay)) for t in web]
    assert len(set(addresses)) == 2
    assert all(a.network == OVERLAY for a in addresses)
    # What the swarm allocated (the network's own inspect can lag on a manager).
    driver = attachment(web[0], overlay)["Network"]["DriverState"]
    assert driver["Name"] == "overlay"
    assert int(driver["Options"]["com.docker.network.driver.overlay.vxlanid_list"]) > 0


def test_tasks_on_two_nodes_talk_over_the_overlay_through_vxlan(swarm, overlay, web):
    here, there = web
    peer = swarm.container_of(there)
    address = ip_interface(overlay_address(there, overlay)).ip
    # nc, as the kernel tier asks: the static busybox's wget crashes (exit 139) here.
    probe = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {address} 8000 | tail -n 1"
    # A task is "running" once its process is, before httpd listens: ask until it answers.
    expected = (0, peer.attrs["Config"]["Hostname"])

    def answer() -> tuple[int, str]:
        done = swarm.container_of(here).exec_run(["sh", "-c", probe])
        return done.exit_code, done.output.decode().strip()

    wait_for(lambda: answer() == expected, 60, 1, what=f"{expected} from the other task over vxlan")


# -- teardown ---------------------------------------------------------------

NS_KINDS = ("net:", "mnt:", "pid:", "uts:", "ipc:", "cgroup:", "user:", "time:")


def process_table() -> dict[int, tuple[int, str]]:
    """Every process: PID -> (parent PID, start time)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(table: dict[int, tuple[int, str]], roots: list[int]) -> dict[int, str]:
    found, todo = {}, list(roots)
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found[pid] = table[pid][1]
            todo += [child for child, (parent, _) in table.items() if parent == pid]
    return found


def comm(pid: int) -> str:
    """Its command name; "" once it has exited (dockerd runs short-lived helpers)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def links(directory: str) -> set[str]:
    """Namespace links in /proc/<pid>/ns or /proc/<pid>/fd."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            with contextlib.suppress(OSError):
                found.add(os.readlink(f"{directory}/{name}"))
    return {link for link in found if link.startswith(NS_KINDS)}


def mountinfo(pids) -> list[tuple[str, str, str]]:
    """(mount point, root, type) of every mount in the mount namespaces of ``pids``."""
    seen, mounts = set(), []
    for pid in pids:
        with contextlib.suppress(OSError):
            mnt = os.readlink(f"/proc/{pid}/ns/mnt")
            if mnt not in seen:
                seen.add(mnt)
                for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
                    fields = line.split()
                    mounts.append((fields[4], fields[3], fields[fields.index("-") + 1]))
    return mounts


def live_namespaces(pids) -> set[str]:
    """Namespaces that processes are in, hold open or bind-mount."""
    found = set()
    for pid in pids:
        found |= links(f"/proc/{pid}/ns") | links(f"/proc/{pid}/fd")
    return found | {root for _, root, kind in mountinfo(pids) if kind == "nsfs"}


@dataclass
class Footprint:
    """What a lab made that the host can see: its processes (PID and start
    time, so a reused PID is not one of them), the namespaces they are in or
    bind-mount other than the test's own, its veths (by namespace), its cgroup
    directories and its state directory; and, in remains(), any mount under
    that directory in any live mount namespace."""

    root: Path
    processes: dict[int, str]
    namespaces: set[str]
    veths: dict[str, str]
    cgroups: list[Path]

    @classmethod
    def of(cls, lab: SwarmLab) -> Footprint:
        holders = [n.proc.pid for n in lab.nodes] + [lab.switch.pid]  # type: ignore[union-attr]
        processes = descendants(process_table(), holders)
        veths = {
            f"{pid}:{line.split(':')[1].strip().split('@')[0]}": os.readlink(f"/proc/{pid}/ns/net")
            for pid in holders
            for line in in_netns(pid, "ip", "-o", "link", "show", "type", "veth").splitlines()
        }
        cgroups = [h / n.name for h in CGROUPS.iterdir() for n in lab.nodes if (h / n.name).exists()]
        namespaces = live_namespaces(processes) - live_namespaces([os.getpid()])
        return cls(lab.root, processes, namespaces, veths, cgroups)

    def remains(self) -> list[str]:
        table = process_table()
        alive = live_namespaces(table)
        everywhere = {point for point, _, _ in mountinfo(table)}
        return (
            [f"process {p}" for p, start in self.processes.items() if table.get(p, (0, ""))[1] == start]
            + [f"namespace {ns}" for ns in self.namespaces & alive]
            + [f"mount {m}" for m in everywhere if m.startswith(str(self.root))]
            + [f"veth {v}" for v, ns in self.veths.items() if ns in alive]
            + [f"cgroup {c}" for c in self.cgroups if c.exists()]
            + ([f"directory {self.root}"] if self.root.exists() else [])
        )


def test_teardown_leaves_no_process_namespace_mount_veth_or_cgroup(client):
    with swarm_lab(client) as lab:
        service = lab.service("gone", lab.overlay("gone", "10.231.2.0/24"), replicas=2)
        lab.wait_for_tasks(service, 2)
        made = Footprint.of(lab)
        commands = [command for p in made.processes if (command := comm(p))]
        # Before teardown the same check finds every kind of thing it looks for.
        before = {found.split()[0] for found in made.remains()}
    assert before == {"process", "namespace", "mount", "veth", "cgroup", "directory"}
    assert commands.count("dockerd") == commands.count("containerd") == 3
    # Three of everything a node is, at least, with the tasks' and overlays' own.
    assert len(made.processes) >= 3 * 4 + 1 and len(made.namespaces) >= 3 * 4 + 1
    assert len(made.veths) >= 6
    assert made.remains() == []


@pytest.mark.parametrize("step", ["_wire", "_form"])
def test_a_setup_that_fails_halfway_is_torn_down_all_the_same(client, monkeypatch, step):
    # A FAKE fault: the step is replaced by one that raises, since a real
    # setup cannot be made to fail halfway on demand; the teardown is real.
    seen = {}

    def fail(lab, *args):
        seen["made"] = Footprint.of(lab)
        raise RuntimeError(f"{step} failed on purpose")

    monkeypatch.setattr(SwarmLab, step, fail)
    with pytest.raises(RuntimeError, match="on purpose"), swarm_lab(client):
        pass
    made = seen["made"]
    assert len(made.processes) >= 3 * 2 + 1 and made.namespaces
    assert made.remains() == []
