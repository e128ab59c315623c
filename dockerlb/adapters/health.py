"""dockerlb's own health checks (``dockerlb.check``): an adapter, run from
the director's network namespace, because that is where IPVS sends from.

One thread does everything: it enters the director's namespace once (a
socket belongs to the namespace of the thread that creates it), keeps each
target's next due time, and runs every probe in flight at once on
non-blocking sockets through one selector. Counting is keepalived's and
HAProxy's: ``rise`` passes in a row make a server up, ``fall`` failures in a
row make it down; a new target is pending until its first rise. A change of
a container's state is reported through ``on_change`` so the controller
looks again at once.

Why one selector thread and no pool (issue 15): a pool of N threads running
blocking probes is starved by N targets that stall until their timeout;
the labels allow timeouts of up to an hour, and a lower cap would only
shorten the starvation, not prevent it. Here no probe ever blocks:
the thread only waits in ``select``, for whichever comes first of a socket
being ready, a probe's deadline, the next due time, or a wake-up from
``watch``/``close``. A stalled target costs one file descriptor and nothing
else, so it cannot delay another target's check while slots are free (see
below: one container's cannot take them all). Each target (one check of
one container's address and port) has at most one probe in flight, and
each probe has one deadline, its timeout counted from its start over
connect, send and every receive together, so a server that accepts and
trickles bytes fails on time too.

Descriptors are bounded (issue 29): at most ``max_probes`` probes are in
flight (``--max-probes``), at most ``PROBES_PER_CONTAINER`` of one
container's. A probe due beyond either waits for a slot, its due time kept
(the longest overdue starts first), and is never a failure; its server's
state stays as it was meanwhile. Running out of descriptors or buffers
(EMFILE, ENFILE, ENOBUFS, ENOMEM) means "not checked": nothing is counted,
no state changes, and the probe is tried again at its next due time; said
once while it lasts. A healthy server is never marked down because
dockerlb could not open a socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loguru import logger

from dockerlb.adapters.netns import entered
from dockerlb.core.model import CheckState, CheckTarget, HealthCheck, format_endpoint
from dockerlb.errors import NetnsError
from dockerlb.settings import Settings

# An HTTP status line longer than this is no answer (http.client allows more
# for a whole header line; a check needs the first line only).
MAX_STATUS_LINE = 4096
# Probes of one container in flight at once: one container's many stalled
# checks cannot take every slot.
PROBES_PER_CONTAINER = 4
# Errors that say this host is short of descriptors or memory, not that the
# server failed: the probe is "not checked".
SHORT_OF = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.ENOBUFS: "ENOBUFS", errno.ENOMEM: "ENOMEM"}
# A probe's steps, named as a timeout's reason says where it stalled.
CONNECTING, SENDING, RECEIVING = "connecting", "sending the request", "waiting for the status line"


@dataclass
class _Progress:
    state: CheckState = CheckState.PENDING
    passes: int = 0  # in a row
    failures: int = 0  # in a row
    due: float = 0.0  # monotonic time of the next probe
    busy: bool = False  # a probe is in flight
    unexpected: str = ""  # the last unexpected error logged, so each is logged once


@dataclass(eq=False)
class _Probe:
    """One check in flight; only the checker's thread touches it."""

    target: CheckTarget
    progress: _Progress  # the one it counts for; another one means unwatched
    sock: socket.socket
    deadline: float  # monotonic: start + timeout, for the whole check
    step: str = CONNECTING  # then (http) SENDING, RECEIVING
    out: bytes = b""  # still to send
    got: bytes = b""  # received so far


