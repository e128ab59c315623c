"""dockerlb's own health checks (``dockerlb.check``): an adapter, run from
the director's network namespace, because that is where IPVS sends from.

One scheduler thread keeps each target's next due time; a small pool of
worker threads, each of which entered the director's namespace once, runs
the probes (a socket belongs to the namespace of the thread that creates
it). Counting is keepalived's and HAProxy's: ``rise`` passes in a row make a
server up, ``fall`` failures in a row make it down; a new target is pending
until its first rise. A change of a container's state is reported through
``on_change`` so the controller looks again at once.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loguru import logger
from nsenter import Namespace

from dockerlb.model import CheckState, CheckTarget, format_endpoint

WORKERS = 8  # probes in flight at once; each waits at most its timeout


@dataclass
class _Progress:
    state: CheckState = CheckState.PENDING
    passes: int = 0  # in a row
    failures: int = 0  # in a row
    due: float = 0.0  # monotonic time of the next probe
    busy: bool = False  # a probe is running


class HealthChecker:
    def __init__(self, netns_path: str | None, workers: int = WORKERS) -> None:
        self._path = netns_path
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._targets: dict[CheckTarget, _Progress] = {}
        self._on_change: Callable[[str, str], None] = lambda cid, why: None
        self._pool = ThreadPoolExecutor(workers, "dockerlb-check", initializer=self._enter)
        self._thread: threading.Thread | None = None

    def _enter(self) -> None:
        if self._path:
            # Never left: this worker thread only ever probes from the director,
            # so the way back is not kept open.
            namespace = Namespace(self._path, "net")
            namespace.__enter__()
            namespace._close_files()

    def start(self, on_change: Callable[[str, str], None]) -> None:
        """Begin checking; ``on_change(container_id, why)`` on every up/down."""
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="dockerlb-checks", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        self._wake.set()

    def known(self) -> set[CheckTarget]:
        with self._lock:
            return set(self._targets)

    def states(self) -> dict[str, CheckState]:
        """Each checked container's state: down if any of its checks is down,
        up if all are up, pending otherwise."""
        with self._lock:
            return _states_of(self._targets.items())

    # -- the scheduler ---------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [t for t, p in self._targets.items() if not p.busy and p.due <= now]
                for t in due:
                    self._targets[t].busy = True
                waits = [p.due for p in self._targets.values() if not p.busy]
            for t in due:
                try:
                    self._pool.submit(self._probe, t)
                except RuntimeError:  # the pool is shut down: we are closing
                    return
            self._wake.wait(timeout=max(0.05, min(waits, default=now + 1.0) - time.monotonic()))
            self._wake.clear()

    def _probe(self, t: CheckTarget) -> None:
        why = _probe(t)
        with self._lock:
            p = self._targets.get(t)
            if p is None:
                return  # no longer watched
            before = self._container_state(t.container_id)
            _count(p, t, why)
            p.busy, p.due = False, time.monotonic() + t.check.interval
            after = self._container_state(t.container_id)
        self._wake.set()
        if after is not before:
            where = f"check {t.check} on {format_endpoint(t.addr, t.port)}"
            if after is CheckState.UP:
                logger.info("container {!r}: {} passes: up", t.container, where)
            else:
                logger.warning(
                    "container {!r}: {} failed {} times ({}): down", t.container, where, p.failures, why
                )
            self._on_change(t.container_id, f"check {after}")

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


def _probe(t: CheckTarget) -> str:
    """One check: "" when it passes, else what went wrong."""
    check = t.check
    try:
        if check.kind == "tcp":
            with socket.create_connection((str(t.addr), t.port), timeout=check.timeout):
                return ""
        conn = http.client.HTTPConnection(str(t.addr), t.port, timeout=check.timeout)
        try:
            conn.request("GET", check.path, headers={"Connection": "close", "User-Agent": "dockerlb-check"})
            status = conn.getresponse().status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    ok = status == check.status if check.status is not None else 200 <= status < 400
    return "" if ok else f"HTTP status {status}"
