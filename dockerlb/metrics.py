"""Prometheus metrics and the /metrics + /healthz endpoint (prometheus_client).

Two kinds of figures:
- the controller's own (event-to-applied latency, reconcile duration,
  operations and errors by kind, Docker stream reconnects), kept in
  ``ControllerMetrics`` and updated by the controller as it works;
- the kernel's, read from IPVS at each scrape by ``TableCollector``, so a
  scrape shows the 64-bit counters as they are, not as of the last resync.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dockerlb.errors import ConfigError, DockerlbError
from dockerlb.model import IPAddress, ServerStats, ServiceKey, Snapshot, addr_order

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
    return [svc_conns, svc_packets, svc_bytes, conns, packets, octets, active, inactive, weight]


def _directions(family: CounterMetricFamily, labels: list[str], inward: int, outward: int) -> None:
    family.add_metric([*labels, "in"], inward)
    family.add_metric([*labels, "out"], outward)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT`` for every address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics-listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:9469")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
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
