"""In-memory stand-ins for the controller's ports: for unit tests and benchmarks
(bench/ imports them from here).

These are NOT the real adapters (``DockerSource``, ``IpvsAdapter``,
``Director``): no Docker engine, no netlink, no kernel behind them. They
keep in a few dicts what those would hold, so the real ``Controller`` can
be driven natively at any scale, and how much of a pass is the controller's
own Python measured. The real adapters are tested in the kernel tier
(tests/kernel), against a real IPVS kernel and a real dockerd; nothing here
says they behave as these do.

What they keep of the real ones' behaviour:
- ``MemoryDocker`` lists the containers that carry a label under the
  prefix, in any state (as ``DockerSource.list_containers`` asks dockerd);
  ``inspect`` answers for any container until it is destroyed;
- ``MemoryIpvs`` applies each ``Write`` as the kernel would: in order, a
  failed one not stopping the next, EEXIST and ENOENT/ESRCH as
  ``IpvsExists`` and ``IpvsNotFound`` (the errors ``IpvsAdapter`` translates
  them into); it stores what the kernel stores (no container names), and a
  ``read`` builds new records every time, as the real adapter does when it
  parses a dump;
- ``MemoryDirector`` holds the VIPs on its interface, and has no addresses
  of its own;
- ``MemoryRoutes`` holds dockerlb's announce routes (adding one there is
  no error, removing one gone is none: as ``RouteTable`` treats EEXIST and
  ESRCH); ``MemorySpeaker`` answers what it is told to.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address

from dockerlb.core.announce import Route, Session, SpeakerState
from dockerlb.core.model import (
    SCHEDULERS,
    Container,
    DockerNetwork,
    IPAddress,
    RealServer,
    ServerStats,
    Service,
    ServiceKey,
    Snapshot,
    VirtualService,
)
from dockerlb.core.plan import ADD, EDIT, REMOVE, Write
from dockerlb.core.ports import Trigger
from dockerlb.core.sync import SyncDaemon
from dockerlb.errors import DockerlbError, IpvsExists, IpvsNotFound, IpvsRejected

_NO_COUNTERS = ServerStats()


class MemoryDocker:
    """Stands for ``DockerSource``: containers and networks in dicts."""

    def __init__(
        self, containers: Iterable[Container] = (), networks: Iterable[DockerNetwork] = (), prefix="dockerlb."
    ) -> None:
        self._prefix = prefix
        self._starts = itertools.count(1)  # what each start stamps, as State.StartedAt
        self._containers: dict[str, Container] = {c.id: self._started(c) for c in containers}
        self._networks = list(networks)
        self._events: queue.Queue[Trigger | None] = queue.Queue()
        self.listings = 0  # how many times the containers were listed

    # -- what the bench or a test does to "Docker" ----------------------------
    def start(self, c: Container) -> None:
        """A container is created and started (or an exited one starts again)."""
        self._containers[c.id] = self._started(c)

    def _started(self, c: Container) -> Container:
        return replace(c, started=f"start {next(self._starts)}")

    def die(self, container_id: str) -> None:
        """Its process exited: not running, still listed and inspectable."""
        self._containers[container_id] = replace(self._containers[container_id], running=False)

    def pause(self, container_id: str) -> None:
        """Paused: not running, still listed (dockerd lists paused ones), still inspectable."""
        self._containers[container_id] = replace(self._containers[container_id], running=False)

    def unpause(self, container_id: str) -> None:
        self._containers[container_id] = replace(self._containers[container_id], running=True)

    def destroy(self, container_id: str) -> None:
        """Removed: inspect finds nothing."""
        self._containers.pop(container_id, None)

    def emit(self, trigger: Trigger) -> None:
        """Hand a trigger to whoever iterates ``events``."""
        self._events.put(trigger)

    # -- the port -----------------------------------------------------------------
    def list_containers(self, detailed: Callable[[Container], bool] | None = None) -> list[Container]:
        # Every record here is complete (as inspect gives it): ``detailed`` has nothing to add.
        self.listings += 1
        return [c for c in self._containers.values() if any(k.startswith(self._prefix) for k in c.labels)]

    def networks(self) -> list[DockerNetwork]:
        return list(self._networks)

    def network(self, name: str) -> DockerNetwork | None:
        return next((n for n in self._networks if n.name == name), None)

    def set_networks(self, networks: Iterable[DockerNetwork]) -> None:
        """Networks made, removed, joined or left."""
        self._networks = list(networks)

    def inspect(self, container_id: str) -> Container | None:
        return self._containers.get(container_id)

    def events(self, since: float, stop=None) -> Iterator[Trigger]:
        """What ``emit`` hands in, until ``stop_events`` (``since`` is ignored)."""
        if stop is not None and stop.is_set():
            return
        while (trigger := self._events.get()) is not None:
            yield trigger

    def stop_events(self) -> None:
        self._events.put(None)

    def ping(self) -> None:
        return None


@dataclass
class _Entry:
    service: Service
    servers: dict[tuple[IPAddress, int], RealServer] = field(default_factory=dict)


class MemoryIpvs:
    """Stands for ``IpvsAdapter``: one namespace's IPVS table in a dict."""

    def __init__(self) -> None:
        self._table: dict[ServiceKey, _Entry] = {}
        self.timeouts = (0, 0, 0)
        self.writes = 0  # every write applied or refused, batched or alone
        self.reads = 0
        self.slices = 0
        self.listings = 0
        # Real servers at these addresses have one established connection
        # (a drain waits for it); every other gauge and counter is zero.
        self.busy: set[IPAddress] = set()
        self.sync: dict[str, SyncDaemon] = {}  # the running sync daemons, by state
        self.no_such_interface: set[str] = set()  # starting a daemon here fails as in the kernel

    # -- reading -----------------------------------------------------------
    def read(self, counters: bool = True, keys: Iterable[ServiceKey] | None = None) -> Snapshot:
        """Every service with its real servers (or those of ``keys``), as new
        records (the real adapter parses a fresh dump on every read). No
        traffic here but ``busy``'s connections. ``reads`` counts whole
        reads, ``slices`` the reads of some services."""
        if keys is None:
            self.reads += 1
        else:
            self.slices += 1
        wanted = None if keys is None else set(keys)
        table: dict[ServiceKey, VirtualService] = {}
        stats: dict[tuple[ServiceKey, tuple[IPAddress, int]], ServerStats] = {}
        service_stats: dict[ServiceKey, ServerStats] = {}
        for entry in self._table.values():
            if wanted is not None and entry.service.key not in wanted:
                continue
            service = _copy_service(entry.service)
            key = service.key
            service_stats[key] = ServerStats() if counters else _NO_COUNTERS
            servers = []
            for s in entry.servers.values():
                server = RealServer(_copy_addr(s.addr), s.port, s.weight, s.forward)
                servers.append(server)
                stats[(key, server.ident)] = ServerStats(active=int(s.addr in self.busy))
            table[key] = VirtualService.of(service, servers)
        return Snapshot(table, stats, service_stats)

    def services(self) -> frozenset[ServiceKey]:
        """The services' keys alone (one dump, no servers)."""
        self.listings += 1
        return frozenset(self._table)

    def servers(self) -> int:
        """How many real servers the table holds."""
        return sum(len(e.servers) for e in self._table.values())

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        old = self.timeouts
        self.timeouts = (tcp or old[0], tcpfin or old[1], udp or old[2])

    # -- sync daemons: one per state, as the kernel keeps them ---------------
    def daemons(self) -> frozenset[SyncDaemon]:
        return frozenset(self.sync.values())

    def start_daemon(self, daemon: SyncDaemon) -> None:
        if daemon.interface in self.no_such_interface:
            raise IpvsRejected("IPVS rejected the request (ENODEV: no such device)")
        if daemon.state in self.sync:
            raise IpvsExists("IPVS: already exists (EEXIST)")
        self.sync[daemon.state] = daemon

    def stop_daemon(self, state: str) -> None:
        if self.sync.pop(state, None) is None:
            raise IpvsNotFound("IPVS: not found (ESRCH)")

    # -- writing -----------------------------------------------------------
    def write_all(self, writes: Sequence[Write]) -> list[DockerlbError | None]:
        """Each write in order; a failure is that write's result alone."""
        results: list[DockerlbError | None] = []
        for w in writes:
            try:
                self.write(w)
            except DockerlbError as e:
                results.append(e)
            else:
                results.append(None)
        return results

    def write(self, w: Write) -> None:
        """One write, as net/netfilter/ipvs/ip_vs_ctl.c answers it."""
        self.writes += 1
        key = w.service.key
        entry = self._table.get(key)
        if w.server is None:
            if w.verb in (ADD, EDIT) and w.service.scheduler not in SCHEDULERS:
                raise IpvsNotFound(f"IPVS: not found (ENOENT; no scheduler {w.service.scheduler!r})")
            if w.verb == ADD:
                if entry is not None:
                    raise IpvsExists(f"IPVS: already exists (EEXIST; service {key})")
                self._table[key] = _Entry(_copy_service(w.service))
            elif entry is None:
                raise IpvsNotFound(f"IPVS: not found (ESRCH; service {key})")
            elif w.verb == EDIT:
                entry.service = _copy_service(w.service)
            else:
                del self._table[key]
            return
        if entry is None:
            raise IpvsNotFound(f"IPVS: not found (ESRCH; service {key})")
        s = w.server
        ident = (s.addr, s.port)
        if w.verb == ADD:
            if ident in entry.servers:
                raise IpvsExists(f"IPVS: already exists (EEXIST; server {s} of {key})")
        elif ident not in entry.servers:
            raise IpvsNotFound(f"IPVS: not found (ENOENT; server {s} of {key})")
        if w.verb == REMOVE:
            del entry.servers[ident]
        else:
            # The kernel knows no container names.
            entry.servers[ident] = RealServer(s.addr, s.port, s.weight, s.forward)


