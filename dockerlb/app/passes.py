"""One pass, as values handed from step to step (the controller only
sequences them: dockerlb/app/controller.py).

    triggers ─▶ look ─▶ Seen        Docker: the containers the triggers touch (a full
                                    pass: all of them, and the whole kernel table)
    Seen ─▶ want ─▶ Wanted          owners, then the desired table (pure); the checks to run
    Wanted ─▶ prepare ─▶ failed     real servers' own namespaces (DR, TUN, routed NAT)
    ─▶ decide ─▶ Decision           the kernel as carried, or read where only it can say
                                    (a drain's connections, a new VIP's neighbours);
                                    then plan(desired, kernel) (pure)
    Decision ─▶ apply ─▶ Outcome    the one write path (dockerlb/app/applier.py)
    ─▶ announce ─▶ Announced        with --announce: each VIP's route (core/announce.py
                                    decides, against the kernel as the writes left it)
    ─▶ carry ─▶ Carried             the next pass's start (pure): the kernel as it was
                                    plus the ops that took, never "unknown, read it all"

Failures are values owned by one container or one service (a label problem,
a namespace not set up, an op that failed), said once while they last
(``speak``), never an exception that ends the pass for everyone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from loguru import logger

from dockerlb.app.applier import Applier, Failure, Outcome
from dockerlb.core import announce as announcing
from dockerlb.core.announce import Announcement, Route
from dockerlb.core.desired import Desired, VipPolicy, asks_namespace, build_desired, without
from dockerlb.core.labels import LabelCache, Limits, has_prefix
from dockerlb.core.lifecycle import Drains, drained
from dockerlb.core.model import (
    CheckState,
    CheckTarget,
    Container,
    DockerNetwork,
    IPAddress,
    KernelState,
    RealServer,
    Role,
    ServiceKey,
    Snapshot,
    Table,
    VirtualService,
)
from dockerlb.core.ownership import Binding, Owners, kernel_evidence
from dockerlb.core.plan import (
    AddVip,
    Op,
    RemoveServer,
    RemoveVip,
    applied,
    op_target,
    plan,
    refused,
    service_of,
)
from dockerlb.core.ports import (
    AnnouncePort,
    Clock,
    DirectorPort,
    DockerPort,
    HealthPort,
    IpvsPort,
    PreparerPort,
    SpeakerPort,
    Trigger,
)
from dockerlb.core.render import owners as addresses_of
from dockerlb.core.scope import Index, Scope, merged
from dockerlb.errors import DockerlbError
from dockerlb.settings import Settings


@dataclass(frozen=True)
class Line:
    """Something a pass has to say: said once while it lasts."""

    level: str  # "ERROR" or "WARNING"
    text: str


@dataclass(frozen=True)
class Carried:
    """What one pass leaves to the next: the only state the controller keeps."""

    drains: Drains
    # The one value changed in place: by event passes (``look``), in the
    # loop's thread alone (no other thread reads it).
    containers: dict[str, Container] = field(default_factory=dict)
    networks: tuple[DockerNetwork, ...] = ()
    taken: Mapping[IPAddress, str] | None = None  # the director's own addresses (full passes read them)
    checks: Mapping[str, CheckState] = field(default_factory=dict)  # the checks' states the build used
    owners: Owners = field(default_factory=Owners)
    built: Desired | None = None  # the desired table as built (None: no pass yet)
    kernel: KernelState | None = None  # as last read, plus every op that took since (None: never read)
    planned: Table = field(default_factory=dict)  # who each real server stood for (the kernel knows no names)
    left_out: frozenset[str] = frozenset()  # containers whose namespace could not be set up
    failing: Mapping[tuple, Failure] = field(default_factory=dict)  # op target -> its last failure
    faults: Mapping[str, str] = field(default_factory=dict)  # a side job ("masquerade") -> why it fails
    said: frozenset[str] = frozenset()  # what was said and still holds
    last_full: float = float("-inf")  # when the last full pass ended (monotonic)
    sync_interface: str = ""  # where the sync daemons run, as the last full pass found it ("" none)
    # --announce: dockerlb's routes as last read plus what took since (None:
    # read them), each VIP's announcement as decided, the speaker's problem.
    routes: frozenset[Route] | None = None
    announcements: Mapping[IPAddress, Announcement] = field(default_factory=dict)
    speaker: str = ""


@dataclass(frozen=True)
class Seen:
    """What a pass read before deciding anything."""

    full: bool  # everything is looked at and planned (and the kernel read whole)
    containers: dict[str, Container]
    scope: Scope | None  # the part an event pass rebuilds; None: all of it
    networks: tuple[DockerNetwork, ...]
    taken: Mapping[IPAddress, str]
    checks: Mapping[str, CheckState]
    drains: Drains  # told what the triggers say (stopping, started)
    kernel: KernelState | None  # read now (a full pass), else as carried
    snapshot: Snapshot | None = None  # the read the kernel state came from (a full pass)
    now: float = 0.0
    # What an event pass changed in ``containers``: each container's record
    # before it (None: absent), for ``undo``.
    before: Mapping[str, Container | None] = field(default_factory=dict)
    # The owners' record the kernel keeps (read by the start-up pass alone).
    recorded: Mapping[ServiceKey, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Wanted:
    built: Desired  # the desired table as built (merged into the last one on an event pass)
    owners: Owners
    drains: Drains
    scope: Scope | None = None  # the part built (``Seen.scope``, or wider); None: all of it
    # Per patched service, the real servers (address, port) the roots had
    # or have: the plan compares those alone (the rest is as it was).
    touched: Mapping[ServiceKey, frozenset[tuple[IPAddress, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    desired: Desired  # as built, less the servers left out or drained
    state: KernelState  # what the plan was made against
    ops: tuple[Op, ...]
    refused: tuple[ServiceKey, ...]  # services on a VIP someone else holds
    want: Table  # the part of the table the ops bring about (all of it on a full plan)
    keys: frozenset[ServiceKey] | None  # the services planned (None: all)


@dataclass
class Doors:
    """The ports and memos the steps go through: the controller's, handed in."""

    settings: Settings
    docker: DockerPort
    ipvs: IpvsPort
    director: DirectorPort
    clock: Clock
    health: HealthPort | None
    preparer: PreparerPort | None
    applier: Applier
    # Memos of the containers' labels and of who claims what (see scope.py):
    # they mirror ``Seen.containers`` and change only in ``look``.
    labels: LabelCache
    index: Index
    allowed: VipPolicy
    bindings: tuple[Binding, ...]
    incremental: bool = True
    announcer: AnnouncePort | None = None  # with --announce
    speaker: SpeakerPort | None = None


