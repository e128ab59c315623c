"""The controller: it sequences a pass's steps (dockerlb/app/passes.py) and
keeps the one value a pass leaves to the next (``passes.Carried``).

A full pass at start (the kernel table is the state: read, diff, fix,
never flush); then, driven by the loop (dockerlb/app/loop.py, which owns the
threads and signals), event passes over what the triggers touch and
periodic full passes that repair drift. ``compute`` is the same reasoning
without writing (``plan`` and ``status`` use it).
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections.abc import Callable

from loguru import logger

from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.app import pair, pass_metrics, passes, startup
from dockerlb.app.applier import Applier, Outcome
from dockerlb.app.passes import Carried, Doors
from dockerlb.core.desired import Desired, VipPolicy
from dockerlb.core.labels import LabelCache
from dockerlb.core.lifecycle import Drains
from dockerlb.core.model import (
    Container,
    IPAddress,
    KernelState,
    ServiceKey,
    Snapshot,
)
from dockerlb.core.ownership import vip_bindings
from dockerlb.core.plan import AddVip, Op, RemoveVip, applied
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
from dockerlb.core.scope import Index
from dockerlb.core.sync import PairState
from dockerlb.errors import DockerlbError
from dockerlb.settings import Settings


class SystemClock:
    """The clock of the world."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def time_ns(self) -> int:
        return time.time_ns()


