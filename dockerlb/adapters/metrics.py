"""Prometheus metrics and the /metrics + /healthz endpoint (prometheus_client).

Two kinds of figures:
- the controller's own (event-to-applied latency, reconcile duration,
  operations and errors by kind, Docker stream reconnects), kept in
  ``ControllerMetrics`` and updated by the controller as it works;
- the kernel's, read from IPVS at each scrape by ``TableCollector``, so a
  scrape shows the 64-bit counters as they are, not as of the last resync.
  Only the services dockerlb owns (on its VIPs) unless asked for all of them.

The endpoint has no authentication: it binds where it is told (off unless
set; the image binds 127.0.0.1:9469), drops clients that send nothing and
serves a bounded number of connections at once (see ``_Server``).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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
        return cls(snapshot, owned_vips, names, pair, dict(drains or {}))


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
    ]


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


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT`` for every address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics-listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9469")
    return host.strip("[]") or "0.0.0.0", int(port)


# A client has this long for each read (its request) and write (our answer);
# one that connects and sends nothing is dropped after it.
REQUEST_TIMEOUT = 5.0
# Connections handled at once; more are closed as soon as they are accepted.
MAX_CONNECTIONS = 8


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """The stdlib's threading WSGI server (as prometheus_client's own
    ``start_http_server``), with its hooks used to bound it.

    A thread per connection, but at most ``MAX_CONNECTIONS`` of them: each
    accepted connection takes a slot in ``verify_request`` (the hook
    ``socketserver`` calls between accept and dispatch) and gives it back when
    its thread ends. With no slot free the connection is closed at once, so
    idle or slow clients cost at most ``MAX_CONNECTIONS`` threads, each held
    at most ``REQUEST_TIMEOUT`` per read or write (``_Handler.timeout``), and
    a scrape arriving meanwhile is refused rather than queued behind them.
    """

    daemon_threads = True
    block_on_close = False  # close() does not wait for clients still connected

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refusing = False
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self._slots.acquire(blocking=False):
            self._refusing = False
            return True
        if not self._refusing:  # once per busy spell, not once per connection
            logger.warning("metrics endpoint: {} connections open, refusing more", MAX_CONNECTIONS)
            self._refusing = True
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started: its slot is free again
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # socketserver sets it on the connection in setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError) as e:  # idle, slow or gone: drop it
            logger.debug("metrics endpoint: {} dropped: {!r}", self.client_address[0], e)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics endpoint: {}", format % args)


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

        try:
            server_class = _Server6 if ":" in host else _Server
            self._httpd = make_server(host, port, app, server_class=server_class, handler_class=_Handler)
        except OSError as e:
            raise ConfigError(f"--metrics-listen {listen}: cannot listen: {e}") from e
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logger.info("metrics on http://{}:{}/metrics, readiness on /healthz", *self._httpd.server_address[:2])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
