"""Asking a /healthz: what the image's HEALTHCHECK runs every 30 s
(``python3 -m dockerlb.adapters.healthz``, exit 0 when ready, 1 otherwise).

The standard library alone: the check starts a Python of its own each time,
and importing the CLI (the Docker SDK, pyroute2, ...) cost it 1.6 s of a
loaded machine's time; this costs a Python start-up. Where to ask is read
from DOCKERLB_METRICS_LISTEN at the time of the check.
"""

from __future__ import annotations

import http.client
import os
import sys

from dockerlb.errors import ConfigError


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT`` for every address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics-listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9469")
    return host.strip("[]") or "0.0.0.0", int(port)


def loopback_for(host: str) -> list[str]:
    """Where a client in the endpoint's own namespace reaches a listener
    bound to ``host``, in the order to try: a listener on every address
    (``0.0.0.0``, ``::``, what ``:PORT`` binds) is asked on loopback; ``::``
    is dual-stack, and ``::1`` is missing where IPv6 is off (Docker's
    default in a container), so 127.0.0.1 comes second."""
    if host == "0.0.0.0":
        return ["127.0.0.1"]
    if host == "::":
        return ["::1", "127.0.0.1"]
    return [host]


def ask_healthz(listen: str, timeout: float) -> tuple[bool, str]:
    """GET /healthz from the endpoint ``--metrics-listen`` names, as a
    client in its namespace: (ready, what it said or why there was no
    answer). Each address is given ``timeout`` seconds per step."""
    host, port = parse_listen(listen)
    failures = []
    for addr in loopback_for(host):
        conn = http.client.HTTPConnection(addr, port, timeout=timeout)
        try:
            conn.request("GET", "/healthz")
            answer = conn.getresponse()
            said = answer.read(512).decode(errors="replace").strip()
            return answer.status == 200, f"{answer.status} {said}"
        except (OSError, http.client.HTTPException) as e:
            where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
            failures.append(f"http://{where}/healthz: {e!r}")
        finally:
            conn.close()
    return False, "; ".join(failures)


def main() -> None:
    listen = os.environ.get("DOCKERLB_METRICS_LISTEN", "")
    if not listen:
        print("no DOCKERLB_METRICS_LISTEN: no /healthz to ask", file=sys.stderr)
        sys.exit(1)
    try:
        ready, said = ask_healthz(listen, timeout=10.0)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    print(said)
    sys.exit(0 if ready else 1)


if __name__ == "__main__":
    main()
