"""The loop: what drives the controller's passes, forever.

It owns the threads (the Docker event watcher, the signal watcher), the
signals and the time: the start-up sync, then Docker events as *triggers*
for event passes (a burst gathered into one pass, a lone event at once), a
periodic full pass that repairs drift, a look at draining servers every
``DRAIN_POLL``, a full pass after Docker comes back, and a clean stop on the
first signal (a second one forces). Time comes from a ``Clock`` so tests
can drive it: the controller's own.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import signal
import threading
from typing import Protocol

from loguru import logger

from dockerlb.app import controller as controller_module
from dockerlb.app.controller import Controller
from dockerlb.core.ports import FULL_RESYNC, DockerPort, Trigger
from dockerlb.errors import DirectorMoved, DockerlbError, Retryable
from dockerlb.retry import retrying
from dockerlb.settings import Settings

# While a server drains, how often its connections are looked at (seconds).
DRAIN_POLL = 1.0
_STOP = Trigger(None, "stop")
# A burst is gathered for at most this many debounce windows: a steady
# stream of events still gets a pass that often.
BURST_WINDOWS = 10


class ForcedStop(Exception):
    """A second signal arrived while stopping: give up at once."""


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    def time_ns(self) -> int: ...
    def wait(self, triggers: queue.Queue[Trigger], timeout: float) -> Trigger:
        """The next trigger, waiting at most ``timeout`` s; else ``queue.Empty``."""
        ...


class SystemClock(controller_module.SystemClock):
    """The clock of the world: ``time``, and a queue that really waits."""

    def wait(self, triggers: queue.Queue[Trigger], timeout: float) -> Trigger:
        return triggers.get(timeout=timeout)


class Loop:
    def __init__(
        self, controller: Controller, docker: DockerPort, settings: Settings, clock: Clock | None = None
    ) -> None:
        self._ctl = controller
        self._docker = docker
        self._settings = settings
        # The controller's clock, unless a test hands one to both.
        self._clock = clock or SystemClock()
        self.triggers: queue.Queue[Trigger] = queue.Queue()
        self.stopping = controller.stopping  # shared: the controller's health says "stopping"
        self._last_trigger = float("-inf")  # when the last batch was taken (monotonic)
        self._last_ids: set[str | None] = set()  # the containers that batch was about
        self._signals = 0  # how many stop signals arrived (the handler only counts them)
        self._resyncs = 0  # periodic resyncs so far (every ``relist_every``th lists Docker's containers)

    def run(self) -> None:
        """Start-up sync, then events and periodic resyncs until ``stop()``."""
        s, clock, ctl = self._settings, self._clock, self._ctl
        # Taken before listing, so no event between the list and the
        # subscription is lost (a second of slack for clock granularity).
        since = clock.time() - 1.0
        ctl.start_up(self.nudge)
        # The start-up made most of what the process keeps (10,000 containers'
        # records, the tables, the index): collected once, then frozen, so a
        # full collection later walks only what came since (they paused
        # resyncs for 92-235 ms with 10,000 containers: issue 31).
        gc.collect()
        gc.freeze()
        watcher = threading.Thread(target=self._watch, args=(since,), name="docker-events", daemon=True)
        watcher.start()
        next_resync = clock.monotonic() + s.resync_interval
        stopped = False  # the loop ended on a stop (not on an exception)
        try:
            while not self.stopping.is_set():
                wake = next_resync
                if ctl.draining:
                    wake = min(wake, clock.monotonic() + DRAIN_POLL)
                try:
                    first = clock.wait(self.triggers, max(0.0, wake - clock.monotonic()))
                except queue.Empty:
                    if clock.monotonic() >= next_resync:
                        self._resyncs += 1
                        self._full_resync(relist=self._resyncs % s.relist_every == 0)
                        next_resync = clock.monotonic() + s.resync_interval
                    else:
                        # Look at the draining servers' connections again.
                        ctl.reconcile_safely([])
                    continue
                if first is _STOP:
                    break
                # Events about other containers arriving one window apart or
                # less are a burst under way, even when each pass is quick
                # enough to empty the queue. One container's own events (a
                # start's network connect, then its start) are one event.
                streaming = (
                    clock.monotonic() - self._last_trigger < s.debounce
                    and first.container_id not in self._last_ids
                )
                batch = [first, *self._gather(s.debounce, streaming, first)]
                self._last_trigger = clock.monotonic()
                self._last_ids = {t.container_id for t in batch}
                if any(t is _STOP for t in batch):
                    break
                if any(t.container_id is None for t in batch):
                    # e.g. `docker service scale` down: a "service update" event
                    # and the poll's "shutting down" for the tasks it stops.
                    ctl.note_lifecycle(batch)
                    self._full_resync()
                    next_resync = clock.monotonic() + s.resync_interval
                else:
                    now = clock.time_ns()
                    for t in batch:
                        logger.debug(
                            "trigger {} {} ({:.0f} ms after the event)",
                            t.reason,
                            (t.container_id or "")[:12],
                            (now - t.time_nano) / 1e6,
                        )
                    ctl.reconcile_safely(batch)
            stopped = True
        finally:
            self.stopping.set()
            if stopped:
                self._withdraw()
            self._docker.stop_events()
            watcher.join(timeout=5)
            ctl.shut_down()

    def _withdraw(self) -> None:
        """A graceful stop's first step with --announce: every VIP withdrawn,
        then ``--announce-settle`` seconds for the speaker to withdraw them
        and the routers to move their traffic to other directors, while this
        one still forwards what reaches it. A second signal cuts it short."""
        if not self._ctl.withdraw_all("stopping"):
            return
        settle = self._settings.announce_settle
        logger.info("VIPs withdrawn: stopping in {:g} s (--announce-settle)", settle)
        deadline = self._clock.monotonic() + settle
        quiet: queue.Queue[Trigger] = queue.Queue()  # nothing comes here: a plain wait
        while (left := deadline - self._clock.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                self._clock.wait(quiet, left)

    def _gather(self, window: float, streaming: bool = False, first: Trigger | None = None) -> list[Trigger]:
        """What is already queued; and, when that shows a burst under way
        (triggers about more than one container, ``first``'s among them) or
        ``streaming`` (another container's trigger came less than a window
        ago), what arrives until a window passes with nothing (at most
        ``BURST_WINDOWS`` windows in all): a burst becomes one pass, and a
        lone event waits for nothing (sleeping the window would only delay
        it). A lone event may be several triggers: dockerd sends a start's
        network connect a moment before the start itself. A stop ends the
        gathering at once: the loop ends on it, the batch unpassed."""
        got = self._queued()
        if any(t is _STOP for t in got):
            return got
        ids = {t.container_id for t in got} | ({first.container_id} if first is not None else set())
        if len(ids) <= 1 and not streaming:
            return got
        clock = self._clock
        cap = clock.monotonic() + BURST_WINDOWS * window
        while True:
            deadline = min(clock.monotonic() + window, cap)
            try:
                got.append(clock.wait(self.triggers, max(0.0, deadline - clock.monotonic())))
            except queue.Empty:
                return got
            if got[-1] is _STOP:
                return got

    def _queued(self) -> list[Trigger]:
        """Every trigger in the queue now, without waiting."""
        got: list[Trigger] = []
        while True:
            try:
                got.append(self.triggers.get_nowait())
            except queue.Empty:
                return got

    def _full_resync(self, relist: bool = True) -> None:
        """A full pass; ``relist``: Docker's containers listed too (else as
        the event stream left them)."""
        if self._ctl.director_moved():
            raise DirectorMoved("the director's network namespace changed (was it restarted?)")
        self._ctl.reconcile_safely(None, relist=relist)

    def _watch(self, since: float) -> None:
        """Feed triggers from Docker events; reconnect with backoff, then resync."""
        errors = self._ctl.metrics.errors
        while not self.stopping.is_set():
            try:
                for trigger in self._docker.events(since, self.stopping):
                    self.triggers.put(trigger)
                if self.stopping.is_set():
                    return
                logger.warning("Docker event stream ended; reconnecting")
            except DockerlbError as e:
                if self.stopping.is_set():
                    return
                errors.labels(type(e).__name__).inc()
                logger.warning("Docker event stream broke ({}); reconnecting", e)
            except Exception as e:
                # A bug or an event no one foresaw: this thread must not end
                # quietly (no events would ever be seen again). Start over,
                # and the full resync below repairs whatever was missed.
                if self.stopping.is_set():
                    return
                errors.labels(type(e).__name__).inc()
                logger.exception("Docker event watcher failed unexpectedly; restarting it")
            try:
                for attempt in retrying(self._settings, until=self.stopping):
                    with attempt:
                        self._docker.ping()
            except Retryable:
                return  # stopping
            since = self._clock.time() - 1.0
            self._ctl.metrics.reconnects.inc()
            logger.info("Docker engine is back; full resync")
            self.triggers.put(FULL_RESYNC)

    def nudge(self, container_id: str, reason: str) -> None:
        """Look at this container again soon (its health check changed)."""
        self.triggers.put(Trigger(container_id, reason, self._clock.time_ns()))

    # -- stopping ----------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()
        self.triggers.put(_STOP)
        self._docker.stop_events()

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM stops gracefully; a second one forces.

        The handler only counts: it runs in the main thread between any two
        bytecodes, maybe while that thread holds the trigger queue's lock or
        the logger's, so it takes none. Python writes the signal's number to
        a pipe (``set_wakeup_fd``) whatever the handler does; a thread of its
        own reads it and stops the loop, with locks like any other thread."""
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._on_signals, args=(read,), name="signals", daemon=True).start()

        def handler(signum, frame):
            self._signals += 1
            if self._signals > 1:
                raise ForcedStop(f"second signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _on_signals(self, read: int) -> None:
        """Stop the loop once a signal's number comes through the pipe.

        The byte itself says a stop signal came: Python writes it from its C
        handler at once, while ``handler`` (which counts) runs only when the
        main thread next runs Python code, so this thread may read it first
        and must not wait for the count (it did, and the stop was lost)."""
        with contextlib.suppress(OSError):
            while number := os.read(read, 1):
                if number[0] in (signal.SIGINT, signal.SIGTERM) and not self.stopping.is_set():
                    name = signal.Signals(number[0]).name
                    logger.info("signal {}: stopping (send again to force)", name)
                    self.stop()
