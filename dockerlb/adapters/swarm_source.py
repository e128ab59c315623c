"""The Swarm adapter (``--swarm``): the running tasks of labelled services as containers.

Beside ``docker_source`` and with the same port. It talks to a manager: the
labels are the service's (compose ``deploy.labels``), each running task is one
``model.Container`` (id: the task's), at its address on each network it is
attached to, on whichever node runs it.

Docker sends no task events (moby #37403), only service, node and network
ones. So, as Traefik's Swarm provider does, tasks are polled: every
``swarm_poll`` seconds the listing is compared with the one before, and each
task that started, began to shut down, stopped or vanished becomes a trigger.
The manager's event stream is read by a thread of its own into a queue; the
poll runs whenever that queue stays quiet until the next poll is due.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from ipaddress import ip_interface
from typing import Any

from loguru import logger

from dockerlb.adapters.docker_source import EngineConnection, translated
from dockerlb.core.desired import kept_labels
from dockerlb.core.labels import has_prefix
from dockerlb.core.model import Container, NetworkAddress, parse_ip
from dockerlb.core.ports import Stopping, Trigger
from dockerlb.errors import ConfigError, ContainerGone
from dockerlb.settings import Settings

# A task's phase as far as a load balancer cares. A task is "stopping" while
# Swarm wants it shut down (scale-down, update, node drain) and its process
# still runs: the stop grace period, during which it must drain.
SERVING, STOPPING, DOWN = "serving", "stopping", "down"
# Object events that can change which tasks serve or how: a service's labels
# or replicas, a node's availability or state, a swarm network's subnets.
SWARM_TYPES = ("service", "node", "network")
NETWORK_ACTIONS = frozenset({"create", "update", "remove", "destroy"})
_END = object()  # the event stream ended
Objects = dict[str, Mapping[str, Any]]  # id -> a service's or a node's JSON


def task_phase(task: Mapping[str, Any], node: Mapping[str, Any] | None) -> str:
    """SERVING, STOPPING or DOWN. A task on a node that is not ready is down
    whatever it last reported: nothing on that node answers (and Swarm keeps
    saying "running" for a lost node's tasks)."""
    running = (task.get("Status") or {}).get("State") == "running"
    if not running or node is None or (node.get("Status") or {}).get("State") != "ready":
        return DOWN
    return SERVING if task.get("DesiredState") == "running" else STOPPING


def task_name(task: Mapping[str, Any], service: Mapping[str, Any]) -> str:
    """ "web.2" for a replicated service's slot 2; a global service's tasks have
    no slot, and Docker names them by node: "web.<node id>"."""
    name = str((service.get("Spec") or {}).get("Name") or service.get("ID") or "?")
    slot = task.get("Slot")
    return f"{name}.{slot}" if slot else f"{name}.{task.get('NodeID') or '?'}"


def task_networks(task: Mapping[str, Any]) -> dict[str, NetworkAddress]:
    """Network name -> the task's addresses on it ("10.231.1.3/24"), with the
    network's gateways as its IPAM has them."""
    networks = {}
    for attached in task.get("NetworksAttachments") or []:
        network = attached.get("Network") or {}
        name = str((network.get("Spec") or {}).get("Name") or network.get("ID") or "?")
        v4 = v6 = None
        for text in attached.get("Addresses") or []:
            address = ip_interface(text).ip
            if address.version == 4:
                v4 = v4 or address
            else:
                v6 = v6 or address
        gw4, gw6 = _gateways(network)
        networks[name] = NetworkAddress(v4, v6, gw4, gw6)
    return networks


def _gateways(network: Mapping[str, Any]) -> tuple[Any, Any]:
    gw4 = gw6 = None
    for config in (network.get("IPAMOptions") or {}).get("Configs") or []:
        with contextlib.suppress(ValueError, TypeError):
            gateway = parse_ip(config.get("Gateway") or "")
            if gateway.version == 4:
                gw4 = gw4 or gateway
            else:
                gw6 = gw6 or gateway
    return gw4, gw6


def container_from_task(
    task: Mapping[str, Any],
    service: Mapping[str, Any],
    node: Mapping[str, Any] | None,
    prefix: str | None = None,
) -> Container:
    """A task as a container: the service's labels (only those dockerlb reads,
    with ``prefix``), created to the second as docker_source has it, no PID
    (the task may run on another host), no Docker health (Swarm says
    "running" only once a HEALTHCHECK passed, if the image has one), and
    ``stopping`` while Swarm shuts it down."""
    labels = dict((service.get("Spec") or {}).get("Labels") or {})
    phase = task_phase(task, node)
    return Container(
        id=str(task["ID"]),
        name=task_name(task, service),
        created=str(task.get("CreatedAt") or "")[:19] + "Z",
        labels=labels if prefix is None else kept_labels(labels, prefix),
        networks=task_networks(task),
        running=phase != DOWN,
        health=None,
        pid=0,
        node=str(((node or {}).get("Description") or {}).get("Hostname") or ""),
        # A full pass must drain it too, not only the poll that saw it change:
        # a node back from a partition brings tasks Swarm has since replaced.
        stopping=phase == STOPPING,
    )


def labelled(services: Iterable[Mapping[str, Any]], prefix: str) -> dict[str, Mapping[str, Any]]:
    """Service id -> service, for services with a label under the prefix."""
    return {
        str(s["ID"]): s for s in services if has_prefix((s.get("Spec") or {}).get("Labels") or {}, prefix)
    }


def phases(
    tasks: Iterable[Mapping[str, Any]],
    services: Mapping[str, Any],
    nodes: Mapping[str, Mapping[str, Any]],
) -> dict[str, str]:
    """Task id -> phase, for the tasks of these (labelled) services."""
    return {
        str(t["ID"]): task_phase(t, nodes.get(str(t.get("NodeID") or "")))
        for t in tasks
        if t.get("ServiceID") in services
    }


def poll_triggers(before: Mapping[str, str], after: Mapping[str, str], when: int) -> list[Trigger]:
    """What changed between two polls, as triggers. Only tasks that served or
    were stopping before can leave; a task that never ran and is gone is
    nothing to anyone."""
    found = []
    for tid, phase in after.items():
        was = before.get(tid)
        if phase == SERVING and was != SERVING:
            found.append(Trigger(tid, "task running", when, started=True))
        elif phase == STOPPING and was != STOPPING:
            found.append(Trigger(tid, "task shutting down", when, stopping=True))
        elif phase == DOWN and was in (SERVING, STOPPING):
            found.append(Trigger(tid, "task stopped", when, down=True))
    for tid, was in before.items():
        if tid not in after and was in (SERVING, STOPPING):
            found.append(Trigger(tid, "task removed", when, down=True, gone=True))
    return found


def event_trigger(ev: Mapping[str, Any]) -> Trigger | None:
    """A manager's event as a trigger for a full pass, or None. Service and
    node events: any of them may change many tasks at once. Network ones: a
    swarm network made or removed changes the address space VIPs must avoid;
    a task joining a network is the poll's business."""
    kind, action = ev.get("Type"), str(ev.get("Action") or "")
    if kind == "network" and (action not in NETWORK_ACTIONS or ev.get("scope") != "swarm"):
        return None
    if kind not in SWARM_TYPES:
        return None
    name = ((ev.get("Actor") or {}).get("Attributes") or {}).get("name") or ""
    return Trigger(None, f"{kind} {action} {name}".strip(), int(ev.get("timeNano") or time.time_ns()))


class SwarmSource(EngineConnection):
    """The Docker port over a Swarm manager: ``base_url`` names its engine
    (unix://..., tcp://...); None: the environment's (DOCKER_HOST, ...)."""

    def __init__(self, settings: Settings, base_url: str | None = None) -> None:
        super().__init__(base_url, "the Swarm manager's engine")
        self._prefix = settings.label_prefix
        self._poll_every = settings.swarm_poll
        self._wake: queue.Queue[Any] | None = None
        # Phases as the last listing saw them: where the first poll starts.
        self._listed: dict[str, str] = {}

    def ping(self) -> None:
        """The engine answers, as a manager of a swarm that has a leader: the
        loop pings before it listens again, and a manager that answers /_ping
        but 503 to /tasks (no leader yet after a restart, or no manager at
        all) would make every poll fail at once, over and over."""
        with translated():
            self._client.api.ping()
            self._client.api.nodes(filters={"role": "manager"})

    def pid_of(self, name: str) -> int:
        raise ConfigError(
            f"--netns container:{name} does not apply in Swarm mode (--swarm): a task's PID is on "
            "whichever node runs it; give the director's namespace as '', a name or a path"
        )

    # -- tasks -----------------------------------------------------------------
    def list_containers(self, detailed: Callable[[Container], bool] | None = None) -> list[Container]:
        """Every task of a labelled service, running or not (``detailed`` is moot: a
        task's PID is on its node, which may be another host)."""
        services, tasks, nodes = self._read()
        found = [
            container_from_task(t, services[t["ServiceID"]], nodes.get(t.get("NodeID") or ""), self._prefix)
            for t in tasks
            if t.get("ServiceID") in services
        ]
        self._listed = phases(tasks, services, nodes)
        # Tasks that no longer run too: while its service exists, a stack
        # keeps its claim on its VIPs (core/ownership.py).
        return found

    def _read(self) -> tuple[Objects, list[dict[str, Any]], Objects]:
        """Labelled services, every task, every node: three requests, whatever the size."""
        with translated():
            services = labelled(self._client.api.services(), self._prefix)
            tasks: list[dict[str, Any]] = self._client.api.tasks() if services else []
            nodes: Objects = {str(n["ID"]): n for n in self._client.api.nodes()} if tasks else {}
        return services, tasks, nodes

    def inspect(self, container_id: str) -> Container | None:
        """The task as it is now, or None when it (or its service) no longer exists."""
        try:
            with translated():
                task = self._client.api.inspect_task(container_id)
                service = self._client.api.inspect_service(task["ServiceID"])
        except ContainerGone:
            return None
        node = None
        with contextlib.suppress(ContainerGone), translated():  # a node removed: its task is down
            node = self._client.api.inspect_node(task["NodeID"]) if task.get("NodeID") else None
        return container_from_task(task, service, node, self._prefix)

    # -- events ----------------------------------------------------------------
    def events(self, since: float, stop: Stopping) -> Iterator[Trigger]:
        """Full-pass triggers from the manager's events since ``since``, and
        per-task triggers from a poll every ``swarm_poll`` seconds. Ends
        (raising DockerUnavailable) when the stream or a poll fails;
        ``stop_events`` from another thread ends it quietly and at once."""
        wake: queue.Queue[Any] = queue.Queue()
        with translated():
            stream = self._client.api.events(
                since=f"{since:.9f}",  # type: ignore[call-overload]
                decode=True,
                filters={"type": list(SWARM_TYPES)},
            )
        self._stream, self._wake = stream, wake
        if stop.is_set():  # set (then stop_events found nothing) before the subscription
            wake.put(_END)
        reader = threading.Thread(target=_read_stream, args=(stream, wake), name="swarm-events", daemon=True)
        reader.start()
        # The first poll starts where the last listing left off: that listing
        # already said which tasks stop (Container.stopping drains them).
        before = dict(self._listed)
        due = time.monotonic()
        try:
            while True:
                try:
                    item = wake.get(timeout=max(0.0, due - time.monotonic()))
                except queue.Empty:
                    before, triggers = self._poll(before)
                    yield from triggers
                    due = time.monotonic() + self._poll_every
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop_events()
            reader.join(timeout=5)
            self._stream = self._wake = None

    def _poll(self, before: Mapping[str, str]) -> tuple[dict[str, str], list[Trigger]]:
        services, tasks, nodes = self._read()
        after = phases(tasks, services, nodes)
        triggers = poll_triggers(before, after, time.time_ns())
        for t in triggers:
            logger.debug("swarm poll: {} {}", t.reason, (t.container_id or "")[:12])
        return after, triggers

    def stop_events(self) -> None:
        wake = self._wake
        if wake is not None:
            wake.put(_END)  # the generator may be waiting for the next poll
        super().stop_events()


def _read_stream(stream: Any, wake: queue.Queue[Any]) -> None:
    """The event stream into ``wake``: triggers, then the end, or the error
    (translated) that ended it. A thread: reading blocks until an event."""
    try:
        with translated():
            for ev in stream:
                trigger = event_trigger(ev)
                if trigger is not None:
                    wake.put(trigger)
    except Exception as e:  # handed to the generator, which raises it in its own thread
        wake.put(e)
    wake.put(_END)
