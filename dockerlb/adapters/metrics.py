"""Prometheus metrics and the /metrics + /healthz endpoint (prometheus_client).

Two kinds of figures:
- the controller's own (event-to-applied latency, reconcile duration,
  operations and errors by kind, Docker stream reconnects), kept in
  ``ControllerMetrics`` and updated by the controller as it works;
- the kernel's, read from IPVS at each scrape by ``TableCollector``, so a
  scrape shows the 64-bit counters as they are, not as of the last resync.
  Only the services dockerlb owns (on its VIPs) unless asked for all of them.

The endpoint has no authentication: it binds where it is told (off unless
set; the image binds 127.0.0.1:9469), gives each request one deadline and a
cap on its bytes, and serves a bounded number of connections at once (see
``_Endpoint``). ``ask_healthz`` is the image's HEALTHCHECK (``dockerlb healthz``).
"""

from __future__ import annotations

import contextlib
import io
import queue
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dockerlb.adapters.healthz import parse_listen
from dockerlb.core.model import IPAddress, ServerStats, ServiceKey, Snapshot, addr_order
from dockerlb.core.sync import PairState
from dockerlb.errors import ConfigError, DockerlbError

# Seconds; event-to-applied is tens of ms on hardware, seconds under emulation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ControllerMetrics:
    """The controller's own figures, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.event_to_applied = Histogram(
            "dockerlb_event_to_applied_seconds",
            "From a Docker event's own timestamp to the end of the pass that applied it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "dockerlb_reconcile_duration_seconds",
            "Duration of one reconcile pass: full (list everything) or partial (events).",
            ["pass"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.operations = Counter(
            "dockerlb_operations_applied",
            "Operations applied to the director, by kind.",
            ["kind"],
            registry=r,
        )
        self.errors = Counter("dockerlb_errors", "Errors, by the project's error type.", ["kind"], registry=r)
        self.reconnects = Counter(
            "dockerlb_docker_reconnects", "Times the Docker event stream was re-established.", registry=r
        )


@dataclass(frozen=True)
class TableView:
    """What one scrape shows: the kernel's table and who its servers are."""

    snapshot: Snapshot
    owned_vips: frozenset[IPAddress]
    names: Mapping[tuple[ServiceKey, tuple[IPAddress, int]], str]
    pair: PairState | None = None  # the sync daemons and the role, read with the table
    # --announce: each of dockerlb's VIPs -> whether its route is in the
    # announce table now (read with the table); None: no announcing.
    announced: Mapping[IPAddress, bool] | None = None
    # Draining containers (by name): seconds before their drain timeout.
    drains: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        snapshot: Snapshot,
        owned_vips: frozenset[IPAddress],
        names: Mapping[tuple[ServiceKey, tuple[IPAddress, int]], str],
        *,
        all_services: bool = False,
        pair: PairState | None = None,
        announced: Mapping[IPAddress, bool] | None = None,
        drains: Mapping[str, float] | None = None,
    ) -> TableView:
        """The view to show: the services dockerlb owns (on its VIPs, as
        ``KernelState.owned``); with ``all_services`` every service in the
        namespace, the foreign ones labelled ``managed="false"``."""
        if not all_services:
            keys = {k for k in snapshot.table if k.vip in owned_vips}
            snapshot = Snapshot(
                {k: v for k, v in snapshot.table.items() if k in keys},
                {i: s for i, s in snapshot.stats.items() if i[0] in keys},
                {k: s for k, s in snapshot.service_stats.items() if k in keys},
            )
        return cls(snapshot, owned_vips, names, pair, announced, dict(drains or {}))


_SERVICE = ["protocol", "vip", "port", "managed"]
_SERVER = ["protocol", "vip", "port", "server", "container"]


class TableCollector(Collector):
    """Per-service and per-real-server figures from IPVS, read at scrape time."""

    def __init__(self, read: Callable[[], TableView | None], on_error: Callable[[Exception], None]) -> None:
        self._read = read
        self._on_error = on_error

    def describe(self) -> list:
        return []  # read at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        try:
            view = self._read()
        except DockerlbError as e:
            self._on_error(e)
            return
        if view is not None:  # None: nothing to read yet (the controller is starting)
            yield from table_metrics(view)


