"""Frozen records the whole controller speaks in; no behaviour, no side effects.

Identity is explicit: a service is its ``ServiceKey``; a real server inside a
service is its ``(addr, port)``. Everything else on a record is a setting
that can change in place.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address


class Proto(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


class Forward(enum.StrEnum):
    """IPVS forwarding methods, by the names the labels use."""

    NAT = "nat"  # ipvsadm -m, "Masq"
    DR = "dr"  # ipvsadm -g, "Route"
    TUN = "tun"  # ipvsadm -i, "Tunnel"


class Role(enum.StrEnum):
    """What a running container is to its services right now."""

    SERVE = "serve"  # a real server at its label's weight
    PENDING = "pending"  # not yet (health starting, checks not passed): not a server
    DRAIN = "drain"  # weight 0: no new connections, established ones finish
    RETIRED = "retired"  # drained, or its drain timed out, while still running: not a server


class CheckState(enum.StrEnum):
    """dockerlb's own health check of one container (``dockerlb.check``)."""

    PENDING = "pending"  # has not passed ``rise`` times in a row yet, ever
    UP = "up"
    DOWN = "down"  # failed ``fall`` times in a row after having been up


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """dockerlb's own check of one real server, run from the director's
    namespace (``dockerlb.check``); counts as keepalived and HAProxy do."""

    kind: str  # "tcp": the port accepts a connection; "http": GET ``path``
    path: str = "/"
    status: int | None = None  # expected HTTP status; None: any 2xx or 3xx
    interval: float = 2.0  # seconds between checks
    timeout: float = 1.0  # seconds one check may take
    rise: int = 2  # passes in a row that make a server up
    fall: int = 3  # failures in a row that make it down

    def __str__(self) -> str:
        return "tcp" if self.kind == "tcp" else f"http:{self.path}"


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """One check to run: where, and how."""

    container_id: str
    container: str  # name, for people
    addr: IPAddress
    port: int
    check: HealthCheck


# The schedulers Linux ships (net/netfilter/ipvs/ip_vs_*.c). Whether a given
# kernel has the module loaded or loadable is only known when IPVS answers.
SCHEDULERS = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"}
)


@dataclass(frozen=True, slots=True)
class ServiceKey:
    proto: Proto
    vip: IPAddress
    port: int
    # Its hash, made once: every table, set and index is keyed by services,
    # and hashing an address runs Python code (``ipaddress``): rehashing the
    # 1,000 keys of a table was a third of an event pass (issue 31).
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.proto, self.vip, self.port)))

    def __hash__(self) -> int:
        return self._hash

    def sort_key(self) -> tuple[int, int, int, str]:
        # IPv4 and IPv6 addresses do not compare with each other; this does.
        return (*addr_order(self.vip), self.port, self.proto.value)

    def __str__(self) -> str:
        return f"{self.proto.upper()} {format_endpoint(self.vip, self.port)}"


@dataclass(frozen=True, slots=True)
class Service:
    key: ServiceKey
    scheduler: str = "wlc"
    persistence: int = 0  # seconds; 0 = off

    def settings(self) -> tuple[str, int]:
        """What can change on a live service without re-creating it."""
        return (self.scheduler, self.persistence)


@dataclass(frozen=True, slots=True)
class RealServer:
    addr: IPAddress
    port: int
    weight: int = 1
    forward: Forward = Forward.NAT
    # Which container this server stands for: shown to people, never compared.
    container: str = field(default="", compare=False)
    # Connection thresholds (ipvsadm -x / -y; 0: none): at ``upper`` active
    # plus inactive connections the kernel sends the server nothing new
    # until they fall below ``lower``.
    upper_threshold: int = 0
    lower_threshold: int = 0

    @property
    def ident(self) -> tuple[IPAddress, int]:
        return (self.addr, self.port)

    def settings(self) -> tuple[int, Forward, int, int]:
        return (self.weight, self.forward, self.upper_threshold, self.lower_threshold)

    def __str__(self) -> str:
        return format_endpoint(self.addr, self.port)


@dataclass(frozen=True, slots=True)
class VirtualService:
    """One service with its real servers, keyed by their identity."""

    service: Service
    servers: Mapping[tuple[IPAddress, int], RealServer]

    @classmethod
    def of(cls, service: Service, servers: list[RealServer] | tuple[RealServer, ...] = ()):
        return cls(service, {s.ident: s for s in servers})