# -- look ------------------------------------------------------------------------------------
def look(doors: Doors, last: Carried, triggers: list[Trigger] | None, relist: bool = True) -> Seen:
    """Docker's containers: all of them and the whole kernel (``None``), or
    the triggers' own. ``relist``: a full pass lists Docker's containers
    (else they are as the event passes left them)."""
    now = doors.clock.monotonic()
    checks = doors.health.states() if doors.health is not None else {}
    if triggers is None:
        return _look_all(doors, last, checks, now, relist)
    triggers = [trusted(last.containers, t) for t in triggers]
    drains = noted(last.drains, triggers)
    latest = {t.container_id: t for t in triggers if t.container_id}  # the last word per container
    # The controller's map of containers, changed in place: a copy of 10,000
    # entries on every event was most of what an event pass spent on what
    # its event did not touch (issue 31). What the touched ones were is kept
    # (``Seen.before``): a pass that fails puts them back (``undo``).
    containers = last.containers
    before: dict[str, Container | None] = {}
    try:
        for cid, t in latest.items():
            before[cid] = containers.get(cid)
            _follow(doors, containers, cid, t)
        doors.labels.forget(cid for cid, t in latest.items() if t.gone or cid not in containers)
        drains = drains.marked(containers)
        # Draining containers are in every pass's scope: their clocks run
        # (settled, retired) with no event to say so, and ``roles`` keeps drain
        # clocks only for the containers it is given. So are those the last pass
        # left out: the preparer retries them on every pass.
        base = last.built if doors.incremental else None
        scope = doors.index.update(latest.keys() | drains.ids() | last.left_out, containers, base)
        taken = last.taken if last.taken is not None else doors.director.addresses()
        if not doors.incremental:
            # The path the incremental one is tested against: everything built,
            # read and planned on every pass.
            snapshot = read_all(doors)
            kernel = owned_part(snapshot, doors.director.vips())
            return Seen(
                True, containers, None, last.networks, taken, checks, drains, kernel, snapshot, now, before
            )
    except BaseException:
        _put_back(doors, containers, before)
        raise
    return Seen(
        False, containers, scope, last.networks, taken, checks, drains, last.kernel, None, now, before
    )


def undo(doors: Doors, seen: Seen) -> None:
    """A pass that failed after ``look``: the containers it changed, and
    their part of the index, as they were before it."""
    _put_back(doors, seen.containers, seen.before)