def table_metrics(view: TableView) -> list[Any]:
    """The metric families for one view of the table. No side effects."""
    svc_conns = CounterMetricFamily("dockerlb_service_connections", "Connections scheduled.", labels=_SERVICE)
    svc_packets = CounterMetricFamily("dockerlb_service_packets", "Packets.", labels=[*_SERVICE, "direction"])
    svc_bytes = CounterMetricFamily("dockerlb_service_bytes", "Bytes.", labels=[*_SERVICE, "direction"])
    conns = CounterMetricFamily("dockerlb_server_connections", "Connections scheduled.", labels=_SERVER)
    packets = CounterMetricFamily("dockerlb_server_packets", "Packets.", labels=[*_SERVER, "direction"])
    octets = CounterMetricFamily("dockerlb_server_bytes", "Bytes.", labels=[*_SERVER, "direction"])
    active = GaugeMetricFamily("dockerlb_server_active_connections", "ActiveConn.", labels=_SERVER)
    inactive = GaugeMetricFamily("dockerlb_server_inactive_connections", "InActConn.", labels=_SERVER)
    weight = GaugeMetricFamily("dockerlb_server_weight", "Weight.", labels=_SERVER)
    draining = GaugeMetricFamily(
        "dockerlb_server_draining", "1: at weight 0, its connections finishing; else 0.", labels=_SERVER
    )
    left = GaugeMetricFamily(
        "dockerlb_server_drain_seconds_left",
        "Seconds before a draining server is removed, drained or not (--drain-timeout).",
        labels=_SERVER,
    )

    snap = view.snapshot
    for key in sorted(snap.table, key=ServiceKey.sort_key):
        svc = [str(key.proto), str(key.vip), str(key.port)]
        stats = snap.service_stats.get(key, ServerStats())
        managed = [*svc, str(key.vip in view.owned_vips).lower()]
        svc_conns.add_metric(managed, stats.conns)
        _directions(svc_packets, managed, stats.inpkts, stats.outpkts)
        _directions(svc_bytes, managed, stats.inbytes, stats.outbytes)
        servers = snap.table[key].servers
        for ident in sorted(servers, key=lambda i: (addr_order(i[0]), i[1])):
            server = servers[ident]
            labels = [*svc, str(server), view.names.get((key, ident), "")]
            s = snap.stats.get((key, ident), ServerStats())
            conns.add_metric(labels, s.conns)
            _directions(packets, labels, s.inpkts, s.outpkts)
            _directions(octets, labels, s.inbytes, s.outbytes)
            active.add_metric(labels, s.active)
            inactive.add_metric(labels, s.inactive)
            weight.add_metric(labels, server.weight)
            name = view.names.get((key, ident), "")
            seconds = view.drains.get(name) if name and server.weight == 0 else None
            draining.add_metric(labels, int(seconds is not None))
            if seconds is not None:
                left.add_metric(labels, round(seconds, 1))
    return [
        svc_conns,
        svc_packets,
        svc_bytes,
        conns,
        packets,
        octets,
        active,
        inactive,
        weight,
        draining,
        left,
        *_pair(view.pair),
        *_announced(view.announced),
    ]


def _announced(announced: Mapping[IPAddress, bool] | None) -> list[Any]:
    """With --announce: 1 for each VIP whose route the speaker exports, 0 for one withheld."""
    if announced is None:
        return []
    family = GaugeMetricFamily(
        "dockerlb_vip_announced",
        "1: the VIP's route is in dockerlb's announce table (the speaker advertises it); 0: withheld.",
        labels=["vip"],
    )
    for vip in sorted(announced, key=addr_order):
        family.add_metric([str(vip)], int(announced[vip]))
    return [family]


def _pair(pair: PairState | None) -> list[Any]:
    """The sync daemons (wanted or running: 1 running, 0 not) and, in a
    pair, whether this director is the active one."""
    if pair is None:
        return []
    running = GaugeMetricFamily(
        "dockerlb_sync_daemon_running",
        "IPVS connection-sync daemon: 1 running, 0 wanted but not running.",
        labels=["state", "interface", "sync_id"],
    )
    for d in sorted(pair.daemons | pair.wanted):
        running.add_metric([d.state, d.interface, str(d.sync_id)], int(d in pair.daemons))
    if not pair.role:
        return [running]
    active = GaugeMetricFamily(
        "dockerlb_director_active", "1: this director holds its VIPs (VRRP master); 0: standby."
    )
    active.add_metric([], int(pair.role == "active"))
    return [running, active]


def _directions(family: CounterMetricFamily, labels: list[str], inward: int, outward: int) -> None:
    family.add_metric([*labels, "in"], inward)
    family.add_metric([*labels, "out"], outward)


# The request (its line and headers, the blank line included) must arrive
# whole within this many seconds of its connection's accept, and within this
# many bytes; past either the connection is closed, unanswered. A client that
# trickles a byte at a time holds its connection at most the deadline.
REQUEST_DEADLINE = 5.0
MAX_REQUEST_BYTES = 8192
# An answer must be written (read by the client) within this long.
ANSWER_TIMEOUT = 10.0
# Connections open at once (being read, waiting for an answer, answered);
# more wait in the listen queue, in the order they came, until one closes.
MAX_CONNECTIONS = 64
LISTEN_QUEUE = 64
# /metrics answers at once (each reads the IPVS table); /healthz has its own.
MAX_SCRAPES = 4


