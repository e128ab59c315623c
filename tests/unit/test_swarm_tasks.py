"""Unit tier: Swarm tasks as containers, and what changed between two task polls.

The JSON is dockerd 20.10's, as a three-node test swarm (tests/swarm_lab.py)
answered /tasks, /services and /nodes, trimmed of fields dockerlb does not read."""

import dataclasses
import json
from ipaddress import IPv4Address, IPv6Address

import pytest
from click.testing import CliRunner

from dockerlb.adapters.realserver import RealServerNetns
from dockerlb.adapters.swarm_source import (
    DOWN,
    SERVING,
    STOPPING,
    container_from_task,
    event_trigger,
    labelled,
    phases,
    poll_triggers,
    task_phase,
)
from dockerlb.app.controller import Controller
from dockerlb.app.server_prep import ServerPreparer
from dockerlb.core.desired import build_desired
from dockerlb.core.model import Container, NetworkAddress
from dockerlb.core.ports import Trigger
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import LAB, TEST_VIP_CIDRS, container
from tests.unit.test_cli_and_render import _settings_of, show

pytestmark = pytest.mark.unit

NET = {
    "ID": "t09q8ei5kxwsnkjk3ffufmoho",
    "Spec": {"Name": "shop_net", "Scope": "swarm"},
    "IPAMOptions": {"Configs": [{"Subnet": "10.231.1.0/24", "Gateway": "10.231.1.1"}]},
}
TASK = {
    "ID": "4j2mre42jz1wkqdei6atjbejg",
    "CreatedAt": "2026-12-04T07:41:27.87121421Z",
    "ServiceID": "w53rtmzojn31ie5t0dryqvh2h",
    "Slot": 2,
    "NodeID": "ezenq7qa1bi87q046ps14lnwa",
    "Status": {"State": "running", "Message": "started"},
    "DesiredState": "running",
    "NetworksAttachments": [{"Network": NET, "Addresses": ["10.231.1.3/24"]}],
}
SERVICE = {
    "ID": "w53rtmzojn31ie5t0dryqvh2h",
    "Spec": {
        "Name": "shop_web",
        "Labels": {
            "dockerlb.vip": "192.0.2.10:80",
            "dockerlb.weight": "3",
            "com.docker.stack.namespace": "shop",
        },
        "Mode": {"Replicated": {"Replicas": 2}},
    },
}
NODE = {
    "ID": "ezenq7qa1bi87q046ps14lnwa",
    "Spec": {"Role": "manager", "Availability": "active"},
    "Description": {"Hostname": "node-1"},
    "Status": {"State": "ready", "Addr": "198.18.231.11"},
}


def task(**changes) -> dict:
    """TASK with top-level fields replaced; ``state`` sets Status.State."""
    t = json.loads(json.dumps(TASK))
    if "state" in changes:
        t["Status"]["State"] = changes.pop("state")
    return t | changes


def test_a_running_task_is_a_container_named_by_service_and_slot_on_its_node():
    assert container_from_task(TASK, SERVICE, NODE) == Container(
        id="4j2mre42jz1wkqdei6atjbejg",
        name="shop_web.2",
        created="2026-12-04T07:41:27Z",
        labels={
            "dockerlb.vip": "192.0.2.10:80",
            "dockerlb.weight": "3",
            "com.docker.stack.namespace": "shop",
        },
        networks={"shop_net": NetworkAddress(IPv4Address("10.231.1.3"), None, IPv4Address("10.231.1.1"))},
        running=True,
        health=None,
        pid=0,
        node="node-1",
    )


def test_with_a_prefix_only_the_labels_dockerlb_reads_are_kept():
    c = container_from_task(TASK, SERVICE, NODE, prefix="dockerlb.")
    # The stack is the service's group (``desired.group_of``).
    assert dict(c.labels) == {
        "dockerlb.vip": "192.0.2.10:80",
        "dockerlb.weight": "3",
        "com.docker.stack.namespace": "shop",
    }