class HealthChecker:
    def __init__(self, netns_path: str | None, max_probes: int = Settings.max_probes) -> None:
        self._path = netns_path
        self._max_probes = max_probes
        self._short = False  # short of descriptors or memory: said once while it lasts
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._targets: dict[CheckTarget, _Progress] = {}
        self._on_change: Callable[[str, str], None] = lambda cid, why: None
        # watch() and close() wake the thread out of select() by writing here.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None

    def start(self, on_change: Callable[[str, str], None]) -> None:
        """Begin checking; ``on_change(container_id, why)`` on every up/down."""
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="dockerlb-checks", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)  # it never blocks but in select(), which the wake ends
        if self._thread is None or not self._thread.is_alive():
            self._wake_r.close()
            self._wake_w.close()

    def watch(self, targets: Iterable[CheckTarget], serving: Iterable[CheckTarget] = ()) -> None:
        """Check exactly these from now on; results of ones that stay are kept.

        A new target starts pending, except one in ``serving`` (the kernel
        already sends it traffic, e.g. after a controller restart): that one
        starts up, so a restart never pulls a working server before its
        first check, and ``fall`` failures still take it down."""
        wanted, up = set(targets), set(serving)
        with self._lock:
            self._targets = {
                t: self._targets.get(t) or _Progress(CheckState.UP if t in up else CheckState.PENDING)
                for t in wanted
            }
        self._wake()

    def known(self) -> set[CheckTarget]:
        with self._lock:
            return set(self._targets)

    def states(self) -> dict[str, CheckState]:
        """Each checked container's state: down if any of its checks is down,
        up if all are up, pending otherwise."""
        with self._lock:
            return _states_of(self._targets.items())

    def _wake(self) -> None:
        # Full: a wake-up is pending anyway. Closed: we are closing.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the one thread ----------------------------------------------------------
    def _run(self) -> None:
        # Left only when the thread ends: it only ever probes from the director.
        with contextlib.ExitStack() as way_in:
            try:
                way_in.enter_context(entered(self._path))
            except NetnsError:
                logger.exception("health checks cannot enter {}; no check runs", self._path)
                return
            self._loop()

    def _loop(self) -> None:
        inflight: dict[CheckTarget, _Probe] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    deferred = self._start_due(selector, inflight)
                    for key, _ in selector.select(self._wait(inflight, deferred)):
                        if key.fileobj is self._wake_r:
                            _drain(self._wake_r)
                        else:
                            self._advance(selector, inflight, key.data)
                    now = time.monotonic()
                    for probe in [p for p in inflight.values() if p.deadline <= now]:
                        timeout = probe.target.check.timeout
                        self._finish(
                            selector, inflight, probe, f"no answer within {timeout:g} s ({probe.step})"
                        )
            except Exception:
                logger.exception("health checks stopped by an unexpected error; no check runs")
            finally:
                for probe in inflight.values():
                    probe.sock.close()
                if self._stop.is_set():
                    self._wake_r.close()
                    self._wake_w.close()

    def _start_due(
        self, selector: selectors.BaseSelector, inflight: dict[CheckTarget, _Probe]
    ) -> set[CheckTarget]:
        """Start the probes that are due, the longest overdue first, as far
        as the caps allow; the ones left wait (returned) for a slot."""
        now = time.monotonic()
        with self._lock:
            # Probes of targets no longer watched (or watched anew) end now:
            # their result would count for nobody, and they hold a socket.
            gone = [p for t, p in inflight.items() if self._targets.get(t) is not p.progress]
            due = [(t, p) for t, p in self._targets.items() if not p.busy and p.due <= now]
        for probe in gone:
            _close(selector, probe)
            del inflight[probe.target]
        per_container = Counter(t.container_id for t in inflight)
        deferred = set()
        for t, p in sorted(due, key=lambda item: item[1].due):
            if len(inflight) >= self._max_probes or per_container[t.container_id] >= PROBES_PER_CONTAINER:
                deferred.add(t)
                continue
            with self._lock:
                p.busy = True
            try:
                probe = _Probe(t, p, _socket_for(t), now + t.check.timeout)
            except Exception as e:
                self._count(t, p, self._why(t, p, e))
                continue
            self._short_no_more()
            inflight[t] = probe
            per_container[t.container_id] += 1
            selector.register(probe.sock, selectors.EVENT_WRITE, probe)
            self._advance(selector, inflight, probe)  # a connect may be done at once
        return deferred

    def _wait(self, inflight: dict[CheckTarget, _Probe], deferred: set[CheckTarget]) -> float:
        """Seconds until the next deadline or due time (not of the probes
        waiting for a slot: one frees when a probe ends, here); watch() and
        close() wake the thread earlier."""
        with self._lock:
            times = [p.due for t, p in self._targets.items() if not p.busy and t not in deferred]
        times += [p.deadline for p in inflight.values()]
        return max(0.0, min(times, default=time.monotonic() + 1.0) - time.monotonic())

    def _advance(
        self, selector: selectors.BaseSelector, inflight: dict[CheckTarget, _Probe], probe: _Probe
    ) -> None:
        """Take one probe as far as its socket allows now."""
        try:
            why = _step(probe)
        except Exception as e:
            self._finish(selector, inflight, probe, self._why(probe.target, probe.progress, e))
            return
        if why is None:
            events = selectors.EVENT_READ if probe.step == RECEIVING else selectors.EVENT_WRITE
            if selector.get_key(probe.sock).events != events:
                selector.modify(probe.sock, events, probe)
            return
        self._finish(selector, inflight, probe, why)

    def _finish(
        self,
        selector: selectors.BaseSelector,
        inflight: dict[CheckTarget, _Probe],
        probe: _Probe,
        why: str | None,
    ) -> None:
        _close(selector, probe)
        del inflight[probe.target]
        self._count(probe.target, probe.progress, why)

    def _why(self, t: CheckTarget, p: _Progress, e: Exception) -> str | None:
        """What went wrong, from an exception a probe raised; an unexpected
        one is logged (once while it repeats) and is a failure all the same.
        None: not checked (this host is short of descriptors or memory)."""
        if isinstance(e, ProbeFailed):
            return str(e)
        if isinstance(e, OSError) and e.errno in SHORT_OF:
            if not self._short:
                self._short = True
                logger.warning(
                    "health checks: cannot open sockets ({}: {}): checks are not run, and no check's "
                    "state changes, until they can (see --max-probes and the open files limit)",
                    SHORT_OF[e.errno],
                    e.strerror,
                )
            return None
        if isinstance(e, OSError):
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        why = f"unexpected {type(e).__name__}: {e}"
        if why != p.unexpected:
            p.unexpected = why
            logger.opt(exception=e).error(
                "container {!r}: check {} on {} raised {}; counted as a failure",
                t.container,
                t.check,
                format_endpoint(t.addr, t.port),
                why,
            )
        return why

    def _short_no_more(self) -> None:
        if self._short:
            self._short = False
            logger.info("health checks: sockets open again; checks run")

    def _count(self, t: CheckTarget, p: _Progress, why: str | None) -> None:
        """Count one probe's result ("" when it passed, None when it was
        not checked: nothing to count) for its target."""
        with self._lock:
            if self._targets.get(t) is not p:
                return  # no longer watched
            p.busy, p.due = False, time.monotonic() + t.check.interval
            if why is None:
                return
            before = self._container_state(t.container_id)
            _count(p, t, why)
            if not why:
                p.unexpected = ""  # logged again should it come back
            after = self._container_state(t.container_id)
        if after is not before:
            where = f"check {t.check} on {format_endpoint(t.addr, t.port)}"
            if after is CheckState.UP:
                logger.info("container {!r}: {} passes: up", t.container, where)
            else:
                logger.warning(
                    "container {!r}: {} failed {} times ({}): down", t.container, where, p.failures, why
                )
            try:
                self._on_change(t.container_id, f"check {after}")
            except Exception:
                logger.exception("container {!r}: reporting its check state {} failed", t.container, after)

    def _container_state(self, container_id: str) -> CheckState | None:
        mine = ((t, p) for t, p in self._targets.items() if t.container_id == container_id)
        return _states_of(mine).get(container_id)