class _Endpoint:
    """The listening socket and every connection's request, on one thread.

    A request is read on a non-blocking socket through one selector, so a
    client that sends slowly or not at all costs a descriptor and at most
    ``MAX_REQUEST_BYTES``, never a thread, and only until its deadline. Only
    a whole request goes on to be answered, on worker threads: /healthz on a
    thread of its own, so no number of /metrics scrapes (each reads the IPVS
    table, which takes a while on a large one) delays Docker's HEALTHCHECK;
    /metrics on ``MAX_SCRAPES`` threads. No slot is kept for /healthz among
    the connections: one is taken at accept, before its path is known. The
    deadline is what frees them, and the listen queue keeps a client that
    comes while all are held until one is free, instead of refusing it.
    """

    def __init__(self, listener: socket.socket, answer: Callable[[_Request], object]) -> None:
        self._listener = listener
        self._answer = answer
        self._reading: dict[socket.socket, _Reading] = {}
        self._lock = threading.Lock()
        self._open = 0  # connections accepted and not yet closed (reading or answered)
        self._full = False  # said once per busy spell
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._health: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._scrapes: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name="metrics", daemon=True)]
        self._threads += [threading.Thread(target=self._work, args=(self._health,), daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, args=(self._scrapes,), daemon=True)
            for _ in range(MAX_SCRAPES)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._threads[0].join(timeout=5)  # it never blocks but in select(), which the wake ends
        for _ in range(MAX_SCRAPES):
            self._scrapes.put(None)
        self._health.put(None)
        # A worker still writing an answer ends by its timeout; it closes its own connection.
        for conn in self._reading:
            conn.close()
        self._reading.clear()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed: closing
            self._wake_w.send(b"x")

    # -- the reading thread ----------------------------------------------------------
    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            listening = False
            while not self._stop.is_set():
                with self._lock:
                    room = self._open < MAX_CONNECTIONS
                if room != listening:  # a full endpoint leaves new clients in the listen queue
                    if room:
                        selector.register(self._listener, selectors.EVENT_READ)
                    else:
                        selector.unregister(self._listener)
                    listening = room
                    self._said_full(not room)
                for key, _ in selector.select(self._wait()):
                    if key.fileobj is self._listener:
                        self._accept(selector)
                    elif key.fileobj is self._wake_r:
                        _drain(self._wake_r)
                    else:
                        self._read(selector, key.fileobj, key.data)  # type: ignore[arg-type]
                now = time.monotonic()
                for conn, reading in list(self._reading.items()):
                    if reading.deadline <= now:
                        self._drop(selector, conn, f"no whole request within {REQUEST_DEADLINE:g} s")

    def _said_full(self, full: bool) -> None:
        if full and not self._full:
            logger.warning(
                "metrics endpoint: {} connections open; new ones wait until one closes", MAX_CONNECTIONS
            )
        self._full = full

    def _wait(self) -> float | None:
        if not self._reading:
            return None  # a connection or a wake-up ends the wait
        return max(0.0, min(r.deadline for r in self._reading.values()) - time.monotonic())

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            conn, peer = self._listener.accept()
        except BlockingIOError:
            return  # the client gave up before we took it
        except OSError as e:  # e.g. out of descriptors: the listen queue keeps it
            logger.debug("metrics endpoint: accept failed: {!r}", e)
            time.sleep(0.1)  # not a busy loop while it lasts
            return
        conn.setblocking(False)
        with self._lock:
            self._open += 1
        self._reading[conn] = _Reading(peer, time.monotonic() + REQUEST_DEADLINE)
        selector.register(conn, selectors.EVENT_READ, self._reading[conn])

    def _read(self, selector: selectors.BaseSelector, conn: socket.socket, reading: _Reading) -> None:
        try:
            data = conn.recv(MAX_REQUEST_BYTES + 1 - len(reading.got))
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(selector, conn, repr(e))
            return
        if not data:
            self._drop(selector, conn, "closed before a whole request")
            return
        reading.got += data
        end = _end_of_head(reading.got)
        if end is None or end > MAX_REQUEST_BYTES:
            if len(reading.got) > MAX_REQUEST_BYTES:
                self._drop(selector, conn, f"no whole request in {MAX_REQUEST_BYTES} bytes")
            return
        selector.unregister(conn)
        del self._reading[conn]
        request = _Request(conn, reading.peer, reading.got)
        (self._health if request.path == b"/healthz" else self._scrapes).put(request)

    def _drop(self, selector: selectors.BaseSelector, conn: socket.socket, why: str) -> None:
        logger.debug("metrics endpoint: {} dropped: {}", self._reading[conn].peer[0], why)
        selector.unregister(conn)
        del self._reading[conn]
        conn.close()
        self._closed()

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1
        self._wake()  # the reading thread listens again if it had stopped

    # -- the answering threads ---------------------------------------------------------
    def _work(self, requests: queue.SimpleQueue[_Request | None]) -> None:
        while (request := requests.get()) is not None:
            try:
                self._answer(request)
            except Exception:
                logger.exception("metrics endpoint: answering {} failed", request.peer[0])
            finally:
                with contextlib.suppress(OSError):
                    request.conn.shutdown(socket.SHUT_WR)
                request.conn.close()
                self._closed()


@dataclass
class _Reading:
    peer: Any
    deadline: float  # monotonic: accept + REQUEST_DEADLINE
    got: bytes = b""


@dataclass(frozen=True)
class _Request:
    conn: socket.socket
    peer: Any
    head: bytes  # the request line and headers, whole (and whatever came after)

    @property
    def path(self) -> bytes:
        target = self.head.split(None, 2)[1:2]
        return target[0].partition(b"?")[0] if target else b""


def _end_of_head(got: bytes) -> int | None:
    """Where the request's head (its line and headers) ends: after the first
    empty line, ``\r\n`` or a bare ``\n`` as http.client reads it."""
    ends = [i + n for i, n in ((got.find(b"\n\r\n"), 3), (got.find(b"\n\n"), 2)) if i >= 0]
    return min(ends, default=None)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # BlockingIOError: nothing left
        while sock.recv(512):
            pass


class _Answers(socketserver.BaseServer):
    """What ``WSGIRequestHandler`` asks of its server: the app and the base
    environ (as ``WSGIServer.setup_environ`` makes it). Serves nothing itself."""

    def __init__(self, host: str, port: int, app: Callable[..., Any]) -> None:
        super().__init__((host, port), WSGIRequestHandler)  # never asked to make one
        self.app = app
        self.base_environ = {
            "SERVER_NAME": host,
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PORT": str(port),
            "REMOTE_HOST": "",
            "CONTENT_LENGTH": "",
            "SCRIPT_NAME": "",
        }

    def get_app(self) -> Callable[..., Any]:
        return self.app


class _Handler(WSGIRequestHandler):
    """Answers one request read whole beforehand; the answer is written
    within ANSWER_TIMEOUT."""

    def __init__(self, request: _Request, server: _Answers) -> None:
        self._head = request.head
        super().__init__(request.conn, request.peer, server)  # answers it

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._head)
        self.wfile = _Writer(self.connection, time.monotonic() + ANSWER_TIMEOUT)

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError) as e:  # gone, or not reading its answer: drop it
            logger.debug("metrics endpoint: {} dropped: {!r}", self.client_address[0], e)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics endpoint: {}", format % args)


