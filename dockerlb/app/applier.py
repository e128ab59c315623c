"""Applying a plan: VIP operations to the director, IPVS ones in batches.

A run of consecutive IPVS operations goes to the kernel as batched writes
(``write_all``: hundreds of messages per send), which is what makes a cold
sync of thousands of real servers quick. Plan order is kept. What came of
each op is a value (``Outcome``): applied, failed (with the project's
error), or not tried because what it needs failed first. Nothing here logs
a failure: the controller says each once while it lasts.

The mending rules, each in one place (``_mend``): a removal that finds
nothing has reached its goal; an addition that finds it already there (it
appeared since the read) becomes a change; anything else is tried once
more alone, which retries a busy kernel and names a missing scheduler.
A VIP leaves the director only once the kernel shows no service on it
(read back): a service left behind on a VIP dockerlb no longer holds would
look foreign from then on, and no pass would mend it.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Protocol

from loguru import logger

from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.core.model import IPAddress, ServiceKey
from dockerlb.core.plan import (
    AddServer,
    AddService,
    AddVip,
    EditServer,
    EditService,
    IpvsOp,
    Op,
    RemoveServer,
    RemoveService,
    RemoveVip,
    Write,
    op_kind,
    write_of,
)
from dockerlb.errors import DockerlbError, IpvsExists, IpvsNotFound, Retryable, Unexpected, VipInUse

# A pass with more operations than this (a cold start on a big table) logs
# one summary line at INFO and each operation at DEBUG.
LOG_EACH_UP_TO = 1000


class IpvsWriter(Protocol):
    def write_all(self, writes: Sequence[Write]) -> list[DockerlbError | None]: ...
    def write(self, write: Write) -> None: ...
    def services(self) -> frozenset[ServiceKey]: ...


class VipHolder(Protocol):
    def add_vips(self, vips: Sequence[IPAddress]) -> Sequence[DockerlbError | None]: ...
    def remove_vip(self, vip: IPAddress) -> None: ...


@dataclass(frozen=True, slots=True)
class Failure:
    """One op that did not take, and why."""

    op: Op
    error: DockerlbError

    @property
    def permanent(self) -> bool:
        """Trying again soon will not help (only a full pass tries it again)."""
        return not isinstance(self.error, Retryable)

    def __str__(self) -> str:
        return f"could not apply '{self.op.describe()}': {self.error}"


@dataclass(frozen=True)
class Outcome:
    """What came of a plan: every op planned, those the kernel took, and
    those that failed. An op in neither was not tried (its VIP or its
    service could not be made: that failure says why)."""

    ops: tuple[Op, ...] = ()
    applied: tuple[Op, ...] = ()
    failures: tuple[Failure, ...] = ()

    @property
    def failed(self) -> int:
        return len(self.failures)


class Applier:
    def __init__(self, ipvs: IpvsWriter, director: VipHolder, metrics: ControllerMetrics) -> None:
        self._ipvs = ipvs
        self._director = director
        self._metrics = metrics

    def apply(self, ops: Sequence[Op]) -> Outcome:
        """Apply ops in order; one log line each applied."""
        applied: list[Op] = []
        failures: list[Failure] = []
        each = "INFO" if len(ops) <= LOG_EACH_UP_TO else "DEBUG"
        for op, error in self._outcomes(ops):
            if error is None:
                applied.append(op)
                # Lazy: at DEBUG the line and its fields cost nothing unless logged
                # (they were a fifth of a 10,000-server cold sync).
                logger.patch(functools.partial(_patch_fields, op=op)).opt(lazy=True).log(
                    each, "applied: {}", op.describe
                )
            else:
                failures.append(Failure(op, error))
                self._metrics.errors.labels(type(error).__name__).inc()
        for kind, n in Counter(op_kind(op) for op in applied).items():
            self._metrics.operations.labels(kind).inc(n)
        if each == "DEBUG":
            kinds = Counter(op_kind(op) for op in ops)
            logger.info(
                "applied {} operations ({}), {} failed",
                len(ops),
                ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())),
                len(failures),
            )
        return Outcome(tuple(ops), tuple(applied), tuple(failures))

    def _outcomes(self, ops: Sequence[Op]) -> Iterator[tuple[Op, DockerlbError | None]]:
        """Each op tried (plan order kept) with its error or None; the ops
        whose VIP or service could not be made are left out."""
        homeless: set[IPAddress] = set()  # VIPs that could not be put on the interface
        broken: set[ServiceKey] = set()  # services that could not be made
        for is_vip, group in groupby(ops, lambda op: isinstance(op, AddVip | RemoveVip)):
            if is_vip:
                vip_ops: list[AddVip | RemoveVip] = list(group)  # type: ignore[arg-type]
                added = iter(self._add_vips([v.vip for v in vip_ops if isinstance(v, AddVip)]))
                services: frozenset[ServiceKey] | None = None  # read once, for every removal
                for vip_op in vip_ops:
                    if isinstance(vip_op, AddVip):
                        error = next(added)
                        if error is not None:
                            homeless.add(vip_op.vip)
                    else:
                        if services is None:
                            services, error = self._services()
                        if services is not None:
                            error = self._remove_vip(vip_op.vip, services)
                    yield vip_op, error
                continue
            # A service on a VIP that is not on the interface would look
            # foreign from the next pass on: not made, not said (the VIP's
            # own failure says why); nor a server of a service not made.
            run: list[IpvsOp] = [op for op in group if _vip_of(op) not in homeless]  # type: ignore[misc]
            for op, error in zip(run, self._batch(run), strict=True):
                if isinstance(op, AddServer) and op.key in broken:
                    continue
                error = self._mend(op, error)
                if error is not None and isinstance(op, AddService):
                    broken.add(op.service.key)
                yield op, error

    def _batch(self, run: list[IpvsOp]) -> list[DockerlbError | None]:
        """The batched write's outcome per op; if the batch itself fails
        unexpectedly, every op is tried alone, so one bad op fails alone."""
        try:
            return self._ipvs.write_all([write_of(op) for op in run])
        except Exception as e:
            return [Unexpected(f"batched write failed: {type(e).__name__}: {e}")] * len(run)

    def _mend(self, op: IpvsOp, error: DockerlbError | None, alone: bool = False) -> DockerlbError | None:
        """The mending rules, for a batched write's result and a lone one's
        alike; ``alone``: this was already the lone try."""
        if error is None:
            return None
        if isinstance(op, RemoveService | RemoveServer) and isinstance(error, IpvsNotFound):
            return None  # already gone: the goal of a removal
        if isinstance(op, AddService | AddServer) and isinstance(error, IpvsExists):
            edit = _as_edit(op)  # it appeared since the read: make it what we want
            return self._mend(edit, self._alone(edit), alone=True)
        if alone:
            return error
        return self._mend(op, self._alone(op), alone=True)

    def _alone(self, op: IpvsOp) -> DockerlbError | None:
        """One op through the single-write path; its error, or None."""
        try:
            self._ipvs.write(write_of(op))
        except DockerlbError as e:
            return e
        except Exception as e:
            # An adapter that failed to translate an error: still this op's
            # failure alone, never the end of the pass for every service.
            return Unexpected(f"{type(e).__name__}: {e}")
        return None

    def _add_vips(self, vips: list[IPAddress]) -> list[DockerlbError | None]:
        """The VIPs put on the director, all in one go: each one's error or None."""
        if not vips:
            return []
        try:
            return list(self._director.add_vips(vips))
        except DockerlbError as e:
            return [e] * len(vips)
        except Exception as e:
            return [Unexpected(f"{type(e).__name__}: {e}")] * len(vips)

    def _services(self) -> tuple[frozenset[ServiceKey] | None, DockerlbError | None]:
        """The kernel's services now (what a VIP's removal must wait for)."""
        try:
            return self._ipvs.services(), None
        except DockerlbError as e:
            return None, e
        except Exception as e:
            return None, Unexpected(f"{type(e).__name__}: {e}")

    def _remove_vip(self, vip: IPAddress, services: frozenset[ServiceKey]) -> DockerlbError | None:
        left = sorted((k for k in services if k.vip == vip), key=ServiceKey.sort_key)
        if left:
            return VipInUse(
                f"VIP {vip} still carries {', '.join(map(str, left))} in the kernel; "
                "it stays on the director until they are gone"
            )
        try:
            self._director.remove_vip(vip)
        except DockerlbError as e:
            return e
        except Exception as e:
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


def _as_edit(op: AddService | AddServer) -> EditService | EditServer:
    """The change that makes what an addition found already there what it
    should be (what was there is unknown: it stands as its own old value)."""
    if isinstance(op, AddService):
        return EditService(op.service, op.service)
    return EditServer(op.key, op.server, op.server)


def _patch_fields(record, op: Op) -> None:
    """Put an op's fields on a log record (loguru's patch): only when logged."""
    record["extra"].update(fields_of(op))


def fields_of(op: Op) -> dict[str, str]:
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
