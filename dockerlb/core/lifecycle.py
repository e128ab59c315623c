"""Each running container's role (serve, pending, drain, retired) and the
drain clock. Pure bookkeeping: no Docker, no kernel; time is passed in.

Draining keeps a server in IPVS at weight 0, so no new connection goes there
while established ones finish. It begins when Docker starts stopping the
container (its ``kill`` event with a stop signal comes before ``die``), when
Docker's HEALTHCHECK says unhealthy, or when dockerlb's own check goes down.
It ends with the server removed once its connections have drained or the
drain timeout has passed (a container that exits is removed at once: a dead
server has nothing left to drain), or with the weight restored when the
container is healthy again.

"Stopping" is the one fact events carry that inspect cannot show (a stopping
container is still ``Running``), so it is remembered here until the
container stops running or starts again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field, replace

from dockerlb.core.model import CheckState, Container, IPAddress, Role, ServiceKey, Snapshot, Table


def role_of(c: Container, stopping: bool, check: CheckState | None) -> Role:
    """A running container's role, before the drain clock has its say."""
    if stopping or c.stopping or c.health == "unhealthy" or check is CheckState.DOWN:
        return Role.DRAIN
    if c.health not in (None, "healthy") or check is CheckState.PENDING:
        return Role.PENDING
    return Role.SERVE


# A drain this young is never called finished: a connection whose handshake
# is under way counts as inactive, and removing its server would reset it.
SETTLE = 2.0


@dataclass(frozen=True)
class Drains:
    """Which containers are stopping, and since when each one drains: a
    value, each pass making the next one (``told``, ``roles``)."""

    timeout: float
    # Container id -> when Docker last started it before a stop began (its
    # ``Container.started``; "" not known yet): a record that says it started
    # since is a restart whose events were lost, and the stop is over.
    stopping: Mapping[str, str] = field(default_factory=dict)
    since: Mapping[str, float] = field(default_factory=dict)  # container id -> when its drain began
    names: Mapping[str, str] = field(default_factory=dict)  # container id -> name, of those draining

    def told(self, stopping: Iterable[str] = (), started: Iterable[str] = ()) -> Drains:
        """Docker began stopping these (a stop signal), then these (re)started
        or were unpaused: whatever stop was under way is over. (Triggers of
        one batch come here one by one, in order: ``passes.noted``.)"""
        now = dict(self.stopping)
        for cid in stopping:
            now.setdefault(cid, "")
        for cid in started:
            now.pop(cid, None)
        if now == self.stopping:
            return self
        return replace(self, stopping=now)

    def marked(self, containers: Mapping[str, Container]) -> Drains:
        """Each stop not yet marked gets its container's start time, as the
        record read since the stop says it."""
        unknown = [cid for cid, mark in self.stopping.items() if not mark]
        marks = {
            cid: containers[cid].started for cid in unknown if cid in containers and containers[cid].started
        }
        if not marks:
            return self
        return replace(self, stopping={**self.stopping, **marks})

    def roles(
        self, containers: Iterable[Container], checks: Mapping[str, CheckState], now: float
    ) -> tuple[dict[str, Role], Drains]:
        """Every running container's role, and the drain clocks they start
        and end. Drains whose time is up are ``RETIRED`` (drained ones are
        found by ``drained``). Over a part of the containers, every stopping
        or draining one must be in it (``ids``): the others are forgotten."""
        containers = list(containers)
        roles: dict[str, Role] = {}
        stopping = dict(self.stopping)
        for c in containers:
            mark = stopping.get(c.id)
            if mark and c.started and c.started != mark:
                del stopping[c.id]  # started again since the stop: its events were lost
            if c.running:
                roles[c.id] = role_of(c, c.id in stopping, checks.get(c.id))
        draining = {cid for cid, r in roles.items() if r is Role.DRAIN}
        since = {cid: self.since.get(cid, now) for cid in draining}
        for cid, began in since.items():
            if now - began >= self.timeout:
                roles[cid] = Role.RETIRED
        after = Drains(
            self.timeout,
            {
                cid: m for cid, m in stopping.items() if cid in roles
            },  # stopped or gone: nothing left to remember
            since,
            {c.id: c.name for c in containers if c.id in draining},
        )
        return roles, after

    def settled(self, names: Iterable[str], now: float) -> set[str]:
        """Those of these draining containers (by name) whose drain began at
        least ``SETTLE`` seconds ago: only they may be found drained."""
        old = {self.names[cid] for cid, began in self.since.items() if now - began >= SETTLE}
        return old & set(names)

    def ids_of(self, names: Iterable[str]) -> set[str]:
        """The draining containers (by id) of these names."""
        names = set(names)
        return {cid for cid, name in self.names.items() if name in names}

    def left(self, now: float) -> dict[str, float]:
        """Each draining container (by name) whose drain timeout has not
        passed: the seconds left before it. Those whose time is up are
        retired (out of the table), not draining."""
        return {
            self.names[cid]: left
            for cid, began in self.since.items()
            if cid in self.names and (left := self.timeout - (now - began)) > 0
        }

    @property
    def draining(self) -> bool:
        """Some container drains: its connections must be watched."""
        return bool(self.since)

    def ids(self) -> frozenset[str]:
        """The containers that drain now, and those told to stop since the
        last pass (their drain starts in the next): every pass's scope must
        hold both, a full pass's too (``roles`` forgets what is outside it)."""
        return frozenset(self.since) | self.stopping.keys()


def drained(desired: Table, kernel: Snapshot, draining: Iterable[str]) -> set[str]:
    """The draining containers (by name) with nothing left to drain: each of
    their servers is absent from the kernel, or there at weight 0 with no
    established connection. No side effects.

    Only established (active) connections count: the kernel also keeps
    TIME_WAIT and other closing entries (inactive) for minutes, and with
    ``expire_nodest_conn`` they go quietly once the server is removed.
    """
    names = set(draining)
    busy: set[str] = set()
    for key, vs in desired.items():
        have = kernel.table.get(key)
        for ident, server in vs.servers.items():
            if server.container not in names or have is None or ident not in have.servers:
                continue
            if have.servers[ident].weight != 0 or _active(kernel, key, ident) > 0:
                busy.add(server.container)
    return names - busy


def _active(kernel: Snapshot, key: ServiceKey, ident: tuple[IPAddress, int]) -> int:
    stats = kernel.stats.get((key, ident))
    return stats.active if stats is not None else 0


def holding(
    addresses: Mapping[str, Set[IPAddress]], kernel: Snapshot, owned: Set[IPAddress]
) -> dict[str, list[str]]:
    """What keeps each container (by name, with its addresses) from being
    drained, as the kernel shows it: each of its real servers on dockerlb's
    VIPs at a weight above 0, or with established (active) connections. An
    empty list: drained (no such server: out of the table, or at weight 0
    with no active connection). No side effects.

    By address, not by name: a container that has stopped keeps no
    address in Docker, while its servers may still be in the table."""
    out: dict[str, list[str]] = {name: [] for name in addresses}
    by_addr = {a: name for name, addrs in addresses.items() for a in addrs}
    for key in sorted(kernel.table, key=ServiceKey.sort_key):
        if key.vip not in owned:
            continue
        for ident, server in sorted(kernel.table[key].servers.items(), key=lambda kv: str(kv[1])):
            name = by_addr.get(server.addr)
            if name is None:
                continue
            active = _active(kernel, key, ident)
            if server.weight:
                out[name].append(f"{key} -> {server} is serving at weight {server.weight}")
            elif active:
                out[name].append(f"{key} -> {server} has {active} active connection(s)")
    return out