class Controller:
    def __init__(
        self,
        settings: Settings,
        docker: DockerPort,
        ipvs: IpvsPort,
        director: DirectorPort,
        director_moved: Callable[[], bool] | None = None,
        metrics: ControllerMetrics | None = None,
        preparer: PreparerPort | None = None,
        health: HealthPort | None = None,
        incremental: bool = True,
        clock: Clock | None = None,
        announcer: AnnouncePort | None = None,
        speaker: SpeakerPort | None = None,
    ) -> None:
        self._settings = settings
        self.metrics = metrics or ControllerMetrics()
        # Asked before each full resync: True when the director namespace is no
        # longer the one the adapters hold (its container was restarted).
        self._director_moved = director_moved
        labels = LabelCache(settings.label_prefix, passes.limits_of(settings))
        self._doors = Doors(
            settings,
            docker,
            ipvs,
            director,
            clock or SystemClock(),
            health,
            preparer,
            Applier(ipvs, director, self.metrics),
            labels,
            Index(labels),
            VipPolicy.of(settings.vip_cidr, limits=labels.limits),
            vip_bindings(settings.vip_owner),
            incremental,
            announcer if settings.announce else None,
            speaker if settings.announce else None,
        )
        self._peers = pair.peers_of(settings)
        self.stopping = threading.Event()
        self.ready = threading.Event()
        # What the last pass left: replaced, never changed in place (other
        # threads, metrics and status, read it while the loop works).
        self._last = Carried(Drains(settings.drain_timeout))

    # -- what others read ------------------------------------------------------------
    def containers(self) -> list[Container]:
        """The labelled containers as last seen (see ``refresh``)."""
        return list(self._last.containers.values())

    @property
    def owned_vips(self) -> frozenset[IPAddress]:
        """The VIPs on dockerlb's interface, as of the last pass."""
        kernel = self._last.kernel
        return kernel.vips if kernel is not None else frozenset()

    def server_names(self) -> dict[tuple[ServiceKey, tuple[IPAddress, int]], str]:
        """Which container each real server stands for, as of the last pass."""
        planned = self._last.planned
        return {(k, i): s.container for k, vs in planned.items() for i, s in vs.servers.items()}

    def health(self) -> tuple[bool, str]:
        """Readiness: start-up sync done, and a full pass completed recently."""
        if self.stopping.is_set():
            return False, "stopping"
        if not self.ready.is_set():
            return False, "start-up sync not done yet"
        age, limit = self._full_age(), self._full_limit()
        if age > limit:
            return False, f"no full resync has completed for {age:.0f} s (see the log)"
        return True, f"ready; last full resync {age:.0f} s ago"

    def _full_age(self) -> float:
        """Seconds since the last full pass ended."""
        return self._doors.clock.monotonic() - self._last.last_full

    def _full_limit(self) -> float:
        """The longest the last full pass may be ago for the controller to be ready."""
        return 3 * self._settings.resync_interval + 10

    def drains_left(self) -> dict[str, float]:
        """Each draining container (by name): seconds left before its drain timeout."""
        return self._last.drains.left(self._doors.clock.monotonic())

    def drain_report(self) -> dict[str, object]:
        """What the drain feed tells `status` (adapters/drain_feed.py)."""
        return {"drain_timeout": self._settings.drain_timeout, "drains": self.drains_left()}

    @property
    def draining(self) -> bool:
        """Some server drains: the loop looks at it again soon (no event says when it is over)."""
        return self._last.drains.draining

    # -- plan and status: the same reasoning, writing nothing -------------------------
    def refresh(self, triggers: list[Trigger] | None = None) -> None:
        """Update the container cache: all of it (None), or the triggers' containers."""
        seen = passes.look(self._doors, self._last, triggers)
        self._last = dataclasses.replace(self._last, containers=seen.containers, drains=seen.drains)

    def compute(self) -> tuple[Desired, KernelState, list[Op]]:
        """Desired table, kernel state and the plan between them, from a
        fresh look at everything. Changes nothing outside the controller."""
        doors, last = self._doors, self._last
        seen = passes.look(doors, last, None)
        wanted = passes.want(doors, last, seen, starting=not self.ready.is_set())
        blocked = doors.preparer.blocked(wanted.built.preps, seen.containers) if doors.preparer else {}
        decision = passes.decide(doors, last, seen, wanted, blocked)
        return decision.desired, decision.state, list(decision.ops)

    def kernel_state(self, counters: bool = True) -> tuple[KernelState, Snapshot]:
        """What the kernel holds, every server named (status shows them);
        its counters only if asked (status does)."""
        return passes.named_state(self._doors, self._last, counters)

    # -- one pass ----------------------------------------------------------------------
    def note_lifecycle(self, triggers: list[Trigger]) -> None:
        """What only a trigger can say (a stop began, a start ended one),
        kept for the next pass: a full pass asked for by the same batch must
        be told, or the drain is lost."""
        triggers = [passes.trusted(self._last.containers, t) for t in triggers]
        self._last = dataclasses.replace(self._last, drains=passes.noted(self._last.drains, triggers))

    def reconcile(self, triggers: list[Trigger] | None = None, relist: bool = True) -> Outcome:
        """One pass: look, want, prepare, decide, apply, carry. A full pass
        (no ``triggers``) lists Docker's containers unless told not to
        (``relist``: a periodic resync between relists)."""
        doors, last = self._doors, self._last
        seen = passes.look(doors, last, triggers, relist)
        try:
            return self._decide_and_apply(last, seen, full=triggers is None)
        except BaseException:
            passes.undo(doors, seen)  # the containers as before: the next pass sees the change again
            raise

    def _decide_and_apply(self, last: Carried, seen: passes.Seen, full: bool) -> Outcome:
        doors = self._doors
        wanted = passes.want(doors, last, seen, starting=not self.ready.is_set())
        failed = passes.prepare(doors, seen, wanted)
        decision = passes.decide(doors, last, seen, wanted, failed)
        faults = dict(last.faults)
        # A full pass repairs dockerlb's nft tables only when something may
        # have changed the ruleset since its own last write.
        repair = full and passes.rules_changed(doors)
        faults["masquerade"] = passes.masquerade(doors, decision, force=repair)
        outcome = doors.applier.apply(decision.ops)
        sync_interface = last.sync_interface
        announced = passes.announce(
            doors,
            None if full else last.routes,  # a full pass reads them: drift repaired
            decision.desired,
            # Only with --announce: the table's copy is not free at 1,000 services.
            applied(decision.state, outcome.applied) if doors.announcer is not None else None,
            self._announce_ready(full),
        )
        faults["announce"] = announced.fault
        speaker = last.speaker
        if full and doors.speaker is not None:
            speaker = doors.speaker.state().problem()
        if full:
            sync_interface, failing = pair.sync_pair(
                self._settings, self._peers, seen.networks, doors.docker, doors.ipvs, doors.director
            )
            faults["sync daemons"] = "\n".join(failing)
        # Whenever they change, and on a full pass that found the ruleset moved (drift repaired).
        faults["owners"] = passes.record_owners(doors, wanted.owners, force=repair)
        left_out = (
            frozenset(c.id for c in seen.containers.values() if c.name in failed) if failed else frozenset()
        )
        after = passes.carry(last, seen, wanted, decision, outcome, left_out)
        if any(isinstance(op, AddVip | RemoveVip) for op in outcome.applied) and after.kernel is not None:
            # What status and the metrics call ours now, as the director has it.
            after = dataclasses.replace(
                after, kernel=dataclasses.replace(after.kernel, vips=doors.director.vips())
            )
        if doors.preparer is not None:
            # After IPVS stopped sending: only then may the VIP leave lo.
            doors.preparer.release(wanted.built.preps, seen.containers)
        lines = passes.lines_of(decision, after.failing, faults, failed)
        lines += pair.warnings(self._settings, decision.desired)
        if speaker:
            lines.append(passes.Line("WARNING", speaker))
        self._last = dataclasses.replace(
            after,
            faults=faults,
            said=passes.speak(last.said, lines),
            sync_interface=sync_interface,
            routes=announced.routes,
            announcements=announced.announcements,
            speaker=speaker,
        )
        return outcome

    @property
    def sync_interface(self) -> str:
        """Where the sync daemons run, as the last full pass found it ("" none)."""
        return self._last.sync_interface

    # -- announcement (docs/several-hosts.md) -------------------------------------------
    def _announce_ready(self, full: bool) -> bool:
        """Whether VIPs may be announced after this pass: it is a full one
        (at start-up, the start-up sync itself), or the controller is ready
        (start-up done, a full pass recent). A stop is the loop's to
        withdraw for (``withdraw_all``, then the settle time): a pass that
        ends meanwhile changes nothing of it."""
        return full or (self.ready.is_set() and self._full_age() <= self._full_limit())

    @property
    def announcements(self) -> dict[IPAddress, passes.Announcement]:
        """Each VIP's announcement as the last pass decided it."""
        return dict(self._last.announcements)

    def withdraw_all(self, why: str) -> bool:
        """Every announced VIP withdrawn (a graceful stop, or not ready any
        more: no pass completes); True if any was."""
        self._last, any_withdrawn = passes.withdrawn(self._doors, self._last, why)
        return any_withdrawn

    def pair_state(self, vips: frozenset[IPAddress]) -> PairState:
        """The sync daemons and this director's role in its pair (this thread's adapters)."""
        doors = self._doors
        return pair.state_of(
            self._settings, self._last.sync_interface, doors.ipvs, doors.director, vips, doors.docker
        )

    # -- start-up and one pass, safely (the loop is dockerlb/app/loop.py) ----------------
    def start_up(self, on_health_change: Callable[[str, str], None] = lambda cid, why: None) -> None:
        """What the loop does before it loops: refuse the host's namespace,
        set up the director, and the start-up sync (read, diff, fix).
        ``on_health_change(container_id, reason)``: a check changed."""
        doors = self._doors
        startup.refuse_host_namespace(self._settings, doors.docker, doors.director, self.stopping)
        doors.director.prepare()
        if doors.health is not None:
            doors.health.start(on_health_change)
        startup.set_timeouts(self._settings, doors.ipvs)
        # The start-up pass makes most of what the process keeps: a full
        # collection walks all of it again each time it runs while that
        # grows (the loop collects once, after it: dockerlb/app/loop.py).
        gc.disable()
        try:
            self.reconcile_safely(None)
        finally:
            gc.enable()
        self.ready.set()
        logger.info("ready: start-up sync done; watching Docker events")

    def shut_down(self) -> None:
        """The loop has ended: leave the IPVS table as it is."""
        startup.restore_host(self._settings, self._doors.director)
        logger.info("stopped; the IPVS table is left as it is")

    def _withdraw_when_stale(self) -> None:
        """No pass completes (Docker gone, say): once the controller is not
        ready (no full pass for 3 resync intervals), nothing stays announced."""
        if self._last.routes != frozenset() and self.ready.is_set() and self._full_age() > self._full_limit():
            self.withdraw_all("not ready")

    def director_moved(self) -> bool:
        """The director's namespace is no longer the one the adapters hold
        (its container was restarted): asked before each periodic resync."""
        return self._director_moved is not None and self._director_moved()

    def reconcile_safely(self, triggers: list[Trigger] | None, relist: bool = True) -> None:
        """A pass that never raises on what the outside world hands it: it
        logs and counts the error, and the next pass tries again."""
        clock = self._doors.clock
        started = clock.monotonic()
        try:
            outcome = self.reconcile(triggers, relist)
        except DockerlbError as e:
            # Docker gone: the event watcher reconnects and asks for a full
            # resync; anything else is retried by the periodic resync.
            self.metrics.errors.labels(type(e).__name__).inc()
            logger.error("reconcile failed: {}", e)
            self._withdraw_when_stale()
            return
        except Exception as e:
            # Never crash on what the outside world hands us; say it loudly.
            self.metrics.errors.labels(type(e).__name__).inc()
            logger.exception("reconcile failed unexpectedly; the next resync tries again")
            self._withdraw_when_stale()
            return
        ended = clock.monotonic()
        if triggers is None:
            self._last = dataclasses.replace(self._last, last_full=ended)
        pass_metrics.observe(self.metrics, triggers, outcome, started, ended, clock.time_ns())