def _put_back(doors: Doors, containers: dict[str, Container], before: Mapping[str, Container | None]) -> None:
    if not before:
        return
    for cid, c in before.items():
        if c is None:
            containers.pop(cid, None)
        else:
            containers[cid] = c
    doors.index.update(before.keys(), containers)


def _follow(doors: Doors, containers: dict[str, Container], cid: str, t: Trigger) -> None:
    """One container as its latest trigger leaves it in ``containers``."""
    if t.gone:
        containers.pop(cid, None)
        return
    cached = containers.get(cid)
    if t.down:
        if cached is not None:
            containers[cid] = dataclasses.replace(cached, running=False)
        return
    if t.network and (cached is None or not cached.running):
        # Not known running (maybe mid-start: dockerd would hold our inspect
        # until the start is done); its "start" event follows.
        return
    c = doors.docker.inspect(cid)
    if c is None or not has_prefix(c.labels, doors.settings.label_prefix):
        containers.pop(cid, None)
    else:
        # The PID only where the listing has it too (``needs_pid``): a full
        # pass finds this record unchanged.
        containers[c.id] = c if needs_pid(doors, c) else dataclasses.replace(c, pid=0)


def _look_all(
    doors: Doors, last: Carried, checks: Mapping[str, CheckState], now: float, relist: bool
) -> Seen:
    """A full pass's look: every container (``relist``: listed again, else
    as the event stream left them), Docker's networks, the director's
    addresses and the kernel, read again. Only what changed since the last
    pass is rebuilt (a missed event shows up here as a changed record); the
    whole table is built again when what every entry depends on changed
    (networks, the director's addresses, health checks) or no last table is
    known. The kernel is read and planned whole either way."""
    relist = relist or last.built is None
    if relist:
        stopping = last.drains.stopping
        # The PID where a namespace is set up; the start time of a container
        # told to stop (it may have started again with no event to say so).
        listed = {
            c.id: c for c in doors.docker.list_containers(lambda c: needs_pid(doors, c) or c.id in stopping)
        }
        doors.labels.keep_only(listed)
    else:
        # As the event passes left them (each record an inspect's, its start
        # time known): a restart whose events were lost shows at the next
        # listing (every --relist-every resyncs).
        listed = last.containers
    networks = tuple(doors.docker.networks())
    taken = doors.director.addresses()
    snapshot = read_all(doors)
    kernel = owned_part(snapshot, doors.director.vips())
    drains = last.drains.marked(listed)
    # A new controller (a restart) learns the owners the last one wrote down.
    recorded = recorded_owners(doors) if last.built is None else {}
    same = (networks, taken, checks) == (last.networks, last.taken, last.checks)
    if not (doors.incremental and same and last.built is not None):
        doors.index.sync(listed)
        return Seen(
            True, listed, None, networks, taken, checks, drains, kernel, snapshot, now, recorded=recorded
        )
    if relist:
        # An unchanged container keeps the record it had (the listing may have
        # made an equal one): the index and the label memo hold that one, and
        # two records of each container would double the controller's memory.
        before = last.containers
        containers = {cid: before[cid] if _same(before.get(cid), c) else c for cid, c in listed.items()}
        changed = {
            cid for cid in before.keys() | containers.keys() if before.get(cid) is not containers.get(cid)
        }
    else:
        containers, changed = listed, set()
    scope = doors.index.update(changed | drains.ids() | last.left_out, containers)
    return Seen(True, containers, scope, networks, taken, checks, drains, kernel, snapshot, now)


def read_all(doors: Doors) -> Snapshot:
    """The whole kernel table (its size said at DEBUG: how often a controller
    reads it is how its cost grows with the table)."""
    snapshot = doors.ipvs.read(counters=False)
    logger.debug("read the IPVS table: {} services", len(snapshot.table))
    return snapshot


def _same(old: Container | None, new: Container) -> bool:
    """The same record for every pass's purpose: equal, and started at the
    same time (a start time is not part of a record's equality, but a drain
    looks at it; a listing that did not inspect says none, which is no news)."""
    return old is not None and old == new and (old.started == new.started or not new.started)


def owned_part(snapshot: Snapshot, vips: frozenset[IPAddress]) -> KernelState:
    """The kernel's table split by ownership: services on dockerlb's VIPs, and the rest."""
    owned = {k: v for k, v in snapshot.table.items() if k.vip in vips}
    return KernelState(owned, vips, frozenset(snapshot.table.keys() - owned.keys()))


