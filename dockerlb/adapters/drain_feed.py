"""The running controller's drains, told to `status` in another process.

Only the controller knows when each drain began (a stop signal is an
event, not something inspect shows), so only it can say how long a drain
has left before ``--drain-timeout``. It says so on an abstract unix socket
in the director's network namespace: abstract names belong to the network
namespace, so whoever can enter it (``status --netns``, or a process in the
director's container) can ask, with no file and no port. Each connection
gets one JSON document and is closed; nothing is read from the client.
The document: ``{"drain_timeout": S, "drains": {container: seconds left}}``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from loguru import logger

from dockerlb.adapters.netns import open_in
from dockerlb.errors import NetnsError

# A client has this long to take its document; the feed serves one at a time.
SEND_TIMEOUT = 1.0
MAX_DOCUMENT = 1 << 20


def feed_name(interface: str) -> bytes:
    """One feed per controller in a namespace: its interface is its own."""
    return f"\0dockerlb/{interface}/drains".encode()


class DrainFeed:
    """Serves ``report()`` (a JSON-able dict) to each client, from a thread."""

    def __init__(
        self, netns_path: str | None, interface: str, report: Callable[[], Mapping[str, Any]]
    ) -> None:
        self._report = report
        self._sock: socket.socket | None = None
        try:
            sock = open_in(netns_path, lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        except (NetnsError, OSError) as e:
            logger.warning("drain feed: cannot open a socket in the director namespace: {}", e)
            return
        try:
            sock.bind(feed_name(interface))
            sock.listen(8)
        except OSError as e:
            sock.close()
            # Not fatal: status then shows drains without their time left.
            logger.warning("drain feed: {} (is another controller using --interface {}?)", e, interface)
            return
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="drain-feed", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(SEND_TIMEOUT)
                try:
                    conn.sendall(json.dumps(dict(self._report())).encode())
                except (OSError, ValueError, TypeError) as e:
                    logger.debug("drain feed: a client was not served: {!r}", e)

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self._sock.close()
        self._thread.join(timeout=5)


def read_feed(netns_path: str | None, interface: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The controller's document, or None when no controller answers there."""
    try:
        sock = open_in(netns_path, lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    except (NetnsError, OSError):
        return None
    with sock:
        sock.settimeout(timeout)
        data = b""
        try:
            sock.connect(feed_name(interface))
            while len(data) < MAX_DOCUMENT and (chunk := sock.recv(65536)):
                data += chunk
            document = json.loads(data)
        except (OSError, ValueError):
            return None
    return document if isinstance(document, dict) else None


def drains_in(document: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The document's drains (container -> seconds left); None when there is
    no document or it says nothing readable."""
    if document is None or not isinstance(document.get("drains"), dict):
        return None
    return {
        str(name): float(left)
        for name, left in document["drains"].items()
        if isinstance(left, int | float) and not isinstance(left, bool)
    }