def test_a_global_services_task_has_no_slot_and_is_named_by_its_node_as_docker_does():
    global_task = task(Slot=0, NodeID="pqwmzcwzqk5sble29s1vei08z")
    assert container_from_task(global_task, SERVICE, None).name == "shop_web.pqwmzcwzqk5sble29s1vei08z"


def test_a_task_on_a_dual_stack_network_gets_both_addresses_and_gateways():
    net = NET | {
        "IPAMOptions": {
            "Configs": [
                {"Subnet": "10.231.1.0/24", "Gateway": "10.231.1.1"},
                {"Subnet": "fd00:231::/64", "Gateway": "fd00:231::1"},
            ]
        }
    }
    dual = task(NetworksAttachments=[{"Network": net, "Addresses": ["10.231.1.3/24", "fd00:231::3/64"]}])
    assert container_from_task(dual, SERVICE, NODE).networks == {
        "shop_net": NetworkAddress(
            IPv4Address("10.231.1.3"),
            IPv6Address("fd00:231::3"),
            IPv4Address("10.231.1.1"),
            IPv6Address("fd00:231::1"),
        )
    }


@pytest.mark.parametrize(
    ("desired", "state", "node_state", "phase"),
    [
        ("running", "running", "ready", SERVING),
        # Scaled down, updated or its node drained: still running its stop grace period.
        ("shutdown", "running", "ready", STOPPING),
        ("remove", "running", "ready", STOPPING),
        ("shutdown", "shutdown", "ready", DOWN),
        ("running", "failed", "ready", DOWN),
        ("running", "starting", "ready", DOWN),
        # Its node lost: Swarm still shows the last state the node reported.
        ("running", "running", "down", DOWN),
    ],
)
def test_a_tasks_phase_comes_from_its_desired_and_actual_states_and_its_node(
    desired, state, node_state, phase
):
    node = NODE | {"Status": {"State": node_state}}
    assert task_phase(task(DesiredState=desired, state=state), node) == phase


def test_a_task_whose_node_is_unknown_is_down():
    assert task_phase(TASK, None) == DOWN


def test_a_task_on_a_node_that_is_not_ready_is_listed_as_not_running():
    assert container_from_task(TASK, SERVICE, NODE | {"Status": {"State": "down"}}).running is False


def test_a_task_swarm_shuts_down_is_listed_running_and_stopping():
    c = container_from_task(task(DesiredState="shutdown"), SERVICE, NODE)
    assert (c.running, c.stopping) == (True, True)
    assert container_from_task(TASK, SERVICE, NODE).stopping is False


def test_a_full_pass_drains_a_listed_stopping_task_with_no_trigger_to_say_so():
    # A node back from a partition: its old task, which Swarm has replaced,
    # is listed again (running, desired shutdown) by the node event's full pass.
    web = {"dockerlb.vip": "1.2.3.4:80"}
    ipvs = MemoryIpvs()
    docker = MemoryDocker(
        [
            dataclasses.replace(container("web.1", web, nets={"lb": ("10.0.0.11", None)}), node="n2"),
            dataclasses.replace(
                container("web.2", web, nets={"lb": ("10.0.0.12", None)}), node="n3", stopping=True
            ),
        ]
    )
    Controller(Settings(vip_cidr=TEST_VIP_CIDRS), docker, ipvs, MemoryDirector()).reconcile(None)
    (service,) = ipvs.read(counters=False).table.values()
    assert sorted(f"{s} w{s.weight}" for s in service.servers.values()) == [
        "10.0.0.11:80 w1",
        "10.0.0.12:80 w0",
    ]


def test_only_services_with_a_label_under_the_prefix_are_kept():
    plain = {"ID": "s2", "Spec": {"Name": "db", "Labels": {"other.vip": "1"}}}
    bare = {"ID": "s3", "Spec": {"Name": "cache"}}
    assert list(labelled([SERVICE, plain, bare], "dockerlb.")) == ["w53rtmzojn31ie5t0dryqvh2h"]


