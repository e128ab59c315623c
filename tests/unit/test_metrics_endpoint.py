"""The metrics endpoint against clients that misbehave, and what it lists.

A real HTTP server on 127.0.0.1, port 0. Waits are generous and end on what
a client can observe (EOF, an answer); nothing asserts how fast it was.
"""

import http.client
import socket
import threading
import time
import urllib.request
from ipaddress import ip_address

import click
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

import dockerlb.app.cli
from dockerlb.adapters.metrics import ControllerMetrics, MetricsServer, TableCollector, TableView
from dockerlb.core.model import (
    Forward,
    Proto,
    RealServer,
    ServerStats,
    Service,
    ServiceKey,
    Snapshot,
    VirtualService,
)
from dockerlb.settings import Settings

pytestmark = pytest.mark.unit

OURS = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)
WEB1 = RealServer(ip_address("172.18.0.3"), 8000, 1, Forward.NAT)
THEIRS = ServiceKey(Proto.UDP, ip_address("9.9.9.9"), 53)
DNS = RealServer(ip_address("10.9.0.2"), 53, 3, Forward.NAT)

OUR_SERVICE = (
    'dockerlb_service_connections_total{managed="true",port="8000",protocol="tcp",vip="1.2.3.4"} 49.0'
)
OUR_SERVER = (
    'dockerlb_server_connections_total{container="web1",port="8000",protocol="tcp",'
    'server="172.18.0.3:8000",vip="1.2.3.4"} 42.0'
)
THEIR_SERVICE = (
    'dockerlb_service_connections_total{managed="false",port="53",protocol="udp",vip="9.9.9.9"} 5.0'
)
THEIR_SERVER = (
    'dockerlb_server_weight{container="",port="53",protocol="udp",server="10.9.0.2:53",vip="9.9.9.9"} 3.0'
)


def snapshot() -> Snapshot:
    return Snapshot(
        {
            OURS: VirtualService.of(Service(OURS), [WEB1]),
            THEIRS: VirtualService.of(Service(THEIRS, "rr"), [DNS]),
        },
        {(OURS, WEB1.ident): ServerStats(conns=42), (THEIRS, DNS.ident): ServerStats(conns=5)},
        {OURS: ServerStats(conns=49), THEIRS: ServerStats(conns=5)},
    )


NAMES = {(OURS, WEB1.ident): "web1"}


@pytest.fixture
def endpoint():
    server = MetricsServer("127.0.0.1:0", ControllerMetrics().registry, lambda: (True, "ready"))
    server.start()
    yield server.port
    server.close()


def idle_connection(port: int) -> socket.socket:
    """A client that connects and never sends a byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(30)
    return sock


def healthz_once_served(port: int) -> int:
    """GET /healthz, retrying while the endpoint refuses (closes) the connection."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
                return r.status
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_client_that_sends_nothing_is_dropped(endpoint):
    with idle_connection(endpoint) as sock:
        # Old code: no timeout, this recv waits its full 30 s and raises.
        assert sock.recv(1024) == b""  # EOF: the server closed it


def test_a_client_that_stops_half_way_through_its_request_is_dropped(endpoint):
    with idle_connection(endpoint) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
        assert sock.recv(1024) == b""


def test_many_idle_connections_hold_a_bounded_number_of_threads_and_scrapes_recover(endpoint):
    before = threading.active_count()
    idle: list[socket.socket] = []
    peak = before
    try:
        for _ in range(60):
            idle.append(idle_connection(endpoint))
            peak = max(peak, threading.active_count())
        # Served only once the server has accepted every connection before it.
        assert healthz_once_served(endpoint) == 200
        peak = max(peak, threading.active_count())
    finally:
        for sock in idle:
            sock.close()
    # Old code: a thread for each of the 60 idle connections.
    assert peak - before <= 10, f"{peak - before} threads for 60 idle connections"


def test_the_table_lists_only_dockerlbs_services_unless_asked_for_all():
    def scrape(view: TableView) -> list[str]:
        registry = CollectorRegistry()
        registry.register(TableCollector(lambda: view, lambda e: None))
        return generate_latest(registry).decode().splitlines()

    own = scrape(TableView.of(snapshot(), frozenset({OURS.vip}), NAMES))
    assert OUR_SERVICE in own and OUR_SERVER in own
    assert [line for line in own if "9.9.9.9" in line] == []
    every = scrape(TableView.of(snapshot(), frozenset({OURS.vip}), NAMES, all_services=True))
    assert OUR_SERVICE in every and OUR_SERVER in every
    assert THEIR_SERVICE in every and THEIR_SERVER in every


class _Ipvs:
    """Stands for IpvsAdapter: the table as the kernel would hold it."""

    def __init__(self, path, settings):
        pass

    def read(self) -> Snapshot:
        return snapshot()

    def close(self) -> None:
        pass


class _Controller:
    owned_vips = frozenset({OURS.vip})

    def server_names(self):
        return NAMES

    def drains_left(self):
        return {}

    def health(self):
        return (True, "ready")


def scrape_run(monkeypatch, settings: Settings) -> list[str]:
    """/metrics over HTTP as `dockerlb run` serves it with these settings."""
    monkeypatch.setattr(dockerlb.app.cli, "IpvsAdapter", _Ipvs)
    opened = dockerlb.app.cli.Opened(_Controller(), None, lambda: None)  # type: ignore[arg-type]
    server = dockerlb.app.cli._metrics_server(settings, ControllerMetrics(), [opened])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as r:
            return r.read().decode().splitlines()
    finally:
        server.close()


def test_run_lists_foreign_services_only_with_metrics_all_services(monkeypatch):
    default = scrape_run(monkeypatch, Settings(metrics_listen="127.0.0.1:0"))
    assert OUR_SERVICE in default and OUR_SERVER in default
    assert [line for line in default if "9.9.9.9" in line] == []
    every = scrape_run(monkeypatch, Settings(metrics_listen="127.0.0.1:0", metrics_all_services=True))
    assert OUR_SERVICE in every and THEIR_SERVICE in every and THEIR_SERVER in every


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, (False, "")),
        (["--metrics-all-services"], {}, (True, "")),
        ([], {"DOCKERLB_METRICS_ALL_SERVICES": "1"}, (True, "")),
        ([], {"DOCKERLB_METRICS_LISTEN": "127.0.0.1:9469"}, (False, "127.0.0.1:9469")),
    ],
)
def test_metrics_are_off_and_owned_only_unless_set(monkeypatch, args, env, expected):
    for name in ("DOCKERLB_METRICS_ALL_SERVICES", "DOCKERLB_METRICS_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    seen = []

    @click.command()
    @dockerlb.app.cli.settings_options
    def probe(**opts):
        settings = Settings(**opts)
        seen.append((settings.metrics_all_services, settings.metrics_listen))

    result = CliRunner().invoke(probe, args, env=env)
    assert result.exit_code == 0, result.output
    assert seen == [expected]