def needs_pid(doors: Doors, c: Container) -> bool:
    """Whether the controller may set up this container's namespace (its
    labels ask for DR, TUN or routed NAT), for which it needs its PID."""
    if doors.preparer is None:
        return False
    specs = doors.labels.parse(c.id, c.name, c.labels).specs
    return asks_namespace(specs, doors.settings.masquerade)


def trusted(containers: Mapping[str, Container], t: Trigger) -> Trigger:
    """A kill whose signal may be a label's value (see ``Trigger.signal``)
    proves nothing: it starts a drain, and "die" says when it is down."""
    cached = containers.get(t.container_id or "")
    if t.signal and cached is not None and "signal" in cached.labels:
        return dataclasses.replace(t, down=False, stopping=True)
    return t


def noted(drains: Drains, triggers: Iterable[Trigger]) -> Drains:
    """What only a trigger can say: a container began stopping (drain it
    now) or started (a drain under way is over), in the order they came:
    a stop after a start in one batch (`docker restart`, then `docker
    stop`) drains."""
    for t in triggers:
        if t.container_id and t.stopping:
            drains = drains.told(stopping=[t.container_id])
        elif t.container_id and t.started:
            drains = drains.told(started=[t.container_id])
    return drains


# -- want ------------------------------------------------------------------------------------
def want(doors: Doors, last: Carried, seen: Seen, starting: bool) -> Wanted:
    """Owners decided, then the desired table built (the scope's part,
    merged into the last pass's); the health checker told what to check.
    ``starting``: the start-up pass (checked servers the kernel already
    serves keep serving until a check says otherwise)."""
    wanted = _build(doors, last, seen)
    if doors.health is None:
        return wanted
    new = set(wanted.built.checks) - doors.health.known()
    # At start-up, checked containers the kernel already sends traffic to (a
    # restart) keep serving until a check says otherwise. Later, a new target
    # is a new container: it waits for its checks (even at an address a
    # removed server just had).
    serving = _in_kernel(seen.kernel, new) if new and starting else set()
    doors.health.watch(wanted.built.checks, serving)
    if not new:
        return wanted
    return _build(doors, last, dataclasses.replace(seen, checks=doors.health.states()))


def _build(doors: Doors, last: Carried, seen: Seen) -> Wanted:
    scope, base = seen.scope, last.built
    if scope is not None and base is not None and scope.patched and not seen.full:
        patched = _patched(doors, last, seen, scope, base)
        if patched is not None:
            return patched
        scope = doors.index.widen(scope)  # every container of the services, as any other pass
    partial = scope is not None and base is not None
    # A full pass decides every owner again (a grace period ends with no
    # event to say so), the start-up pass those the kernel's record holds
    # too (an owner whose containers all went while no controller ran);
    # an event pass, its scope's.
    if partial and not seen.full:
        keys = set(scope.keys)  # type: ignore[union-attr]
    else:
        keys = doors.index.claimed() | last.owners.groups.keys() | seen.recorded.keys()
    owners = _owners(doors, last, seen, keys)
    if partial and seen.full:
        assert scope is not None
        moved = {k for k in keys - scope.keys if owners.groups.get(k) != last.owners.groups.get(k)}
        partial = not moved  # an owner changed outside the part that changed: build it all
    if partial:
        assert scope is not None
        containers = [seen.containers[cid] for cid in scope.ids if cid in seen.containers]
    else:
        containers = list(seen.containers.values())
    roles, drains = seen.drains.roles(containers, seen.checks, seen.now)
    part = _built(doors, seen, containers, roles, owners)
    built = merged(base, part, scope) if partial else part  # type: ignore[arg-type]
    return Wanted(built, owners.adopt(part.owners, keys), drains, scope if partial else None)


def _built(
    doors: Doors, seen: Seen, containers: list[Container], roles: Mapping[str, Role], owners: Owners
) -> Desired:
    """``build_desired`` over these containers, as this pass sees the world.
    Over a part, roles forget what they knew of containers outside it:
    those are never stopping or draining (every draining container is in
    every pass's scope, see ``look``)."""
    s = doors.settings
    policy = dataclasses.replace(
        doors.allowed, taken=seen.taken, networks=seen.networks, share=s.share_vips, bindings=doors.bindings
    )
    return build_desired(containers, s.label_prefix, s.masquerade, roles, policy, owners.groups, doors.labels)


