"""Announcement's two adapters (core/announce.py decides what is announced):

- ``RouteTable``: the announced VIPs as routes in a routing table of
  dockerlb's own in the director's namespace (``--announce-table``), each a
  ``blackhole`` /32 or /128 with dockerlb's ``proto`` (``--announce-proto``)
  and ``--announce-metric``. The BGP speaker there (BIRD's ``protocol
  kernel`` with ``learn``) imports that table and advertises it. A blackhole
  names no interface and no next hop (the speaker puts its own), and in a
  table no rule looks up it sends no packet anywhere. Only routes with
  dockerlb's proto are read or touched: anything else in the table is
  someone else's.
- ``BirdSpeaker``: BIRD's control socket, asked ``show protocols``. dockerlb
  speaks BIRD's text protocol itself rather than running ``birdc``: the
  controller's image then needs no BIRD, and the answer is a few lines.
"""

from __future__ import annotations

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dockerlb.adapters.netns import open_in
from dockerlb.core.announce import Route, SpeakerState, parse_protocols
from dockerlb.core.model import parse_ip
from dockerlb.errors import AnnounceError, NetnsError
from dockerlb.settings import Settings

_RTN_BLACKHOLE = 6
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# The kernel stores an IPv6 route asked at metric 0 at 1024 (IP6_RT_PRIO_USER):
# the same route, so read back as 0, or every full pass would make it again.
_V6_DEFAULT_METRIC = 1024


class RouteTable:
    """dockerlb's routes in ``--announce-table`` of the director's namespace."""

    def __init__(self, netns_path: str | None, settings: Settings) -> None:
        self._table = settings.announce_table
        self._proto = settings.announce_proto
        try:
            self._ipr = open_in(netns_path, IPRoute)
        except (NetlinkError, NetnsError, OSError) as e:
            raise AnnounceError(f"cannot open netlink in namespace {netns_path}: {e}") from e

    def close(self) -> None:
        self._ipr.close()

    def routes(self) -> frozenset[Route]:
        """dockerlb's routes in its table (its proto), whatever their type."""
        found = set()
        try:
            for family in _FAMILIES:
                for m in self._ipr.route("dump", family=family):
                    table = m.get_attr("RTA_TABLE") or m["table"]
                    if table != self._table or m["proto"] != self._proto:
                        continue
                    dst = m.get_attr("RTA_DST")
                    if dst is None or m["dst_len"] != (32 if family == socket.AF_INET else 128):
                        continue
                    metric = m.get_attr("RTA_PRIORITY") or 0
                    if family == socket.AF_INET6 and metric == _V6_DEFAULT_METRIC:
                        metric = 0
                    found.add(Route(parse_ip(dst), metric))
        except (NetlinkError, OSError) as e:
            raise AnnounceError(f"cannot read routing table {self._table}: {e}") from e
        return frozenset(found)

    def add(self, route: Route) -> None:
        try:
            self._ipr.route("add", **self._attrs(route))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AnnounceError(f"cannot announce {route.vip} (table {self._table}): {e}") from e
        except (OSError, ValueError) as e:
            raise AnnounceError(f"cannot announce {route.vip} (table {self._table}): {e}") from e

    def remove(self, route: Route) -> None:
        try:
            self._ipr.route("del", **self._attrs(route))
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise AnnounceError(f"cannot withdraw {route.vip} (table {self._table}): {e}") from e
        except (OSError, ValueError) as e:
            raise AnnounceError(f"cannot withdraw {route.vip} (table {self._table}): {e}") from e

    def _attrs(self, route: Route) -> dict:
        return {
            "dst": f"{route.vip}/{route.vip.max_prefixlen}",
            "family": socket.AF_INET if route.vip.version == 4 else socket.AF_INET6,
            "table": self._table,
            "proto": self._proto,
            "priority": route.metric,
            "type": _RTN_BLACKHOLE,
        }


class BirdSpeaker:
    """BIRD 2's control socket: who the speaker is and its BGP sessions."""

    def __init__(self, path: str, timeout: float = 2.0) -> None:
        self.path = path
        self._timeout = timeout

    def state(self) -> SpeakerState:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self._timeout)
                s.connect(self.path)
                greeting = _reply(s)
                s.sendall(b"show protocols\n")
                reply = _reply(s)
        except FileNotFoundError:
            return SpeakerState(error=f"no control socket at {self.path} (is BIRD running?)")
        except ConnectionRefusedError:
            return SpeakerState(error=f"nothing listens on {self.path} (is BIRD running?)")
        except (OSError, ValueError) as e:
            return SpeakerState(error=f"cannot ask BIRD on {self.path}: {e}")
        return parse_protocols(greeting, reply)


_MAX_REPLY = 1 << 20


def _reply(s: socket.socket) -> str:
    """One whole reply: up to the line whose code is followed by a space."""
    data = b""
    while True:
        lines = data.split(b"\n")
        if any(len(line) >= 5 and line[:4].isdigit() and line[4:5] == b" " for line in lines[:-1]):
            return data.decode(errors="replace")
        chunk = s.recv(65536)
        if not chunk:
            raise ValueError("BIRD closed the connection mid-reply")
        data += chunk
        if len(data) > _MAX_REPLY:
            raise ValueError("BIRD's reply is over 1 MiB")
