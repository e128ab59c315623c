"""The kernel's IPVS connection-sync daemons, as dockerlb wants them.

A director pair (issue 17) keeps established connections across a
failover by running the kernel's sync daemon twice in each director: as
master (it multicasts the connections it forwards) and as backup (it
learns the other director's), with one sync id for the pair. keepalived
moves the addresses; the kernel moves the connection table; dockerlb
starts the daemons and keeps them running like any other drift."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

MASTER, BACKUP = "master", "backup"
STATES = (MASTER, BACKUP)
# Where the kernel's daemons send and listen (dockerlb sets no other): UDP to
# 224.0.0.81:8848. The protocol has no authentication at all.
SYNC_PORT = 8848


@dataclass(frozen=True, slots=True, order=True)
class SyncDaemon:
    state: str  # MASTER or BACKUP: one daemon of each state per namespace at most
    interface: str  # where its multicast goes (or comes from)
    sync_id: int  # the pair's id: a backup takes only its own id's messages

    def __str__(self) -> str:
        return f"{self.state} on {self.interface} (sync id {self.sync_id})"


def wanted_daemons(interface: str, sync_id: int) -> frozenset[SyncDaemon]:
    """Both daemons on ``interface``; none when it is "" (no sync asked)."""
    if not interface:
        return frozenset()
    return frozenset(SyncDaemon(state, interface, sync_id) for state in STATES)


def plan_daemons(
    wanted: frozenset[SyncDaemon], running: frozenset[SyncDaemon]
) -> tuple[list[str], list[SyncDaemon]]:
    """(the states to stop, the daemons to start) to go from ``running`` to
    ``wanted``. No side effects. A state dockerlb does not want is left as
    it is (with no sync asked, daemons someone started with ipvsadm stay);
    a wanted state running with another interface or id is stopped first."""
    stop = sorted({d.state for d in running - wanted if d.state in {w.state for w in wanted}})
    start = sorted(wanted - running)
    return stop, start


@dataclass(frozen=True, slots=True)
class PairState:
    """What status, doctor and the metrics say of a director in a pair."""

    daemons: frozenset[SyncDaemon]  # running now
    wanted: frozenset[SyncDaemon]
    # "active": this director holds one of its VIPs (or the floating DIP) on
    # an interface of its own, as keepalived puts them on the VRRP master;
    # "standby": it holds none; "" when no sync is asked (not in a pair).
    role: str


def interfaces_in(
    subnets: Iterable[IPv4Network | IPv6Network], addresses: Mapping[IPv4Address | IPv6Address, str]
) -> list[str]:
    """The interfaces (``addresses``: address -> its interface) with an
    address inside one of ``subnets``, sorted: how a Docker network's
    subnet names the director's interface on it."""
    nets = list(subnets)
    return sorted({ifname for a, ifname in addresses.items() if any(a in n for n in nets)})
