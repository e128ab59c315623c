"""Servers that health checks probe, real ones on 127.0.0.1: one that
answers 200, one that accepts and never answers (and counts what it holds),
a port nothing listens on; and a started checker that records its changes."""

import contextlib
import http.server
import selectors
import socket
import threading

from dockerlb.adapters.health import HealthChecker


class _Answers200(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def healthy_server():
    """A real HTTP server answering 200; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers200)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class StallingServer:
    """Accepts every connection, reads what it is sent, never answers; with
    ``trickle``, sends one space every 0.2 s (never a line: per-read
    timeouts never fire). ``live()``: connections the client has not closed;
    ``peak()``: the most of them at once, counted after each batch of events
    (a probe's close and the next one's connect come in one batch)."""

    def __init__(self, trickle: bool = False):
        self.trickle = trickle
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def live(self) -> int:
        with self._lock:
            return len(self._conns)

    def peak(self) -> int:
        with self._lock:
            return self._peak

    def _serve(self):
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    if key.fileobj is self.listener:
                        conn, _ = self.listener.accept()
                        with self._lock:
                            self._conns.add(conn)
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    try:
                        data = key.fileobj.recv(4096)
                    except OSError:
                        data = b""
                    if not data:  # the client closed it
                        self._drop(sel, key.fileobj)
                with self._lock:
                    self._peak = max(self._peak, len(self._conns))
                if self.trickle:
                    with self._lock:
                        conns = list(self._conns)
                    for conn in conns:
                        try:
                            conn.send(b" ")
                        except OSError:
                            self._drop(sel, conn)

    def _drop(self, sel, conn):
        with self._lock:
            self._conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self.listener.close()


@contextlib.contextmanager
def stalling_server(trickle: bool = False):
    server = StallingServer(trickle)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def refused_port():
    """A port nothing listens on (bound, so nobody else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextlib.contextmanager
def started(checker: HealthChecker):
    changes: list[tuple[str, str]] = []
    checker.start(lambda cid, why: changes.append((cid, why)))
    try:
        yield changes
    finally:
        checker.close()
