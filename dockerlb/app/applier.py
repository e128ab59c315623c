"""Applying a plan: VIP operations to the director, IPVS ones in batches.

A run of consecutive IPVS operations goes to the kernel as batched writes
(``IpvsAdapter.write_all``: hundreds of messages per send), which is what
makes a cold sync of thousands of real servers quick. Plan order is kept.
A write that fails is looked at alone: a removal that finds nothing has
reached its goal; an addition that finds it already there (it appeared
since the read) becomes a change; anything else is tried once more through
the single-call path, which retries a busy kernel and names a missing
scheduler.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from itertools import groupby
from typing import Protocol

from loguru import logger

from dockerlb.adapters.ipvs_wire import ADD, EDIT, REMOVE, Write
from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.core.model import IPAddress, RealServer, Service, ServiceKey
from dockerlb.core.plan import (
    AddServer,
    AddService,
    AddVip,
    EditServer,
    EditService,
    Op,
    RemoveServer,
    RemoveService,
    RemoveVip,
    op_kind,
)
from dockerlb.errors import DockerlbError, IpvsExists, IpvsNotFound, Unexpected

# A pass with more operations than this (a cold start on a big table) logs
# one summary line at INFO and each operation at DEBUG.
LOG_EACH_UP_TO = 1000


class IpvsWriter(Protocol):
    def write_all(self, writes: list[Write]) -> list[DockerlbError | None]: ...
    def add_service(self, service: Service) -> None: ...
    def edit_service(self, service: Service) -> None: ...
    def remove_service(self, service: Service) -> None: ...
    def add_server(self, key: ServiceKey, server: RealServer) -> None: ...
    def edit_server(self, key: ServiceKey, server: RealServer) -> None: ...
    def remove_server(self, key: ServiceKey, server: RealServer) -> None: ...


class VipHolder(Protocol):
    def add_vip(self, vip: IPAddress) -> None: ...
    def remove_vip(self, vip: IPAddress) -> None: ...


class Applier:
    def __init__(self, ipvs: IpvsWriter, director: VipHolder, metrics: ControllerMetrics) -> None:
        self._ipvs = ipvs
        self._director = director
        self._metrics = metrics

    def apply(self, ops: list[Op]) -> int:
        """Apply ops in order; one log line each; returns how many failed."""
        failed = 0
        broken: set[ServiceKey] = set()  # services whose creation failed
        # VIPs that could not be put on the interface: a service made on one
        # would look foreign (not on dockerlb's interface) from the next pass on.
        homeless: set[IPAddress] = set()
        applied: Counter[str] = Counter()
        each = "INFO" if len(ops) <= LOG_EACH_UP_TO else "DEBUG"
        for op, error in self._outcomes(ops, broken, homeless):
            if error is None:
                applied[op_kind(op)] += 1
                # Lazy: at DEBUG the line and its fields cost nothing unless logged
                # (they were a fifth of a 10,000-server cold sync).
                logger.patch(functools.partial(_patch_fields, op=op)).opt(lazy=True).log(
                    each, "applied: {}", op.describe
                )
                continue
            failed += 1
            self._metrics.errors.labels(type(error).__name__).inc()
            if isinstance(op, AddService):
                broken.add(op.service.key)
            if isinstance(op, AddVip):
                homeless.add(op.vip)
            logger.bind(**_fields(op)).error("could not apply '{}': {}", op.describe(), error)
        for kind, n in applied.items():
            self._metrics.operations.labels(kind).inc(n)
        if each == "DEBUG":
            logger.info(
                "applied {} operations ({}), {} failed",
                len(ops),
                ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(op_kind(op) for op in ops).items())),
                failed,
            )
        return failed

    def _outcomes(
        self, ops: list[Op], broken: set[ServiceKey], homeless: set[IPAddress]
    ) -> Iterator[tuple[Op, DockerlbError | None]]:
        for is_vip, group in groupby(ops, lambda op: isinstance(op, AddVip | RemoveVip)):
            run = list(group)
            if is_vip:
                for op in run:
                    yield op, self._alone(op)
                continue
            # Not made, and not said: the VIP's own error line says why.
            run = [op for op in run if _vip_of(op) not in homeless]
            for op, error in zip(run, self._batch(run), strict=True):
                if error is not None and isinstance(op, AddServer) and op.key in broken:
                    continue  # its service could not be made: said once, for the service
                yield op, self._mend(op, error)

    def _batch(self, run: list[Op]) -> list[DockerlbError | None]:
        """The batched write's outcome per op; if the batch itself fails
        unexpectedly, every op is tried alone, so one bad op fails alone."""
        try:
            return self._ipvs.write_all([_write(op) for op in run])
        except Exception as e:
            return [Unexpected(f"batched write failed: {type(e).__name__}: {e}")] * len(run)

    def _mend(self, op: Op, error: DockerlbError | None) -> DockerlbError | None:
        if error is None:
            return None
        if isinstance(op, RemoveService | RemoveServer) and isinstance(error, IpvsNotFound):
            return None  # already gone: the goal of a removal
        if isinstance(error, IpvsExists) and isinstance(op, AddService | AddServer):
            return self._alone(_as_edit(op))
        return self._alone(op)

    def _alone(self, op: Op) -> DockerlbError | None:
        """One op through the single-call path; its error, or None."""
        ipvs, director = self._ipvs, self._director
        try:
            match op:
                case AddVip(vip):
                    director.add_vip(vip)
                case RemoveVip(vip):
                    director.remove_vip(vip)
                case AddService(service):
                    try:
                        ipvs.add_service(service)
                    except IpvsExists:  # appeared since we read: make it what we want
                        ipvs.edit_service(service)
                case EditService(service, _):
                    ipvs.edit_service(service)
                case RemoveService(service):
                    _gone_is_fine(lambda: ipvs.remove_service(service))
                case AddServer(key, server):
                    try:
                        ipvs.add_server(key, server)
                    except IpvsExists:
                        ipvs.edit_server(key, server)
                case EditServer(key, server, _):
                    ipvs.edit_server(key, server)
                case RemoveServer(key, server):
                    _gone_is_fine(lambda: ipvs.remove_server(key, server))
        except DockerlbError as e:
            return e
        except Exception as e:
            # An adapter that failed to translate an error: still this op's
            # failure alone, never the end of the pass for every service.
            return Unexpected(f"{type(e).__name__}: {e}")
        return None


def _vip_of(op: Op) -> IPAddress | None:
    """The VIP an addition needs on the interface; None for any other op."""
    match op:
        case AddService(service):
            return service.key.vip
        case AddServer(key, _):
            return key.vip
    return None


def _write(op: Op) -> Write:
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


def _as_edit(op: AddService | AddServer) -> EditService | EditServer:
    """The change that makes what an addition found already there what it
    should be (what was there is unknown: it stands as its own old value)."""
    if isinstance(op, AddService):
        return EditService(op.service, op.service)
    return EditServer(op.key, op.server, op.server)


def _patch_fields(record, op: Op) -> None:
    """Put an op's fields on a log record (loguru's patch): only when logged."""
    record["extra"].update(_fields(op))


def _fields(op: Op) -> dict[str, str]:
    """Structured fields for an operation's log line (--log-format json)."""
    fields = {"op": op_kind(op)}
    match op:
        case AddVip(vip) | RemoveVip(vip):
            fields["vip"] = str(vip)
        case AddService(service) | EditService(service, _) | RemoveService(service):
            fields["service"] = str(service.key)
        case AddServer(key, server) | EditServer(key, server, _) | RemoveServer(key, server):
            fields.update(service=str(key), server=str(server), container=server.container)
    return fields


def _gone_is_fine(fn) -> None:
    with contextlib.suppress(IpvsNotFound):  # already gone: the goal of a removal
        fn()