def _patched(doors: Doors, last: Carried, seen: Seen, scope: Scope, base: Desired) -> Wanted | None:
    """The roots' servers put into their services' last entries, the rest
    of each as it was: built over the roots and the services' heads alone
    (``Index.update`` chose them: a root joins or leaves, the head stays).
    None when the build shows more changed than that (an owner, a head, a
    warning, a problem, a server another container claims): then the
    services are built whole."""
    keys = set(scope.keys)
    owners = _owners(doors, last, seen, keys)
    if any(owners.groups.get(k) is None or owners.groups.get(k) != last.owners.groups.get(k) for k in keys):
        return None
    containers = [seen.containers[cid] for cid in scope.ids if cid in seen.containers]
    roles, drains = seen.drains.roles(containers, seen.checks, seen.now)
    part = _built(doors, seen, containers, roles, owners)
    if part.problems or keys & set(part.warned) or any(part.heads.get(k) != base.heads[k] for k in keys):
        return None
    roots = scope.root_names
    table: dict[ServiceKey, VirtualService] = {}
    touched: dict[ServiceKey, frozenset[tuple[IPAddress, int]]] = {}
    for key in keys:
        was, now = base.table[key], part.table[key]
        servers = dict(was.servers)  # a copy: its keys' hashes reused, none computed
        idents = set()
        for ident in scope.dropped.get(key, ()):
            old = servers.get(ident)
            if old is not None and old.container in roots:
                del servers[ident]
                idents.add(ident)
        for ident, server in now.servers.items():
            if server.container not in roots:
                continue  # the head's own, as it was
            old = servers.get(ident)
            if old is not None:
                return None  # another container's server there: which one wins depends on all of them
            servers[ident] = server
            idents.add(ident)
        table[key] = VirtualService(now.service, servers)
        touched[key] = frozenset(idents)
    built = merged(base, dataclasses.replace(part, table={**part.table, **table}), scope)
    return Wanted(built, owners.adopt(part.owners, keys), drains, scope, touched)


def _owners(doors: Doors, last: Carried, seen: Seen, keys: set[ServiceKey]) -> Owners:
    """The owners of ``keys`` decided again (core/ownership.py); the
    kernel's servers say who owns a key no owner is known for."""
    unknown = {k for k in keys if k not in last.owners.groups}
    evidence: dict[ServiceKey, str] = {}
    if unknown and seen.kernel is not None:
        evidence = kernel_evidence(unknown, seen.kernel.owned, doors.index.group_at(unknown))
    # The record says more than the servers: it holds owners with none running.
    evidence |= {k: g for k, g in seen.recorded.items() if k in unknown}
    claimants = doors.index.claimants(keys)
    return last.owners.decide(keys, claimants, evidence, seen.now, doors.settings.owner_grace, doors.bindings)


def _in_kernel(kernel: KernelState | None, targets: set[CheckTarget]) -> set[CheckTarget]:
    """Those targets that are real servers with a weight in the kernel now."""
    if kernel is None:
        return set()
    live = {s.ident for vs in kernel.owned.values() for s in vs.servers.values() if s.weight > 0}
    return {t for t in targets if (t.addr, t.port) in live}


# -- prepare ---------------------------------------------------------------------------------
def prepare(doors: Doors, seen: Seen, wanted: Wanted) -> dict[str, str]:
    """Real servers' own namespaces set up, before IPVS sends them anything
    (a DR server without the VIP on lo would reset every connection): the
    containers (by name) that could not be, and why."""
    if doors.preparer is None:
        return {}
    return doors.preparer.prepare(wanted.built.preps, seen.containers, full=seen.full)


# -- decide ----------------------------------------------------------------------------------
def decide(doors: Doors, last: Carried, seen: Seen, wanted: Wanted, failed: Mapping[str, str]) -> Decision:
    """The plan against the kernel as carried, read only where the carried
    table cannot say: a drain that may be over (its connections), a VIP new
    to dockerlb (what else the kernel holds on it)."""
    desired = wanted.built
    if failed:
        keys = doors.index.keys_of(c.id for c in seen.containers.values() if c.name in failed)
        desired = dataclasses.replace(desired, table=without(desired.table, failed, keys))
    state = seen.kernel
    settled = wanted.drains.settled(desired.draining, seen.now)
    if state is None:  # no full pass has read the kernel yet (plan, status before any pass)
        state = owned_part(read_all(doors), doors.director.vips())
    if settled:
        # Only the kernel's connection counts can say: its draining services
        # alone (found by the index: not by walking every server).
        keys = doors.index.keys_of(wanted.drains.ids_of(settled)) & desired.table.keys()
        table = {k: desired.table[k] for k in keys}
        done = drained(table, doors.ipvs.read(counters=False, keys=keys), settled)
        if done:
            # Nothing left to drain: out of the table while still running.
            desired = dataclasses.replace(desired, table=without(desired.table, done, keys))
    decision = _plan(doors, last, seen, wanted, desired, state)
    new_vips = {op.vip for op in decision.ops if isinstance(op, AddVip)}
    if new_vips and not seen.full:
        # Someone may have put a service on a VIP dockerlb is about to take
        # since the kernel was last read: taking the VIP would make that
        # service ours (the next full pass would empty it). Its services only.
        foreign = frozenset(k for k in doors.ipvs.services() if k.vip not in state.vips)
        if foreign != state.foreign:
            decision = _plan(doors, last, seen, wanted, desired, dataclasses.replace(state, foreign=foreign))
    return decision