class MemoryDirector:
    """Stands for ``Director``: the VIPs on its interface; its own addresses
    only as a test sets them, no nftables (the masquerade set and the sync
    filter are only remembered)."""

    def __init__(self) -> None:
        self._vips: set[IPAddress] = set()
        self.masquerade: frozenset[ServiceKey] = frozenset()
        self.owners: dict[ServiceKey, str] = {}  # the owners' record (nft, in the real one)
        self.prepared = False
        self.own: dict[IPAddress, str] = {}  # addresses on its other interfaces (keepalived's, say)
        self.ifaces: dict[IPAddress, str] = {}  # address -> its interface's name
        # The sync filter as last set: (interface, the peers' addresses); None: no filter.
        self.sync_filtered: tuple[str, tuple[str, ...]] | None = None

    def prepare(self) -> None:
        self.prepared = True

    def addresses(self) -> dict[IPAddress, str]:
        return {}

    def local_addresses(self) -> dict[IPAddress, str]:
        return dict(self.own)

    def interfaces(self) -> dict[IPAddress, str]:
        return dict(self.ifaces)

    def vips(self) -> frozenset[IPAddress]:
        return frozenset(self._vips)

    def add_vips(self, vips: Sequence[IPAddress]) -> list[DockerlbError | None]:
        results: list[DockerlbError | None] = []
        for vip in vips:
            try:
                self.add_vip(vip)
            except DockerlbError as e:
                results.append(e)
            else:
                results.append(None)
        return results

    def add_vip(self, vip: IPAddress) -> None:
        self._vips.add(vip)

    def remove_vip(self, vip: IPAddress) -> None:
        self._vips.discard(vip)

    def sync_masquerade(self, keys: Iterable[ServiceKey], force: bool = False) -> None:
        self.masquerade = frozenset(keys)

    def rules_changed(self) -> bool:
        return True  # nothing to compare with: every full pass rewrites, as with no generation

    def record_owners(self, owners: Mapping[ServiceKey, str], force: bool = False) -> None:
        self.owners = dict(owners)

    def recorded_owners(self) -> dict[ServiceKey, str]:
        return dict(self.owners)

    def sync_filter(self, interface: str, peers: Iterable[IPAddress] | None) -> None:
        if not interface or peers is None:
            self.sync_filtered = None
        else:
            self.sync_filtered = (interface, tuple(sorted(str(p) for p in peers)))

    def restore_forwarding(self) -> None:
        return None


