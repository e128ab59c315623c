"""The metrics endpoint against clients that misbehave, and what it lists.

A real HTTP server on 127.0.0.1, port 0. Waits are generous and end on what
a client can observe (EOF, an answer); nothing asserts how fast it was.
"""

import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from ipaddress import ip_address

import click
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

import dockerlb.app.cli
from dockerlb.adapters.healthz import loopback_for
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
from harness.dockerlab import wait_for

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


def healthz_within(port: int, bound: float) -> tuple[int, bytes]:
    """GET /healthz once; its status and body, having asserted it came
    within ``bound`` seconds (a bound the endpoint promises, stated by the
    test that asks)."""
    start = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
        answer = r.status, r.read()
    took = time.monotonic() - start
    assert took <= bound, f"/healthz took {took:.1f} s, over {bound} s"
    return answer


def dropped(sock: socket.socket) -> bool:
    """Whether the endpoint closed this connection without answering (what
    a client observes: EOF, or a reset when unread bytes were left)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


class Tricklers:
    """``n`` clients each sending a request one byte every ``every`` s (the
    issue's repro: a byte every 2 s) and never finishing it, each connecting
    again whenever the endpoint drops it, as a slowloris would."""

    REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4000

    def __init__(self, port: int, n: int, every: float = 1.0):
        self.port = port
        self.every = every
        self.socks = [self._connect() for _ in range(n)]
        self.sent = [0] * n
        self.drops = [0] * n
        self.ticks = 0  # rounds of one byte each
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setblocking(False)
        return sock

    def _run(self):
        while not self._stop.wait(self.every):
            self.ticks += 1
            for i, sock in enumerate(self.socks):
                try:
                    closed = sock.recv(1024) == b""
                except BlockingIOError:
                    closed = False
                except ConnectionResetError:
                    closed = True
                if not closed:
                    try:
                        sock.send(self.REQUEST[self.sent[i] : self.sent[i] + 1])
                        self.sent[i] += 1
                        continue
                    except OSError:  # reset meanwhile
                        pass
                sock.close()
                with self._lock:
                    self.drops[i] += 1
                self.sent[i] = 0
                self.socks[i] = self._connect()

    def dropped_each(self) -> bool:
        with self._lock:
            return all(self.drops)

    def close(self):
        self._stop.set()
        self._thread.join(30)
        for sock in self.socks:
            sock.close()


def test_a_client_that_sends_nothing_is_dropped(endpoint):
    with idle_connection(endpoint) as sock:
        # Old code: no timeout, this recv waits its full 30 s and raises.
        assert sock.recv(1024) == b""  # EOF: the server closed it


def test_a_client_that_stops_half_way_through_its_request_is_dropped(endpoint):
    with idle_connection(endpoint) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
        assert sock.recv(1024) == b""


def test_twelve_tricklers_never_keep_healthz_from_answering(endpoint):
    # The repro: clients trickling a request a byte at a time held
    # every slot (old code: 8), each read got its byte before its 5 s
    # timeout, and /healthz was refused for as long as they kept at it.
    # Bound: /healthz answers within the request deadline, 5 s.
    tricklers = Tricklers(endpoint, 12)
    try:
        wait_for(lambda: tricklers.ticks >= 2, 30, what="two bytes from each trickler")
        assert healthz_within(endpoint, 5.0) == (200, b"ready\n")
        # Each is dropped at its deadline (it has sent only ~5 bytes) and
        # connects again; /healthz still answers.
        wait_for(tricklers.dropped_each, 30, what="every trickler dropped once")
        assert healthz_within(endpoint, 5.0) == (200, b"ready\n")
    finally:
        tricklers.close()


def test_clients_past_the_connection_limit_wait_and_are_answered_once_the_deadline_frees_slots(endpoint):
    # 70 tricklers: 64 hold every connection (no thread each), 6 wait in the
    # listen queue, then /healthz behind them. Bound: 10 s, the request
    # deadline (5 s) that frees the 64, plus 5 s.
    # The threads that exist, not a count: an earlier test's endpoint
    # workers may still be ending (close() does not join them).
    before = set(threading.enumerate())
    tricklers = Tricklers(endpoint, 70)
    try:
        # Old code: a thread for each of 8 connections, the others closed
        # at once (refused) while the 8 trickle.
        assert set(threading.enumerate()) - before == {tricklers._thread}  # the tricklers' own
        assert healthz_within(endpoint, 10.0) == (200, b"ready\n")
    finally:
        tricklers.close()


def test_healthz_answers_while_eight_scrapes_wait_for_a_slow_collector():
    # A collector that takes its time (as an IPVS read of a large table):
    # eight scrapes wait on it. Old code: they held every slot (8) and
    # /healthz was refused; now /healthz has a thread of its own.
    release = threading.Event()
    entered = threading.Semaphore(0)

    class Slow(Collector):
        def collect(self):
            entered.release()
            release.wait(60)
            return []

    registry = CollectorRegistry()
    registry.register(Slow())
    server = MetricsServer("127.0.0.1:0", registry, lambda: (True, "ready"))
    server.start()
    scrapes = [idle_connection(server.port) for _ in range(8)]
    try:
        for sock in scrapes:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        for _ in range(4):  # as many as answer at once (old code: 8)
            assert entered.acquire(timeout=30)
        assert healthz_within(server.port, 5.0) == (200, b"ready\n")
        assert not release.is_set()  # while every scrape still waits
        release.set()
        for sock in scrapes:
            assert sock.recv(1024).startswith(b"HTTP/1.0 200 OK\r\n")
    finally:
        release.set()
        for sock in scrapes:
            sock.close()
        server.close()


def request_of(size: int) -> bytes:
    """A whole GET /healthz of exactly ``size`` bytes (line, one padding header, blank line)."""
    head, tail = b"GET /healthz HTTP/1.0\r\nX-Pad: ", b"\r\n\r\n"
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_a_request_of_8192_bytes_is_answered_and_one_of_8193_is_cut_off(endpoint):
    with idle_connection(endpoint) as sock:
        sock.sendall(request_of(8192))
        assert sock.recv(1024).startswith(b"HTTP/1.0 200 OK\r\n")
    with idle_connection(endpoint) as sock:
        sock.sendall(request_of(8193))
        # Old code: answered (it allowed 64 KiB a line).
        assert dropped(sock)


def test_a_client_sending_its_request_slower_than_the_deadline_is_dropped_at_it(endpoint):
    # 26 bytes, one every 0.5 s: the request would be whole after 13 s.
    # Bound: dropped at the request deadline, 5 s from accept (0.1 s less
    # from here: the endpoint may accept before connect() returns), and no
    # later than 3 s past it on a busy machine.
    request = b"GET /healthz HTTP/1.0\r\n\r\n"
    with idle_connection(endpoint) as sock:
        start = time.monotonic()
        for i in range(len(request)):
            if select.select([sock], [], [], 0.5)[0]:
                break  # an answer or a close: see below
            try:
                sock.send(request[i : i + 1])
            except OSError:
                break
        took = time.monotonic() - start
        # Old code: each read had 5 s, so it read the request whole and answered.
        assert dropped(sock)
    assert 4.9 <= took <= 8.0, f"dropped after {took:.1f} s"


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


@pytest.mark.parametrize(
    ("host", "asked"),
    [
        ("0.0.0.0", ["127.0.0.1"]),
        ("::", ["::1", "127.0.0.1"]),
        ("127.0.0.1", ["127.0.0.1"]),
        ("10.1.2.3", ["10.1.2.3"]),
        ("::1", ["::1"]),
    ],
)
def test_a_listener_on_every_address_is_asked_on_loopback(host, asked):
    assert loopback_for(host) == asked


def dockerlb_healthz(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``dockerlb healthz`` as the image's HEALTHCHECK runs it: a process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKERLB_")} | env
    return subprocess.run(
        [sys.executable, "-m", "dockerlb.app.cli", "healthz"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:{}", "0.0.0.0:{}", ":{}", "[::]:{}"])
def test_dockerlb_healthz_asks_where_metrics_listen_says(listen):
    server = MetricsServer(listen.format(0), ControllerMetrics().registry, lambda: (True, "ready"))
    server.start()
    try:
        done = dockerlb_healthz({"DOCKERLB_METRICS_LISTEN": listen.format(server.port)})
    finally:
        server.close()
    assert (done.returncode, done.stdout) == (0, "200 ready\n"), done.stderr


def test_a_listener_on_every_ipv6_address_answers_on_ipv4_too():
    # As before the endpoint read requests itself: a container with IPv6
    # off (Docker's default) reaches [::]:PORT on 127.0.0.1 only.
    server = MetricsServer("[::]:0", ControllerMetrics().registry, lambda: (True, "ready"))
    server.start()
    try:
        assert healthz_within(server.port, 5.0) == (200, b"ready\n")
    finally:
        server.close()


def test_dockerlb_healthz_fails_when_not_ready_not_listening_or_not_set():
    server = MetricsServer("127.0.0.1:0", ControllerMetrics().registry, lambda: (False, "stopping"))
    server.start()
    try:
        not_ready = dockerlb_healthz({"DOCKERLB_METRICS_LISTEN": f"127.0.0.1:{server.port}"})
    finally:
        server.close()
    assert (not_ready.returncode, not_ready.stdout) == (1, "503 stopping\n")
    with socket.socket() as bound:  # a port nothing listens on
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        refused = dockerlb_healthz({"DOCKERLB_METRICS_LISTEN": f"127.0.0.1:{port}"})
    assert refused.returncode == 1
    assert refused.stdout.startswith(f"http://127.0.0.1:{port}/healthz: ConnectionRefusedError(")
    unset = dockerlb_healthz({})
    assert unset.returncode == 1 and unset.stdout == ""
    assert "no --metrics-listen (DOCKERLB_METRICS_LISTEN): no /healthz to ask" in unset.stderr