def _plan(
    doors: Doors, last: Carried, seen: Seen, wanted: Wanted, desired: Desired, state: KernelState
) -> Decision:
    skip = tuple(refused(desired.table, state))
    scope = None if seen.full or last.built is None else wanted.scope
    if scope is None:
        same: set[ServiceKey] = set()
        ops = plan(desired.table, state, skip, same=same)
        want_table: Table = desired.table
        keys = None
        if same:
            # Those the kernel holds as wanted are carried as the desired
            # table's records, equal to what was read: the read's 10,000
            # records are let go, not kept alongside (issue 31's memory).
            owned = dict(state.owned)
            owned.update((k, desired.table[k]) for k in same)
            state = dataclasses.replace(state, owned=owned)
    else:
        keys = scope.keys
        want_table = {k: desired.table[k] for k in keys if k in desired.table}
        vips = {k.vip for k in keys}
        owned = {k: state.owned[k] for k in keys if k in state.owned}
        only = _narrowed(wanted.touched, last.failing)
        ops = plan(want_table, KernelState(owned, state.vips & vips, state.foreign), skip, only)
        # A VIP the scope no longer uses may still carry services outside it.
        elsewhere = {k.vip for k in scope.neighbours if k in desired.table}
        ops = [op for op in ops if not (isinstance(op, RemoveVip) and op.vip in elsewhere)]
        # What keeps failing for good is tried again by full passes only.
        ops = [op for op in ops if not _failing_for_good(last.failing, op)]
    ops = with_names(ops, want_table, last.planned, seen.containers.values())
    return Decision(desired, state, tuple(ops), skip, want_table, keys)


def _narrowed(
    touched: Mapping[ServiceKey, frozenset[tuple[IPAddress, int]]], failing: Mapping[tuple, Failure]
) -> dict[ServiceKey, frozenset[tuple[IPAddress, int]]]:
    """Per patched service, the servers to compare: those its roots touched,
    and those whose last write failed (a retry). A service or VIP whose
    last write failed is compared whole (what else did not take is unknown)."""
    if not touched:
        return {}
    whole = {t[1] for t in failing if t[0] in ("service", "vip")}
    retried: dict[ServiceKey, set[tuple[IPAddress, int]]] = {}
    for target in failing:
        if target[0] == "server" and target[1] in touched:
            retried.setdefault(target[1], set()).add(target[2])
    return {
        key: idents | frozenset(retried.get(key, ()))
        for key, idents in touched.items()
        if key not in whole and key.vip not in whole
    }


def _failing_for_good(failing: Mapping[tuple, Failure], op: Op) -> bool:
    f = failing.get(op_target(op))
    if f is not None and f.permanent:
        return True
    key = service_of(op)
    service = failing.get(("service", key)) if key is not None else None
    return service is not None and service.permanent and not isinstance(op, RemoveServer)


def with_names(ops: list[Op], naming: Table, planned: Table, containers: Iterable[Container]) -> list[Op]:
    """The ops, each removed server named for the container it stood for
    (the kernel knows no names): as ``naming`` or the last pass's table has
    it, else the known container at its address. Only removals need a name
    (added and edited servers come named from the desired table); naming all
    10,000 servers read from the kernel was a quarter of a full pass."""
    if not any(isinstance(op, RemoveServer) and not op.server.container for op in ops):
        return ops
    name = namer(naming, planned, containers)

    def named(op: Op) -> Op:
        if not isinstance(op, RemoveServer) or op.server.container:
            return op
        return RemoveServer(op.key, dataclasses.replace(op.server, container=name(op.key, op.server)))

    return [named(op) for op in ops]