def _count(p: _Progress, t: CheckTarget, why: str) -> None:
    if not why:
        p.passes, p.failures = p.passes + 1, 0
        if p.passes >= t.check.rise:
            p.state = CheckState.UP
    else:
        p.passes, p.failures = 0, p.failures + 1
        if p.state is CheckState.UP and p.failures >= t.check.fall:
            p.state = CheckState.DOWN


def _states_of(progress: Iterable[tuple[CheckTarget, _Progress]]) -> dict[str, CheckState]:
    """Each container's state from its checks' (see HealthChecker.states)."""
    out: dict[str, CheckState] = {}
    for t, p in progress:
        out[t.container_id] = _worse(out.get(t.container_id), p.state)
    return out


def _worse(a: CheckState | None, b: CheckState) -> CheckState:
    order = (CheckState.UP, CheckState.PENDING, CheckState.DOWN)
    return b if a is None or order.index(b) > order.index(a) else a


# -- one probe, on a non-blocking socket ----------------------------------------------


def http_request(t: CheckTarget) -> bytes:
    """The GET an http check sends (ASCII, as HTTP/1.1 asks; the label
    parser allows only URL characters in the path, so anything else here is
    an error, raised)."""
    if any(c <= " " or c == "\x7f" for c in t.check.path):
        raise ValueError(f"a space or control character in the path {t.check.path!r}")
    host = format_endpoint(t.addr, t.port)
    return (
        f"GET {t.check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dockerlb-check\r\n"
        "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def status_of(line: bytes) -> int:
    """The status code of an HTTP status line (``HTTP/1.1 200 OK``)."""
    parts = line.rstrip(b"\r\n").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise ProbeFailed(f"not an HTTP status line: {line[:80]!r}")
    status = int(parts[1])
    if status < 100:
        raise ProbeFailed(f"not an HTTP status: {status:03d}")
    return status


def verdict(check: HealthCheck, status: int) -> str:
    """Why an http check with this status fails; "" when it passes."""
    ok = status == check.status if check.status is not None else 200 <= status < 400
    return "" if ok else f"HTTP status {status}"


class ProbeFailed(Exception):
    """The server's answer is not one (not HTTP): a failed check, its text the reason."""


def _socket_for(t: CheckTarget) -> socket.socket:
    family = socket.AF_INET6 if t.addr.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((str(t.addr), t.port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


def _step(probe: _Probe) -> str | None:
    """Go as far as the socket allows without blocking: None while the check
    goes on, else its result ("" when it passed). Raises what goes wrong."""
    t, sock = probe.target, probe.sock
    if probe.step == CONNECTING:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        try:
            sock.getpeername()
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return None  # not connected yet
            raise
        if t.check.kind == "tcp":
            return ""
        probe.step, probe.out = SENDING, http_request(t)
    if probe.step == SENDING:
        try:
            while probe.out:
                probe.out = probe.out[sock.send(probe.out) :]
        except BlockingIOError:
            return None
        probe.step = RECEIVING
    while True:
        try:
            data = sock.recv(MAX_STATUS_LINE)
        except BlockingIOError:
            return None
        if not data:
            raise ProbeFailed("the connection closed before an HTTP status line")
        probe.got += data
        line, newline, _ = probe.got.partition(b"\n")
        if newline:
            return verdict(t.check, status_of(line))
        if len(probe.got) > MAX_STATUS_LINE:
            raise ProbeFailed(f"no HTTP status line in the first {MAX_STATUS_LINE} bytes")


def _close(selector: selectors.BaseSelector, probe: _Probe) -> None:
    with contextlib.suppress(KeyError, ValueError):  # never registered
        selector.unregister(probe.sock)
    probe.sock.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # BlockingIOError: nothing left
        while sock.recv(512):
            pass