def _copy_addr(addr: IPAddress) -> IPAddress:
    return IPv4Address(int(addr)) if addr.version == 4 else IPv6Address(int(addr))


def _copy_service(service: Service) -> Service:
    key = service.key
    return Service(
        ServiceKey(key.proto, _copy_addr(key.vip), key.port), service.scheduler, service.persistence
    )


class MemoryRoutes:
    """dockerlb's routes in its announce table; ``failing``: a FAKE fault
    (the kernel refusing a route), raised by every add and remove while set."""

    def __init__(self) -> None:
        self.table: set[Route] = set()
        self.failing: DockerlbError | None = None
        self.reads = 0

    def routes(self) -> frozenset[Route]:
        self.reads += 1
        return frozenset(self.table)

    def add(self, route: Route) -> None:
        if self.failing is not None:
            raise self.failing
        self.table.add(route)

    def remove(self, route: Route) -> None:
        if self.failing is not None:
            raise self.failing
        self.table.discard(route)

    def vips(self) -> list[str]:
        return sorted(str(r.vip) for r in self.table)


@dataclass
class MemorySpeaker:
    """The speaker's answer, as the test sets it."""

    answer: SpeakerState = field(
        default_factory=lambda: SpeakerState("BIRD 2.0.12", (Session("uplink", "up", "Established"),))
    )

    def state(self) -> SpeakerState:
        return self.answer