def namer(
    naming: Table, planned: Table, containers: Iterable[Container]
) -> Callable[[ServiceKey, RealServer], str]:
    """Who a kernel server stands for: as ``naming`` or the last pass's table
    has it, else the known container with its address (a paused one keeps
    it; a stopped one has none); "" if none. The containers' addresses are
    gathered only if a server is named by neither table (every container's:
    not on every event pass that removes a server)."""
    by_addr: dict[IPAddress, str] | None = None
    tables = (naming, planned)

    def name(key: ServiceKey, server: RealServer) -> str:
        nonlocal by_addr
        for table in tables:
            vs = table.get(key)
            known = vs.servers.get(server.ident) if vs is not None else None
            if known is not None and known.container:
                return known.container
        if by_addr is None:
            by_addr = {addr: c.name for addr, (c, _) in addresses_of(containers).items()}
        return by_addr.get(server.addr, "")

    return name


# -- apply -----------------------------------------------------------------------------------
def recorded_owners(doors: Doors) -> dict[ServiceKey, str]:
    """The owners' record, or none when it cannot be read (said: the
    servers in the kernel still say who owns what they serve)."""
    try:
        return doors.director.recorded_owners()
    except Exception as e:
        logger.error("the owners' record cannot be read ({}); owners come from the kernel's servers", e)
        return {}


def record_owners(doors: Doors, owners: Owners, force: bool) -> str:
    """The owners written down in the kernel, where a restarted controller
    reads them; why not, or ""."""
    try:
        doors.director.record_owners(owners.groups, force=force)
    except DockerlbError as e:
        return f"the owners' record: {e}"
    except Exception as e:
        return f"the owners' record: unexpected {type(e).__name__}: {e}"
    return ""


def rules_changed(doors: Doors) -> bool:
    """Whether the director's nft ruleset may have changed since dockerlb
    wrote it (True when that cannot be told: then a full pass rewrites)."""
    try:
        return doors.director.rules_changed()
    except Exception as e:
        logger.debug("whether the ruleset changed cannot be told ({}): rewriting it", e)
        return True


def masquerade(doors: Doors, decision: Decision, force: bool) -> str:
    """The SNAT rules for the services that want them, before any is made
    (its first packets are covered); why not, or ""."""
    skipped = {k.vip for k in decision.refused}  # refused whole VIPs
    keys = decision.desired.snat_keys
    if skipped:
        keys = frozenset(k for k in keys if k.vip not in skipped)
    try:
        doors.director.sync_masquerade(keys, force=force)
    except DockerlbError as e:
        return f"masquerade: {e}"
    except Exception as e:
        return f"masquerade: unexpected {type(e).__name__}: {e}"
    return ""


# -- announce --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Announced:
    routes: frozenset[Route] | None  # dockerlb's routes now (None: unknown, read them next time)
    announcements: Mapping[IPAddress, Announcement]
    fault: str  # why a route could not be read or written ("" when none)


def announce(
    doors: Doors, routes: frozenset[Route] | None, desired: Desired, kernel: KernelState | None, ready: bool
) -> Announced:
    """Each VIP's route as its serving real servers (in the desired table
    and in the kernel as the IPVS writes left it) and readiness decide;
    ``routes``: dockerlb's routes as carried (None: read them). Only
    dockerlb's routes are touched; a failure is a value (the IPVS table is
    not this step's)."""
    if doors.announcer is None:
        return Announced(None, {}, "")
    decided = announcing.decide(desired.table, kernel.owned if kernel else {}, desired.announce_min, ready)
    return sync_routes(doors.announcer, routes, decided, doors.settings.announce_metric)


def sync_routes(
    announcer: AnnouncePort,
    routes: frozenset[Route] | None,
    decided: Mapping[IPAddress, Announcement],
    metric: int,
    why: str = "",
) -> Announced:
    """The routes as ``decided`` says (every one withdrawn when it says
    nothing), each change logged with its reason (``why``, when given, for
    every withdrawal)."""
    try:
        present = routes if routes is not None else announcer.routes()
    except DockerlbError as e:
        return Announced(None, decided, f"announce: {e}")
    add, remove = announcing.route_changes(announcing.announced(decided), present, metric)
    now = set(present)
    try:
        for route in remove:
            announcer.remove(route)
            now.discard(route)
            if route.vip not in {r.vip for r in add}:
                a = decided.get(route.vip)
                logger.info("withdrawn: VIP {} ({})", route.vip, why or (a or "no longer a VIP"))
        for route in add:
            announcer.add(route)
            now.add(route)
            a = decided[route.vip]
            logger.info("announced: VIP {} ({} of {} serving)", route.vip, a.serving, a.servers)
    except DockerlbError as e:
        return Announced(None, decided, f"announce: {e}")
    return Announced(frozenset(now), decided, "")