class _Writer(io.BufferedIOBase):
    """The answer's way out: every write within one deadline in all. A
    client that reads too slowly is dropped (ConnectionAbortedError, which
    wsgiref takes for a client gone, quietly)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            self._sock.sendall(data)
        except TimeoutError as e:
            raise ConnectionAbortedError(f"answer not read within {ANSWER_TIMEOUT:g} s") from e
        with memoryview(data) as view:
            return view.nbytes


class MetricsServer:
    """/metrics (Prometheus text) and /healthz (200 when ready, else 503)."""

    def __init__(
        self, listen: str, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        host, port = parse_listen(listen)
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok, why = ready()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
                )
                return [why.encode() + b"\n"]
            return metrics_app(environ, start_response)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # Dual-stack, as the stdlib's servers bind by default: [::] takes
            # IPv4 too (create_server alone would make it IPv6 only).
            listener = socket.create_server(
                (host, port), family=family, backlog=LISTEN_QUEUE, dualstack_ipv6=family == socket.AF_INET6
            )
        except OSError as e:
            raise ConfigError(f"--metrics-listen {listen}: cannot listen: {e}") from e
        listener.setblocking(False)
        self._address = listener.getsockname()[:2]
        self.port: int = self._address[1]
        answers = _Answers(host, self.port, app)
        self._endpoint = _Endpoint(listener, lambda request: _Handler(request, answers))

    def start(self) -> None:
        self._endpoint.start()
        logger.info("metrics on http://{}:{}/metrics, readiness on /healthz", *self._address)

    def close(self) -> None:
        self._endpoint.close()
