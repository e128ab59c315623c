"""What a pass asks of the world, as the core names it: the triggers that
start a pass, and the ports it goes through (Docker, the kernel's IPVS
table, the director's namespace, the health checker, real servers'
namespaces, the clock).

Records and protocols only, no behaviour: the adapters implement the
ports, and so do the in-memory stand-ins the unit tests and benchmarks
drive the controller with (harness/memory_ports.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from dockerlb.core.announce import Route, SpeakerState
from dockerlb.core.model import (
    CheckState,
    CheckTarget,
    Container,
    DockerNetwork,
    IPAddress,
    ServerPrep,
    ServiceKey,
    Snapshot,
)
from dockerlb.core.plan import Write
from dockerlb.core.sync import SyncDaemon
from dockerlb.errors import DockerlbError


@dataclass(frozen=True)
class Trigger:
    """A reason to look again: one container, or everything (``container_id=None``).

    ``down``/``gone`` say the event itself proves the container no longer
    serves (it died, was SIGKILLed or paused) or no longer exists, so the
    controller need not inspect it: dockerd answers inspect only once it has
    finished tearing the container down, which can take seconds.
    """

    container_id: str | None
    reason: str
    time_nano: int = 0
    down: bool = False
    gone: bool = False
    # A network connect/disconnect: it matters only for a container already
    # running; one being started gets its own "start" event.
    network: bool = False
    # Docker began stopping it (a stop signal before "die"): drain it now.
    stopping: bool = False
    # It (re)started: any stop under way is over.
    started: bool = False
    # A kill's signal as the event says it. Docker merges the container's
    # labels into the event's attributes, so a label named "signal" hides
    # the real one: the controller distrusts it for such a container.
    signal: str = ""


FULL_RESYNC = Trigger(None, "full resync")


class Stopping(Protocol):
    """What says a stream should end (a ``threading.Event``)."""

    def is_set(self) -> bool: ...


class Clock(Protocol):
    """Where a pass takes its time from (the loop's and the tests' own)."""

    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    def time_ns(self) -> int: ...


class DockerPort(Protocol):
    def list_containers(self, detailed: Callable[[Container], bool] | None = None) -> list[Container]: ...
    def networks(self) -> list[DockerNetwork]: ...
    def network(self, name: str) -> DockerNetwork | None:
        """One network with its members' addresses; None when there is none of that name."""
        ...

    def inspect(self, container_id: str) -> Container | None: ...
    def events(self, since: float, stop: Stopping) -> Iterator[Trigger]: ...
    def stop_events(self) -> None: ...
    def ping(self) -> None: ...


class IpvsPort(Protocol):
    def read(self, counters: bool = True, keys: Iterable[ServiceKey] | None = None) -> Snapshot:
        """Every service with its servers; with ``keys``, only those services' servers."""
        ...

    def write_all(self, writes: Sequence[Write]) -> list[DockerlbError | None]:
        """Each write in order, batched; one result per write."""
        ...

    def write(self, write: Write) -> None:
        """One write alone, its failure raised (a busy kernel retried)."""
        ...

    def services(self) -> frozenset[ServiceKey]:
        """The services in the namespace, without their servers."""
        ...

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None: ...
    def daemons(self) -> frozenset[SyncDaemon]: ...
    def start_daemon(self, daemon: SyncDaemon) -> None: ...
    def stop_daemon(self, state: str) -> None: ...


class DirectorPort(Protocol):
    def prepare(self) -> None: ...
    def addresses(self) -> dict[IPAddress, str]: ...
    def local_addresses(self) -> dict[IPAddress, str]: ...
    def interfaces(self) -> dict[IPAddress, str]:
        """The addresses on the director's own interfaces -> each one's interface name."""
        ...

    def vips(self) -> frozenset[IPAddress]: ...
    def add_vips(self, vips: Sequence[IPAddress]) -> Sequence[DockerlbError | None]:
        """Each VIP put on the director's interface: its error, or None."""
        ...

    def remove_vip(self, vip: IPAddress) -> None: ...
    def sync_masquerade(self, keys: Iterable[ServiceKey], force: bool = False) -> None: ...
    def rules_changed(self) -> bool:
        """Whether the nftables ruleset may have changed since this port last wrote it."""
        ...

    def record_owners(self, owners: Mapping[ServiceKey, str], force: bool = False) -> None: ...
    def recorded_owners(self) -> dict[ServiceKey, str]: ...
    def sync_filter(self, interface: str, peers: Iterable[IPAddress] | None) -> None:
        """Sync packets on ``interface`` only from ``peers``; None (or no
        interface): no such rule at all."""
        ...

    def restore_forwarding(self) -> None: ...


class HealthPort(Protocol):
    def start(self, on_change: Callable[[str, str], None]) -> None: ...
    def watch(self, targets: Iterable[CheckTarget], serving: Iterable[CheckTarget] = ()) -> None: ...
    def known(self) -> set[CheckTarget]: ...
    def states(self) -> dict[str, CheckState]: ...


class PreparerPort(Protocol):
    """Sets up real servers' own namespaces (DR, TUN, routed NAT)."""

    def blocked(
        self, preps: Mapping[str, ServerPrep], containers: Mapping[str, Container]
    ) -> dict[str, str]: ...
    def prepare(
        self, preps: Mapping[str, ServerPrep], containers: Mapping[str, Container], full: bool
    ) -> dict[str, str]: ...
    def release(self, preps: Mapping[str, ServerPrep], containers: Mapping[str, Container]) -> None: ...


class AnnouncePort(Protocol):
    """dockerlb's routes of announced VIPs in the director (its own table and proto)."""

    def routes(self) -> frozenset[Route]: ...
    def add(self, route: Route) -> None: ...
    def remove(self, route: Route) -> None: ...


class SpeakerPort(Protocol):
    """The BGP speaker beside the director (BIRD), asked how it is."""

    def state(self) -> SpeakerState: ...
