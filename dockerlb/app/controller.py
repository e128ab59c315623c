"""The controller's passes: containers -> desired -> plan -> apply.

A full pass at start (the kernel table is the state: read, diff, fix,
never flush); then, driven by the loop (dockerlb/app/loop.py, which owns the
threads, signals and time), event passes over what the triggers touch
and periodic full passes that repair drift. ``compute`` is the same
reasoning without writing (``plan`` and ``status`` use it).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from dockerlb.adapters.docker_source import Trigger
from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.app.applier import Applier, IpvsWriter
from dockerlb.app.server_prep import ServerPreparer
from dockerlb.core.desired import Desired, VipPolicy, asks_namespace, build_desired, vip_ranges, without
from dockerlb.core.labels import LabelCache, Limits
from dockerlb.core.lifecycle import Drains, drained
from dockerlb.core.model import (
    CheckState,
    CheckTarget,
    Container,
    DockerNetwork,
    IPAddress,
    KernelState,
    RealServer,
    ServiceKey,
    Snapshot,
    Table,
    VirtualService,
    parse_ip,
)
from dockerlb.core.plan import (
    AddVip,
    Op,
    RemoveServer,
    RemoveVip,
    applied,
    plan,
    refused,
)
from dockerlb.core.render import owners
from dockerlb.core.scope import Index, Scope, merged
from dockerlb.core.sync import PairState, SyncDaemon, plan_daemons, wanted_daemons
from dockerlb.errors import ConfigError, DockerlbError
from dockerlb.retry import retrying
from dockerlb.settings import Settings


class DockerPort(Protocol):
    def list_containers(self, detailed: Callable[[Container], bool] | None = None) -> list[Container]: ...
    def networks(self) -> list[DockerNetwork]: ...
    def inspect(self, container_id: str) -> Container | None: ...
    def events(self, since: float): ...
    def stop_events(self) -> None: ...
    def ping(self) -> None: ...


class IpvsPort(IpvsWriter, Protocol):
    def read(self, counters: bool = True) -> Snapshot: ...
    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None: ...
    def daemons(self) -> frozenset[SyncDaemon]: ...
    def start_daemon(self, daemon: SyncDaemon) -> None: ...
    def stop_daemon(self, state: str) -> None: ...


class HealthPort(Protocol):
    def start(self, on_change: Callable[[str, str], None]) -> None: ...
    def watch(self, targets, serving=()) -> None: ...
    def known(self) -> set[CheckTarget]: ...
    def states(self) -> dict[str, CheckState]: ...


class DirectorPort(Protocol):
    def prepare(self) -> None: ...
    def addresses(self) -> dict[IPAddress, str]: ...
    def local_addresses(self) -> dict[IPAddress, str]: ...
    def vips(self) -> frozenset[IPAddress]: ...
    def add_vip(self, vip: IPAddress) -> None: ...
    def remove_vip(self, vip: IPAddress) -> None: ...
    def sync_masquerade(self, vips, force: bool = False) -> None: ...
    def restore_forwarding(self) -> None: ...


@dataclass(frozen=True)
class Outcome:
    ops: list[Op]
    failed: int


class Controller:
    def __init__(
        self,
        settings: Settings,
        docker: DockerPort,
        ipvs: IpvsPort,
        director: DirectorPort,
        director_moved: Callable[[], bool] | None = None,
        metrics: ControllerMetrics | None = None,
        preparer: ServerPreparer | None = None,
        health: HealthPort | None = None,
        incremental: bool = True,
    ) -> None:
        self._settings = settings
        # Sets up real servers' own namespaces (DR, TUN, routed NAT).
        self._preparer = preparer
        self._docker = docker
        self._ipvs = ipvs
        self._director = director
        # Asked before each full resync: True when the director namespace is no
        # longer the one the adapters hold (its container was restarted).
        self._director_moved = director_moved
        self.metrics = metrics or ControllerMetrics()
        # Replaced, never changed in place: other threads (metrics, status)
        # read it while the loop works.
        self._containers: dict[str, Container] = {}
        # Problems logged by the last pass / this one, so each is said once
        # while it lasts (and again if it comes back): bounded by what is
        # wrong now, never growing with what was once wrong.
        self._said: set[str] = set()
        self._saying: set[str] = set()
        # The group each service belongs to, as the last pass decided (see desired.py).
        self._owners: dict[ServiceKey, str] = {}
        self.owned_vips: frozenset[IPAddress] = frozenset()  # as of the last pass
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self._last_full_ok = 0.0  # monotonic time of the last full pass that completed
        self._drains = Drains(settings.drain_timeout)
        self._allowed = vip_ranges(settings.vip_cidr)
        self._health = health  # dockerlb's own checks (dockerlb.check)
        # The director's own addresses (no VIP may be one). They change rarely,
        # and reading them is a netlink dump: once per full pass, not per event.
        self._taken: dict[IPAddress, str] | None = None
        # Docker's networks (no VIP inside one), read on every full pass.
        self._networks: tuple[DockerNetwork, ...] = ()
        self._checks: dict[str, CheckState] = {}  # the health checks' states the last build used
        self._limits = Limits(settings.max_label_chars, settings.max_groups, settings.max_vips)
        self._labels = LabelCache(settings.label_prefix, self._limits)  # parsed once per container
        self._applier = Applier(ipvs, director, self.metrics)
        # Event passes rebuild and plan only what their events touch (issue
        # 16); False: every pass builds, reads and plans everything, the path
        # the incremental one is tested against.
        self._incremental = incremental
        self._index = Index(self._labels)
        # What the last pass left, for the next event pass to start from;
        # None: unknown (no pass yet, or the last one failed): build or read it.
        self._built: Desired | None = None  # the desired table as built, merged
        self._kernel: KernelState | None = None  # the kernel table as last read, with the applied ops
        # The table the last pass planned: who each real server was (the
        # kernel knows no container names, and a removed server's container
        # is gone). Replaced, never changed in place: /metrics reads it.
        self._planned: Table = {}
        self._scope: Scope | None = None  # this event pass's part; None: all of it
        self._left_out: set[str] = set()  # ids the last pass left out: not set up
        self._full = True  # this pass reads the kernel (a full pass, or not incremental)
        self._daemons_failing: set[str] = set()  # sync-daemon failures said by the last full pass

    # -- one pass ----------------------------------------------------------------
    def containers(self) -> list[Container]:
        """The labelled containers as last seen (see ``refresh``)."""
        return list(self._containers.values())

    def server_names(self) -> dict[tuple[ServiceKey, tuple[IPAddress, int]], str]:
        """Which container each real server stands for, as of the last pass."""
        planned = self._planned
        return {(k, i): s.container for k, vs in planned.items() for i, s in vs.servers.items()}

    def health(self) -> tuple[bool, str]:
        """Readiness: start-up sync done, and a full pass completed recently."""
        if self.stopping.is_set():
            return False, "stopping"
        if not self.ready.is_set():
            return False, "start-up sync not done yet"
        age = time.monotonic() - self._last_full_ok
        limit = 3 * self._settings.resync_interval + 10
        if age > limit:
            return False, f"no full resync has completed for {age:.0f} s (see the log)"
        return True, f"ready; last full resync {age:.0f} s ago"

    def desired(self) -> Desired:
        """The desired table now (the scope's part merged into the last pass's
        on an event pass); also tells the health checker what to check."""
        desired = self._build()
        if self._health is not None:
            new = set(desired.checks) - self._health.known()
            # At start-up, checked containers the kernel already sends traffic
            # to (a restart) keep serving until a check says otherwise. Later,
            # a new target is a new container: it waits for its checks (even
            # at an address a removed server just had).
            serving = self._in_kernel(new) if new and not self.ready.is_set() else set()
            self._health.watch(desired.checks, serving)
            if new:
                desired = self._build()
        return desired

    def _build(self) -> Desired:
        s, scope, base = self._settings, self._scope, self._built
        if scope is None or base is None:
            containers = list(self._containers.values())
        else:
            containers = [self._containers[cid] for cid in scope.ids if cid in self._containers]
        if self._taken is None:
            self._taken = self._director.addresses()
        policy = VipPolicy(self._allowed, self._taken, self._networks, s.share_vips, self._limits)
        checks = self._health.states() if self._health is not None else {}
        self._checks = checks
        # Over the scope alone, roles forget what they knew of containers
        # outside it: those are never stopping or draining (every draining
        # container is in every scope, see ``refresh``).
        roles = self._drains.roles(containers, checks, time.monotonic())
        part = build_desired(
            containers, s.label_prefix, s.masquerade, roles, policy, self._owners, self._labels
        )
        return part if scope is None or base is None else merged(base, part, scope)

    def _in_kernel(self, targets: set[CheckTarget]) -> set[CheckTarget]:
        """Those targets that are real servers with a weight in the kernel now."""
        try:
            snapshot, ours = self._ipvs.read(counters=False), self._director.vips()
        except DockerlbError:
            return set()  # no evidence: they start pending
        live = {
            s.ident
            for k, vs in snapshot.table.items()
            if k.vip in ours
            for s in vs.servers.values()
            if s.weight > 0
        }
        return {t for t in targets if (t.addr, t.port) in live}

    def kernel_state(self, counters: bool = True) -> tuple[KernelState, Snapshot]:
        """What the kernel holds, every server named (status shows them);
        its counters only if asked (status does)."""
        state, snapshot = self._read_kernel(counters)
        name = self._namer({})
        owned = {}
        for k, vs in state.owned.items():
            servers = {i: dataclasses.replace(s, container=name(k, s)) for i, s in vs.servers.items()}
            owned[k] = VirtualService(vs.service, servers)
        return KernelState(owned, state.vips, state.foreign), snapshot

    def _read_kernel(self, counters: bool) -> tuple[KernelState, Snapshot]:
        """What the kernel holds, its servers unnamed (a pass names only what
        it removes, see ``_with_names``)."""
        vips = self._director.vips()
        snapshot = self._ipvs.read(counters)
        owned = {k: v for k, v in snapshot.table.items() if k.vip in vips}
        return KernelState(owned, vips, frozenset(snapshot.table.keys() - owned.keys())), snapshot

    def _namer(self, naming: Table) -> Callable[[ServiceKey, RealServer], str]:
        """Who a kernel server stands for: as ``naming`` or the last pass's
        table has it, else the known container with its address (a paused one
        keeps it; a stopped one has none); "" if none."""
        by_addr = {addr: c.name for addr, (c, _) in owners(self._containers.values()).items()}
        tables = (naming, self._planned)

        def name(key: ServiceKey, server: RealServer) -> str:
            known = [t[key].servers for t in tables if key in t]
            return _name(server.ident, known) or by_addr.get(server.addr, "")

        return name

    def refresh(self, triggers: list[Trigger] | None = None) -> None:
        """Update the container cache: all of it (None), or the triggers' containers."""
        if triggers is None:
            self._refresh_all()
            return
        triggers = [self._trusted(t) for t in triggers]
        last = {t.container_id: t for t in triggers if t.container_id}  # the latest word per container
        prefix = self._settings.label_prefix
        containers = dict(self._containers)
        self.note_lifecycle(triggers)
        for cid, t in last.items():
            if t.gone:
                containers.pop(cid, None)
                continue
            cached = containers.get(cid)
            if t.down:
                if cached is not None:
                    containers[cid] = dataclasses.replace(cached, running=False)
                continue
            if t.network and (cached is None or not cached.running):
                # Not known running (maybe mid-start: dockerd would hold our
                # inspect until the start is done); its "start" event follows.
                continue
            c = self._docker.inspect(cid)
            if c is None or not any(k.startswith(prefix) for k in c.labels):
                containers.pop(cid, None)
            else:
                # The PID only where the listing has it too (see ``_needs_pid``):
                # a full pass finds this record unchanged.
                containers[c.id] = c if self._needs_pid(c) else dataclasses.replace(c, pid=0)
        self._labels.forget(cid for cid, t in last.items() if t.gone or cid not in containers)
        self._containers = containers
        # Draining containers are in every pass's scope: their clocks run
        # (settled, retired) with no event to say so, and ``roles`` keeps
        # drain clocks only for the containers it is given.
        # So are the containers the last pass left out (their namespace could
        # not be set up): the preparer retries them on every pass, and once
        # one succeeds its servers must be planned, whatever the event.
        roots = last.keys() | self._drains.ids() | self._left_out
        scope = self._index.update(roots, containers)
        self._scope, self._full = (scope, False) if self._incremental else (None, True)

    def note_lifecycle(self, triggers: list[Trigger]) -> None:
        """What only a trigger can say: a container began stopping (drain it
        now) or started (a drain under way is over). A listing sees either
        as plain "running", so a full pass asked for by the same batch must
        be told this first, or the drain is lost."""
        for t in map(self._trusted, triggers):
            if t.container_id and t.stopping:
                self._drains.stopping(t.container_id)
            elif t.container_id and t.started:
                self._drains.started(t.container_id)

    def _refresh_all(self) -> None:
        """A full pass: every container, Docker's networks and the director's
        addresses, read again. Only what changed since the last pass is
        rebuilt (a missed event shows up here as a changed record); the
        whole table is built again when what every entry depends on changed
        (networks, the director's addresses, health checks) or no last table
        is known. The kernel is read and planned whole either way."""
        before = self._containers
        self._containers = {c.id: c for c in self._docker.list_containers(self._needs_pid)}
        self._labels.keep_only(self._containers)
        networks = tuple(self._docker.networks())
        taken = self._director.addresses()
        checks = self._health.states() if self._health is not None else {}
        same = (networks, taken, checks) == (self._networks, self._taken, self._checks)
        self._networks, self._taken, self._checks = networks, taken, checks
        self._full = True
        if not (self._incremental and same and self._built is not None):
            self._index.sync(self._containers)
            self._scope = None
            return
        # An unchanged container keeps the record it had (the listing may have
        # made an equal one): the index and the label memo hold that one, and
        # two records of each container would double the controller's memory.
        now = {cid: before[cid] if before.get(cid) == c else c for cid, c in self._containers.items()}
        self._containers = now
        changed = {cid for cid in before.keys() | now.keys() if before.get(cid) is not now.get(cid)}
        # As on an event pass (see ``refresh``): draining and left-out
        # containers are rebuilt every time.
        self._scope = self._index.update(changed | self._drains.ids() | self._left_out, now)

    def _needs_pid(self, c: Container) -> bool:
        """Whether the controller may set up this container's namespace (its
        labels ask for DR, TUN or routed NAT), for which it needs its PID."""
        if self._preparer is None:
            return False
        specs = self._labels.parse(c.id, c.name, c.labels).specs
        return asks_namespace(specs, self._settings.masquerade)

    def _trusted(self, t: Trigger) -> Trigger:
        """A kill whose signal may be a label's value (see ``Trigger.signal``)
        proves nothing: it starts a drain, and "die" says when it is down."""
        cached = self._containers.get(t.container_id or "")
        if t.signal and cached is not None and "signal" in cached.labels:
            return dataclasses.replace(t, down=False, stopping=True)
        return t

    def compute(
        self, desired: Desired | None = None, failed: dict[str, str] | None = None
    ) -> tuple[Desired, KernelState, list[Op]]:
        """Desired table, kernel state and the plan between them. ``failed``
        names containers left out (their namespace could not be set up); by
        default those the controller cannot even enter. Changes nothing
        outside the controller (which remembers names and VIPs)."""
        desired = desired or self.desired()
        if failed is None:
            failed = self._preparer.blocked(desired, self._containers) if self._preparer else {}
        desired, state, ops, _ = self._compute(desired, failed)
        return desired, state, ops

    def _compute(
        self, desired: Desired, failed: dict[str, str]
    ) -> tuple[Desired, KernelState, list[Op], list[ServiceKey]]:
        """``compute``, with the services refused (asked for once per pass:
        it looks at every service)."""
        settled = self._drains.settled(desired.draining, time.monotonic())
        if self._full or self._kernel is None or settled:
            # A full pass, or the table as last applied is unknown (no pass
            # yet, a failed write), or a drain may be over: only the
            # kernel's connection counts can say.
            return self._compute_read(desired, failed, settled)
        state = self._kernel
        skip = refused(desired.table, state)
        # A desired table built whole (no last one to merge into, or a
        # fallback: see scope.py) is planned whole, still without a read.
        scope = None if self._built is None else self._scope
        keys = None if scope is None else scope.keys
        want = desired.table if keys is None else {k: desired.table[k] for k in keys if k in desired.table}
        if failed:
            want = without(want, failed)
        ops = self._with_names(self._plan_part(want, state, scope, desired, skip), want)
        if any(isinstance(op, AddVip) for op in ops):
            # A VIP new to dockerlb: what else the kernel holds on it is
            # known only as of the last read, and someone may have put a
            # service there since. Taking the VIP would make that service
            # ours (the next resync would remove its servers): read first.
            return self._compute_read(desired, failed, settled)
        self._remember(want, keys)
        self.owned_vips = state.vips
        return desired, state, ops, skip

    def _compute_read(
        self, desired: Desired, failed: dict[str, str], settled: set[str]
    ) -> tuple[Desired, KernelState, list[Op], list[ServiceKey]]:
        """``compute`` from a fresh read of the kernel, planning everything."""
        if failed:
            desired = dataclasses.replace(desired, table=without(desired.table, failed))
        state, snapshot = self._read_kernel(counters=False)
        done = drained(desired.table, snapshot, settled)
        if done:
            # Nothing left to drain: out of the table while still running.
            desired = dataclasses.replace(desired, table=without(desired.table, done))
        skip = refused(desired.table, state)
        ops = self._with_names(plan(desired.table, state, skip), desired.table)
        self._planned = desired.table
        self.owned_vips = state.vips
        return desired, state, ops, skip

    def _with_names(self, ops: list[Op], naming: Table) -> list[Op]:
        """The ops, each removed server named for the container it stood for
        (the kernel knows no names): as ``naming`` or the last pass's table
        has it, else the known container at its address. Only removals need
        a name (added and edited servers come named from the desired table);
        naming all 10,000 servers read from the kernel was a quarter of a
        full pass."""
        if not any(isinstance(op, RemoveServer) and not op.server.container for op in ops):
            return ops
        name = self._namer(naming)

        def named(op: Op) -> Op:
            if not isinstance(op, RemoveServer) or op.server.container:
                return op
            return RemoveServer(op.key, dataclasses.replace(op.server, container=name(op.key, op.server)))

        return [named(op) for op in ops]

    def _plan_part(
        self, want: Table, state: KernelState, scope: Scope | None, desired: Desired, skip: list[ServiceKey]
    ) -> list[Op]:
        """The plan for the scope's services (None: all) against the kernel as last applied."""
        if scope is None:
            return plan(want, state, skip)
        vips = {k.vip for k in scope.keys}
        owned = {k: state.owned[k] for k in scope.keys if k in state.owned}
        ops = plan(want, KernelState(owned, state.vips & vips, state.foreign), skip)
        if not any(isinstance(op, RemoveVip) for op in ops):
            return ops
        # A VIP the scope no longer uses may still carry services outside it.
        elsewhere = {k.vip for k in scope.neighbours if k in desired.table}
        return [op for op in ops if not (isinstance(op, RemoveVip) and op.vip in elsewhere)]

    def _remember(self, want: Table, keys: frozenset[ServiceKey] | None) -> None:
        """What was just planned: these services (None: all of them)."""
        if keys is None:
            self._planned = want
            return
        planned = dict(self._planned)
        for k in keys:
            planned.pop(k, None)
        self._planned = planned | dict(want)

    def reconcile(self, triggers: list[Trigger] | None = None) -> Outcome:
        try:
            return self._reconcile(triggers)
        except BaseException:
            # Whatever went wrong, the next pass builds and reads afresh.
            self._built = self._kernel = None
            raise

    def _reconcile(self, triggers: list[Trigger] | None) -> Outcome:
        self.refresh(triggers)
        built = self.desired()
        failed: dict[str, str] = {}
        if self._preparer is not None:
            # Before IPVS sends them anything: a DR server without the VIP on
            # lo would reset every connection.
            failed = self._preparer.prepare(built, self._containers, full=triggers is None)
            for name, why in sorted(failed.items()):
                self._say_once("error", f"container {name!r}: not a real server: {why}")
            # A walk over every container only when some failed.
            left_out = (c.id for c in self._containers.values() if c.name in failed) if failed else ()
            self._left_out = set(left_out)
        desired, state, ops, skipped = self._compute(built, failed)
        self._owners = desired.owners
        self._report(desired, skipped)
        self._said, self._saying = self._saying, set()
        snat = desired.snat_vips - {k.vip for k in skipped}  # refused whole VIPs
        routed = any(p.route_via_director for p in desired.preps.values())
        if (snat or routed) and self._settings.sync_interface and not self._settings.floating_dip:
            self._say_once(
                "warning",
                "director pair without --floating-dip: NAT services SNAT to, or route their servers' "
                "replies via, this director's own address, so their connections cannot survive a "
                "failover (and two directors take turns rewriting routed servers' default routes); "
                "set --floating-dip to the pair's floating inside address (README, High availability)",
            )
        # Before any service exists, so its first packets are already covered;
        # a no-op when the VIP set is unchanged.
        self._try("masquerade", lambda: self._director.sync_masquerade(snat, force=triggers is None))
        outcome = Outcome(ops, self._applier.apply(ops))
        if triggers is None:
            self._try("sync daemons", self._sync_daemons)
        if any(isinstance(op, (AddVip, RemoveVip)) for op in ops):
            # What status and the metrics call ours now, not before this pass.
            self.owned_vips = self._director.vips()
        if self._preparer is not None:
            # After IPVS stopped sending: only then may the VIP leave lo.
            self._preparer.release(desired, self._containers)
        # The next event pass starts from here; after a failed write the
        # kernel holds something between the two tables: read it again.
        self._built = built
        self._kernel = applied(state, ops) if not outcome.failed else None
        return outcome

    def _sync_daemons(self) -> None:
        """Start the connection-sync daemons a pair needs, as drift: a
        daemon stopped by hand is put back on the next full pass, and one
        running in a wanted state with another interface or id (someone
        else's) is replaced, said as a warning. Failures are said once while
        they last: only full passes come here, so they keep their own record."""
        wanted = wanted_daemons(self._settings.sync_interface, self._settings.sync_id)
        if not wanted:
            return
        failing: set[str] = set()

        def failed(text: str) -> None:
            if text not in self._daemons_failing:
                logger.error(text)
            failing.add(text)

        try:
            running = self._ipvs.daemons()
        except DockerlbError as e:
            failed(f"IPVS sync daemons: cannot read which run: {e}")
            self._daemons_failing = failing
            return
        stop, start = plan_daemons(wanted, running)
        blocked: set[str] = set()
        for state in stop:
            replaced = ", ".join(str(d) for d in sorted(running) if d.state == state)
            try:
                self._ipvs.stop_daemon(state)
            except DockerlbError as e:
                failed(f"IPVS sync daemon {replaced}: cannot stop it to start it as set: {e}")
                blocked.add(state)
                continue
            logger.warning("IPVS sync daemon stopped: {} (not as set)", replaced)
        for daemon in start:
            if daemon.state in blocked:
                continue
            try:
                self._ipvs.start_daemon(daemon)
            except DockerlbError as e:
                failed(f"IPVS sync daemon {daemon}: cannot start it: {e}")
                continue
            logger.info("IPVS sync daemon started: {}", daemon)
        self._daemons_failing = failing

    def pair_state(self, vips: frozenset[IPAddress]) -> PairState:
        """The sync daemons and this director's role in its pair (this thread's adapters)."""
        return pair_state_of(self._settings, self._ipvs, self._director, vips)

    def _report(self, desired: Desired, skipped: list[ServiceKey]) -> None:
        for problem in desired.problems:
            self._say_once("error", str(problem))
        for warning in desired.warnings:
            self._say_once("warning", warning)
        for key in skipped:
            self._say_once(
                "error",
                f"{key}: VIP {key.vip} already carries IPVS services dockerlb does not own; "
                "refusing to manage it (pick another VIP or remove those services)",
            )

    def _say_once(self, level: str, text: str) -> None:
        if text not in self._said and text not in self._saying:
            logger.log(level.upper(), text)
        self._saying.add(text)

    def _try(self, what: str, fn) -> None:
        try:
            fn()
        except DockerlbError as e:
            logger.error("{}: {}", what, e)

    # -- start-up and one pass, safely (the loop is dockerlb/app/loop.py) ----------------
    def start_up(self, on_health_change: Callable[[str, str], None] = lambda cid, why: None) -> None:
        """What the loop does before it loops: refuse the host's namespace,
        set up the director, and the start-up sync (read, diff, fix).
        ``on_health_change(container_id, reason)``: a check changed."""
        s = self._settings
        self._refuse_host_namespace()
        self._director.prepare()
        if self._health is not None:
            self._health.start(on_health_change)
        if s.tcp_timeout or s.tcpfin_timeout or s.udp_timeout:
            self._try(
                "IPVS timeouts",
                lambda: self._ipvs.set_timeouts(s.tcp_timeout, s.tcpfin_timeout, s.udp_timeout),
            )
        self.reconcile_safely(None)
        self.ready.set()
        logger.info("ready: start-up sync done; watching Docker events")

    def _refuse_host_namespace(self) -> None:
        """Refuse a director that is the Docker host's own namespace (it holds
        a Docker network's gateway: Docker puts its bridges there) unless
        --allow-host-netns says that is meant."""
        if self._settings.allow_host_netns:
            return
        # Its interfaces' addresses only: every container's default route
        # points at a Docker gateway, so gateways prove nothing.
        own = self._director.local_addresses()
        networks: list[DockerNetwork] = []
        # Docker may be restarting: wait for it (until stopped), never skip the check.
        for attempt in retrying(self._settings, until=self.stopping):
            with attempt:
                networks = self._docker.networks()
        for network in networks:
            for gateway in network.gateways:
                if gateway in own:
                    raise ConfigError(
                        f"the director namespace holds {gateway}, the gateway of Docker network "
                        f"{network.name!r}: it is the Docker host's own namespace, where VIPs, ARP and "
                        "sysctls would change the host itself; run dockerlb in its own namespace "
                        "(see compose/), or pass --allow-host-netns if this is meant"
                    )

    def shut_down(self) -> None:
        """The loop has ended: leave the IPVS table as it is."""
        if self._settings.allow_host_netns:
            # Only there is IPv6 forwarding the host's own setting.
            self._try("IPv6 forwarding", self._director.restore_forwarding)
        logger.info("stopped; the IPVS table is left as it is")

    @property
    def draining(self) -> bool:
        """Some server drains: the loop looks at it again soon (no event says when it is over)."""
        return self._drains.draining

    def director_moved(self) -> bool:
        """The director's namespace is no longer the one the adapters hold
        (its container was restarted): asked before each periodic resync."""
        return self._director_moved is not None and self._director_moved()

    def reconcile_safely(self, triggers: list[Trigger] | None) -> None:
        """A pass that never raises on what the outside world hands it: it
        logs and counts the error, and the next pass tries again."""
        started = time.monotonic()
        kind = "full" if triggers is None else "partial"
        try:
            outcome = self.reconcile(triggers)
        except DockerlbError as e:
            # Docker gone: the event watcher reconnects and asks for a full
            # resync; anything else is retried by the periodic resync.
            self.metrics.errors.labels(type(e).__name__).inc()
            logger.error("reconcile failed: {}", e)
            return
        except Exception as e:
            # Never crash on what the outside world hands us; say it loudly.
            self.metrics.errors.labels(type(e).__name__).inc()
            logger.exception("reconcile failed unexpectedly; the next resync tries again")
            return
        took = time.monotonic() - started
        self.metrics.reconcile_duration.labels(kind).observe(took)
        if triggers is None:
            self._last_full_ok = time.monotonic()
        now = time.time_ns()
        for t in triggers or ():
            if t.container_id and t.time_nano:
                lag = max(0, now - t.time_nano) / 1e9
                self.metrics.event_to_applied.observe(lag)
                logger.debug(
                    "event {} {} applied {:.1f} ms after it happened",
                    t.reason,
                    t.container_id[:12],
                    lag * 1e3,
                )
        logger.debug(
            "{} pass: {} op(s), {} failed, {:.0f} ms", kind, len(outcome.ops), outcome.failed, took * 1e3
        )


def pair_state_of(
    settings: Settings, ipvs: IpvsPort, director: DirectorPort, vips: frozenset[IPAddress]
) -> PairState:
    """The running sync daemons, the wanted ones, and the role (of these
    adapters: the metrics thread passes its own sockets): "active"
    when one of ``vips`` (the director's own, on its dummy interface) or the
    floating DIP is on another interface of the director, where keepalived
    puts them on the VRRP master; "standby" otherwise; "" when no sync is asked."""
    wanted = wanted_daemons(settings.sync_interface, settings.sync_id)
    role = ""
    if wanted:
        floating = {parse_ip(settings.floating_dip)} if settings.floating_dip else set()
        role = "active" if (vips | floating) & director.local_addresses().keys() else "standby"
    return PairState(ipvs.daemons(), wanted, role)


def _name(ident: tuple[IPAddress, int], known: list[Mapping[tuple[IPAddress, int], RealServer]]) -> str:
    """The container name the first of these tables gives this server ("" if none)."""
    return next((m[ident].container for m in known if ident in m and m[ident].container), "")