# The whole table, desired or actual: ServiceKey -> VirtualService.
Table = Mapping[ServiceKey, VirtualService]


@dataclass(frozen=True, slots=True)
class KernelState:
    """What the director's kernel holds, split by ownership.

    ``owned`` are services on VIPs the controller put on its interface;
    ``foreign`` are the keys of every other service, never to be touched.
    """

    owned: Table
    vips: frozenset[IPAddress]
    foreign: frozenset[ServiceKey] = frozenset()


@dataclass(frozen=True, slots=True)
class ServerStats:
    """The kernel's figures for one real server (or one service: then
    ``active``/``inactive`` stay 0). Totals are its 64-bit counters; rates are
    its estimator's per-second averages (ipvsadm --rate), refreshed every 2 s."""

    active: int = 0
    inactive: int = 0
    conns: int = 0
    inpkts: int = 0
    outpkts: int = 0
    inbytes: int = 0
    outbytes: int = 0
    cps: int = 0
    inpps: int = 0
    outpps: int = 0
    inbps: int = 0
    outbps: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every address-based service in the namespace, with per-server counters."""

    table: dict[ServiceKey, VirtualService]
    stats: dict[tuple[ServiceKey, tuple[IPAddress, int]], ServerStats]
    service_stats: dict[ServiceKey, ServerStats] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None
    # Docker's gateways on this network: where the container's default route
    # goes back to when dockerlb stops routing its replies via the director.
    gateway4: IPv4Address | None = None
    gateway6: IPv6Address | None = None

    def of_family(self, version: int) -> IPAddress | None:
        return self.ipv4 if version == 4 else self.ipv6

    def gateway_of(self, version: int) -> IPAddress | None:
        return self.gateway4 if version == 4 else self.gateway6


@dataclass(frozen=True, slots=True)
class DockerNetwork:
    """A Docker network's address space: no VIP may fall inside it (Docker
    hands those addresses to containers) or be its gateway."""

    name: str
    subnets: tuple[IPv4Network | IPv6Network, ...] = ()
    gateways: tuple[IPAddress, ...] = ()
    # The addresses of the containers attached to it: only inspecting one
    # network gives them (``DockerPort.network``), never the listing.
    members: tuple[IPAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class Container:
    """What the controller needs to know of one Docker container."""

    id: str
    name: str
    created: str  # RFC 3339 from Docker; sorts in time order
    labels: Mapping[str, str]
    networks: Mapping[str, NetworkAddress]
    running: bool = True  # running and not paused
    health: str | None = None  # None when the image has no HEALTHCHECK
    pid: int = 0
    # The Swarm node's hostname for a task (--swarm): it may run on another
    # host than the controller's. "" for a container of the local engine.
    node: str = ""
    # The engine itself says it is being stopped: a Swarm task whose desired
    # state is no longer "running" (a container's stop shows only as an event).
    stopping: bool = False
    # When Docker last started it (inspect's State.StartedAt); "" where the
    # record does not say (a listing). Not part of what a record compares:
    # it only tells a drain that its container started again unseen.
    started: str = field(default="", compare=False)

    @property
    def serving(self) -> bool:
        return self.running and self.health in (None, "healthy")


@dataclass(frozen=True, slots=True)
class ServerPrep:
    """What dockerlb sets up inside one real server's own namespace.

    - DR: each VIP as a host address on ``lo`` (ARP kept quiet by sysctls);
    - TUN: each VIP on ``tunl0``, which takes the director's IP-in-IP packets;
    - NAT keeping the client's address: the default route via the director,
      so replies to clients go back through IPVS to be un-NATed.
    """

    container: str  # name, for people
    address: IPAddress  # the address IPVS sends to: names the interface
    loopback: frozenset[IPAddress] = frozenset()
    tunnel: frozenset[IPAddress] = frozenset()
    route_via_director: bool = False

    @property
    def empty(self) -> bool:
        return not (self.loopback or self.tunnel or self.route_via_director)


@dataclass(frozen=True, slots=True)
class Check:
    """One of `dockerlb doctor`'s findings."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # a configured feature needs it


def checks_pass(checks: list[Check]) -> bool:
    """True unless a check that a configured feature needs has failed."""
    return all(c.ok or not c.required for c in checks)


def addr_order(addr: IPAddress) -> tuple[int, int]:
    return (addr.version, int(addr))


def format_endpoint(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def parse_ip(text: str) -> IPAddress:
    return ip_address(text)
