"""plan(desired, actual) -> list[Op]: the difference, as ordered operations.

Pure: no side effects, no I/O. The order keeps traffic flowing: the VIP
first, then services and real servers are added, then changed, and only then
is anything removed; the VIP goes last.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from dockerlb.core.model import (
    IPAddress,
    KernelState,
    RealServer,
    Service,
    ServiceKey,
    Table,
    VirtualService,
)
from dockerlb.core.model import (
    addr_order as _addr_order,
)


@dataclass(frozen=True, slots=True)
class AddVip:
    vip: IPAddress

    def describe(self) -> str:
        return f"+ vip {self.vip}"


@dataclass(frozen=True, slots=True)
class RemoveVip:
    vip: IPAddress

    def describe(self) -> str:
        return f"- vip {self.vip}"


@dataclass(frozen=True, slots=True)
class AddService:
    service: Service

    def describe(self) -> str:
        s = self.service
        return f"+ service {s.key} scheduler={s.scheduler} persistence={s.persistence}"


@dataclass(frozen=True, slots=True)
class EditService:
    service: Service
    old: Service

    def describe(self) -> str:
        s, o = self.service, self.old
        return (
            f"~ service {s.key} scheduler={o.scheduler}->{s.scheduler} "
            f"persistence={o.persistence}->{s.persistence}"
        )


@dataclass(frozen=True, slots=True)
class RemoveService:
    service: Service

    def describe(self) -> str:
        return f"- service {self.service.key}"


@dataclass(frozen=True, slots=True)
class AddServer:
    key: ServiceKey
    server: RealServer

    def describe(self) -> str:
        s = self.server
        return f"+ server {self.key} -> {s} {s.forward} weight={s.weight}{_thresholds(s)}{_of(s)}"


@dataclass(frozen=True, slots=True)
class EditServer:
    key: ServiceKey
    server: RealServer
    old: RealServer

    def describe(self) -> str:
        s, o = self.server, self.old
        limits = ""
        if (o.upper_threshold, o.lower_threshold) != (s.upper_threshold, s.lower_threshold):
            limits = (
                f" upper_threshold={o.upper_threshold}->{s.upper_threshold}"
                f" lower_threshold={o.lower_threshold}->{s.lower_threshold}"
            )
        return (
            f"~ server {self.key} -> {s} forward={o.forward}->{s.forward} "
            f"weight={o.weight}->{s.weight}{limits}{_of(s)}"
        )


@dataclass(frozen=True, slots=True)
class RemoveServer:
    key: ServiceKey
    server: RealServer

    def describe(self) -> str:
        return f"- server {self.key} -> {self.server}{_of(self.server)}"


Op = AddVip | RemoveVip | AddService | EditService | RemoveService | AddServer | EditServer | RemoveServer
IpvsOp = AddService | EditService | RemoveService | AddServer | EditServer | RemoveServer

ADD, EDIT, REMOVE = "add", "edit", "remove"


@dataclass(frozen=True, slots=True)
class Write:
    """One IPVS change as the kernel takes it: a service (``server`` None)
    or one of its real servers, added, edited or removed."""

    verb: str  # ADD, EDIT or REMOVE
    service: Service
    server: RealServer | None = None


def write_of(op: IpvsOp) -> Write:
    """The one translation of an IPVS operation into a write."""
    match op:
        case AddService(service):
            return Write(ADD, service)
        case EditService(service, _):
            return Write(EDIT, service)
        case RemoveService(service):
            return Write(REMOVE, service)
        case AddServer(key, server):
            return Write(ADD, Service(key), server)
        case EditServer(key, server, _):
            return Write(EDIT, Service(key), server)
        case RemoveServer(key, server):
            return Write(REMOVE, Service(key), server)
    raise TypeError(f"not an IPVS operation: {op!r}")


def op_target(op: Op) -> tuple:
    """What an op acts on: its VIP, its service, or one server of a service.
    Two ops on one target are the same failure, whatever their kind."""
    match op:
        case AddVip(vip) | RemoveVip(vip):
            return ("vip", vip)
        case AddService(service) | EditService(service, _) | RemoveService(service):
            return ("service", service.key)
        case AddServer(key, server) | EditServer(key, server, _) | RemoveServer(key, server):
            return ("server", key, server.ident)
    raise TypeError(f"not an operation: {op!r}")


def service_of(op: Op) -> ServiceKey | None:
    """The service an op belongs to (None for a VIP's)."""
    match op:
        case AddService(service) | EditService(service, _) | RemoveService(service):
            return service.key
        case AddServer(key, _) | EditServer(key, _, _) | RemoveServer(key, _):
            return key
    return None


def op_kind(op: Op) -> str:
    """The operation's kind in snake case (``add_server``), for logs and metrics."""
    return _KINDS[type(op)]


_KINDS = {
    cls: "".join("_" + c.lower() if c.isupper() else c for c in cls.__name__).lstrip("_")
    for cls in (
        AddVip,
        RemoveVip,
        AddService,
        EditService,
        RemoveService,
        AddServer,
        EditServer,
        RemoveServer,
    )
}


def _thresholds(server: RealServer) -> str:
    """The server's connection thresholds, when it has any."""
    if not (server.upper_threshold or server.lower_threshold):
        return ""
    return f" upper_threshold={server.upper_threshold} lower_threshold={server.lower_threshold}"


def _of(server: RealServer) -> str:
    return f" ({server.container})" if server.container else ""


def refused(desired: Table, actual: KernelState) -> list[ServiceKey]:
    """Desired services the controller must not take: their VIP carries a
    service it does not own (someone else's). No side effects."""
    foreign_vips = {k.vip for k in actual.foreign}
    if not foreign_vips:
        return []  # the usual case, and a pass asks on every event
    return sorted(
        (k for k in desired if k.vip in foreign_vips and k.vip not in actual.vips),
        key=ServiceKey.sort_key,
    )


def plan(
    desired: Table,
    actual: KernelState,
    skip: Collection[ServiceKey] | None = None,
    only: Mapping[ServiceKey, Collection[tuple[IPAddress, int]]] | None = None,
    same: set[ServiceKey] | None = None,
) -> list[Op]:
    """Ordered operations that turn ``actual.owned`` into ``desired``.

    No side effects. Services in ``refused(desired, actual)`` are left out (or
    ``skip``, when the caller has them already), and nothing outside
    ``actual.owned`` / ``actual.vips`` is ever removed or changed. ``only``:
    per service, the real servers to compare (the caller knows the others
    are as wanted: an event patched one server of 10,000); a service whose
    settings differ is compared whole. ``same``, if given, is told the
    services found exactly as wanted.
    """
    skip = set(refused(desired, actual) if skip is None else skip)
    want = {k: v for k, v in desired.items() if k not in skip}
    have = actual.owned
    adds: list[Op] = [AddVip(v) for v in sorted({k.vip for k in want} - actual.vips, key=_addr_order)]
    edits: list[Op] = []
    removes: list[Op] = []

    for key in sorted(want, key=ServiceKey.sort_key):
        target = want[key]
        current = have.get(key)
        if current is None:
            adds.append(AddService(target.service))
            adds.extend(AddServer(key, s) for s in _ordered(target.servers.values()))
            continue
        idents = only.get(key) if only else None
        if target.service.settings() != current.service.settings():
            edits.append(EditService(target.service, current.service))
            idents = None
        elif idents is None and target.servers == current.servers:
            if same is not None:
                same.add(key)
            continue  # as wanted (most services on a resync): nothing to sort or compare
        if idents is not None:
            for ident in sorted(idents, key=lambda i: (_addr_order(i[0]), i[1])):
                server, old = target.servers.get(ident), current.servers.get(ident)
                if server is not None and old is None:
                    adds.append(AddServer(key, server))
                elif server is not None and old is not None and old.settings() != server.settings():
                    edits.append(EditServer(key, server, old))
                elif server is None and old is not None:
                    removes.append(RemoveServer(key, old))
            continue
        for ident, server in _sorted_items(target.servers):
            old = current.servers.get(ident)
            if old is None:
                adds.append(AddServer(key, server))
            elif old.settings() != server.settings():
                edits.append(EditServer(key, server, old))
        removes.extend(
            RemoveServer(key, old)
            for ident, old in _sorted_items(current.servers)
            if ident not in target.servers
        )

    removes.extend(
        RemoveService(have[key].service) for key in sorted(have, key=ServiceKey.sort_key) if key not in want
    )
    still_used = {k.vip for k in want}
    removes.extend(RemoveVip(v) for v in sorted(actual.vips - still_used, key=_addr_order))
    return adds + edits + removes


def applied(actual: KernelState, ops: Iterable[Op]) -> KernelState:
    """What the kernel holds once these ops have all succeeded: how a pass
    knows the table without reading it again. No side effects. What no op
    touched is the same object as before (an event pass touches one service
    of 1,000)."""
    ops = list(ops)
    if not ops:
        return actual
    owned = dict(actual.owned)
    vips = actual.vips
    # Each touched service's servers copied once, however many ops it has.
    servers: dict[ServiceKey, dict[tuple[IPAddress, int], RealServer]] = {}

    def of(key: ServiceKey) -> dict[tuple[IPAddress, int], RealServer]:
        if key not in servers:
            servers[key] = dict(owned[key].servers) if key in owned else {}
        return servers[key]

    for op in ops:
        match op:
            case AddVip(vip):
                vips = vips | {vip}
            case RemoveVip(vip):
                vips = vips - {vip}
            case AddService(service):
                owned[service.key] = VirtualService(service, {})
                servers[service.key] = {}
            case EditService(service, _):
                of(service.key)
                owned[service.key] = VirtualService(service, {})
            case RemoveService(service):
                owned.pop(service.key, None)
                servers.pop(service.key, None)
            case AddServer(key, server) | EditServer(key, server, _):
                of(key)[server.ident] = server
            case RemoveServer(key, server):
                of(key).pop(server.ident, None)
    for key, held in servers.items():
        if key in owned:  # a server op's service is always there: plan adds it first
            owned[key] = VirtualService(owned[key].service, held)
    return KernelState(owned, vips, actual.foreign)


def _ordered(servers) -> list[RealServer]:
    return sorted(servers, key=lambda s: (_addr_order(s.addr), s.port))


def _sorted_items(servers):
    return sorted(servers.items(), key=lambda kv: (_addr_order(kv[0][0]), kv[0][1]))