def test_phases_cover_the_tasks_of_the_given_services_alone():
    other = task(ID="x1", ServiceID="unlabelled")
    stopping = task(ID="t2", DesiredState="shutdown")
    nodes = {"ezenq7qa1bi87q046ps14lnwa": NODE}
    found = phases([TASK, other, stopping], {"w53rtmzojn31ie5t0dryqvh2h": SERVICE}, nodes)
    assert found == {"4j2mre42jz1wkqdei6atjbejg": SERVING, "t2": STOPPING}


def test_a_task_that_begins_to_run_is_a_started_trigger():
    assert poll_triggers({"t1": DOWN}, {"t1": SERVING}, 7) == [Trigger("t1", "task running", 7, started=True)]
    assert poll_triggers({}, {"t1": SERVING}, 7) == [Trigger("t1", "task running", 7, started=True)]


def test_a_serving_task_that_swarm_shuts_down_drains_at_once():
    assert poll_triggers({"t1": SERVING}, {"t1": STOPPING}, 7) == [
        Trigger("t1", "task shutting down", 7, stopping=True)
    ]


def test_a_task_that_left_running_is_down_and_one_that_vanished_is_gone():
    before = {"t1": SERVING, "t2": STOPPING, "t3": SERVING}
    assert poll_triggers(before, {"t1": DOWN, "t3": SERVING}, 7) == [
        Trigger("t1", "task stopped", 7, down=True),
        Trigger("t2", "task removed", 7, down=True, gone=True),
    ]


def test_nothing_changed_or_a_task_that_never_ran_coming_and_going_is_no_trigger():
    assert poll_triggers({"t1": SERVING, "t2": STOPPING}, {"t1": SERVING, "t2": STOPPING}, 7) == []
    assert poll_triggers({"t4": DOWN}, {"t5": DOWN}, 7) == []


def test_service_and_node_events_are_full_pass_triggers():
    ev = {
        "Type": "service",
        "Action": "update",
        "Actor": {"ID": "w53rtmzojn31ie5t0dryqvh2h", "Attributes": {"name": "shop_web"}},
        "scope": "swarm",
        "timeNano": 1796370087866242367,
    }
    assert event_trigger(ev) == Trigger(None, "service update shop_web", 1796370087866242367)
    node = {"Type": "node", "Action": "update", "Actor": {"Attributes": {}}, "scope": "swarm", "timeNano": 5}
    assert event_trigger(node) == Trigger(None, "node update", 5)


def test_only_a_swarm_networks_own_changes_are_triggers():
    made = {"Type": "network", "Action": "create", "Actor": {"Attributes": {"name": "n"}}, "scope": "swarm"}
    assert event_trigger(made | {"timeNano": 5}) == Trigger(None, "network create n", 5)
    # A task joining a network is the poll's business; a node's local copy of an overlay is not news.
    assert event_trigger(made | {"Action": "connect"}) is None
    assert event_trigger(made | {"scope": "local"}) is None
    assert event_trigger({"Type": "container", "Action": "start", "scope": "local"}) is None


def test_swarm_mode_and_its_poll_interval_are_options_and_env_vars():
    result = CliRunner().invoke(show, [], env={"DOCKERLB_SWARM": "true", "DOCKERLB_SWARM_POLL": "0.5"})
    settings = _settings_of(result.output)
    assert (settings.swarm, settings.swarm_poll) == (True, 0.5)
    flagged = _settings_of(CliRunner().invoke(show, ["--swarm", "--swarm-poll", "3"]).output)
    assert (flagged.swarm, flagged.swarm_poll) == (True, 3.0)


def test_a_swarm_task_asking_for_its_own_namespace_is_left_out_naming_its_node_and_the_way_out():
    labels = {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr"}
    task_c = dataclasses.replace(container("web.1", labels), node="node-2")
    preparer = ServerPreparer(RealServerNetns(), director=None, masquerade=True, prefix="dockerlb.")  # type: ignore[arg-type]
    assert preparer.blocked(build_desired([task_c], policy=LAB).preps, {task_c.id: task_c}) == {
        "web.1": "its forwarding needs its own namespace set up, but it is a Swarm task (on node node-2) "
        "and dockerlb cannot enter another host's namespaces; in Swarm mode use forward=nat with masquerade"
    }