def withdrawn(doors: Doors, last: Carried, why: str) -> tuple[Carried, bool]:
    """Every announced VIP withdrawn (``why``: a graceful stop, not ready);
    what the controller carries then, and whether any route went."""
    if doors.announcer is None:
        return last, False
    before = last.routes
    if before is None:
        try:
            before = doors.announcer.routes()
        except DockerlbError as e:
            logger.error("announce: {}", e)
            return last, False
    decided = {v: dataclasses.replace(a, ready=False) for v, a in last.announcements.items()}
    done = sync_routes(doors.announcer, before, decided, doors.settings.announce_metric, why)
    if done.fault:
        logger.error("{}", done.fault)
    after = dataclasses.replace(last, routes=done.routes, announcements=decided)
    return after, bool(before - (done.routes or frozenset()))


# -- carry -----------------------------------------------------------------------------------
def carry(
    last: Carried, seen: Seen, wanted: Wanted, decision: Decision, outcome: Outcome, left_out: frozenset[str]
) -> Carried:
    """The next pass's start: the kernel as planned against plus what took,
    the failures still standing (a full pass knows all of them anew)."""
    failing = {} if seen.full else dict(last.failing)
    for op in outcome.applied:
        failing.pop(op_target(op), None)
    for f in outcome.failures:
        failing[op_target(f.op)] = f
    if decision.keys is None:
        planned: Table = decision.want
    else:
        # Copied (its keys' hashes reused), the planned part replaced: a
        # comprehension over 1,000 services hashed every key again.
        replaced = dict(last.planned)
        for key in decision.keys - decision.want.keys():
            replaced.pop(key, None)
        replaced.update(decision.want)
        planned = replaced
    return dataclasses.replace(
        last,
        containers=seen.containers,
        networks=seen.networks,
        taken=seen.taken,
        checks=seen.checks,
        drains=wanted.drains,
        owners=wanted.owners,
        built=wanted.built,
        kernel=applied(decision.state, outcome.applied),
        planned=planned,
        left_out=left_out,
        failing=failing,
    )


def lines_of(
    decision: Decision,
    failing: Mapping[tuple, Failure],
    faults: Mapping[str, str],
    unprepared: Mapping[str, str] | None = None,
) -> list[Line]:
    """Everything wrong now, as lines: label problems, conflicts, refused
    services, ops failing, containers whose namespace could not be prepared
    (by name: why), side jobs failing (a line each)."""
    desired = decision.desired
    lines = [Line("ERROR", str(p)) for p in desired.problems]
    lines += [Line("WARNING", w) for w in desired.warnings]
    lines += [
        Line(
            "ERROR",
            f"{key}: VIP {key.vip} already carries IPVS services dockerlb does not own; "
            "refusing to manage it (pick another VIP or remove those services)",
        )
        for key in decision.refused
    ]
    lines += [Line("ERROR", str(f)) for f in failing.values()]
    lines += [
        Line("ERROR", f"container {n!r}: not a real server: {why}")
        for n, why in sorted((unprepared or {}).items())
    ]
    lines += [Line("ERROR", t) for text in faults.values() for t in text.splitlines() if t]
    return lines


def named_state(doors: Doors, last: Carried, counters: bool) -> tuple[KernelState, Snapshot]:
    """What the kernel holds, each real server named by its container (as
    the last pass planned or knows it); its counters only if asked."""
    snapshot = doors.ipvs.read(counters)
    state = owned_part(snapshot, doors.director.vips())
    name = namer({}, last.planned, last.containers.values())
    owned = {
        k: VirtualService(
            vs.service, {i: dataclasses.replace(s, container=name(k, s)) for i, s in vs.servers.items()}
        )
        for k, vs in state.owned.items()
    }
    return KernelState(owned, state.vips, state.foreign), snapshot


def speak(said: frozenset[str], lines: Iterable[Line]) -> frozenset[str]:
    """Log each line not said while it lasted; what is said now."""
    now: set[str] = set()
    for line in lines:
        if line.text not in said and line.text not in now:
            logger.log(line.level, line.text)
        now.add(line.text)
    return frozenset(now)


def limits_of(settings: Settings) -> Limits:
    return Limits(settings.max_label_chars, settings.max_groups, settings.max_vips, settings.max_labels)
