"""The IPVS table as the kernel writes it in /proc/net/ip_vs, parsed.

Why a second way to read the table: a full read over generic netlink is
one dump per service (1 + 1,000 dumps for 1,000 services), each a send and
two receives; in the UML guest, where a system call is expensive, that was
most of a periodic resync (bench/resync_parts.py). The text file holds the
whole table and is read in a few hundred reads. It lacks the counters
(status and the metrics read those by netlink) and a server's connection
thresholds (the adapter reads the services that may have some by netlink:
``IpvsAdapter._read_text``), and writes a persistence timeout in the
kernel's jiffies (``svc->timeout``: seconds times HZ), so the reader is
told HZ. The format is ip_vs_info_seq_show in
net/netfilter/ipvs/ip_vs_ctl.c, unchanged since Linux 2.6:

    IP Virtual Server version 1.2.1 (size=4096)
    Prot LocalAddress:Port Scheduler Flags
      -> RemoteAddress:Port Forward Weight ActiveConn InActConn
    TCP  0A000001:0050 wlc persistent 36000 FFFFFFFF
      -> 0A800002:1F90      Masq    1      0          0
    UDP  [fd00:0000:0000:0000:0000:0000:0000:0001]:0035 rr
    FWM  00000001 wlc

A service whose text is what it was at the last read is the same record
as then (``TextTable.parse``): a resync that finds nothing changed makes
almost nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from dockerlb.core.model import (
    Forward,
    IPAddress,
    Proto,
    RealServer,
    ServerStats,
    Service,
    ServiceKey,
    VirtualService,
)

_PROTOS = {b"TCP": Proto.TCP, b"UDP": Proto.UDP, b"SCTP": Proto.SCTP}  # ip_vs_proto_name
# ip_vs_fwd_name: "Local" (a local node) is what netlink's reader calls DR.
_FORWARDS = {b"Masq": Forward.NAT, b"Route": Forward.DR, b"Tunnel": Forward.TUN, b"Local": Forward.DR}
_HEADER_LINES = 3


class Unreadable(ValueError):
    """The text is not what ip_vs_info_seq_show writes (or HZ is needed and unknown)."""


@dataclass(frozen=True, slots=True)
class Persistent:
    """A persistent service's timeout as the text writes it (jiffies)."""

    key: ServiceKey
    jiffies: int


class TextTable:
    """Parses successive copies of the file, reusing what did not change."""

    def __init__(self) -> None:
        # A service's lines (its own, and each server's without its two
        # connection gauges) -> the record they made at the last read.
        self._last: dict[bytes, tuple[tuple[bytes, ...], VirtualService]] = {}

    def parse(
        self, text: bytes, hz: int | None
    ) -> tuple[dict[ServiceKey, VirtualService], dict[tuple[ServiceKey, tuple[IPAddress, int]], ServerStats]]:
        """(table, connection gauges of the servers that have connections).
        ``hz``: the kernel's HZ (None: unknown; a persistent service then
        raises ``Unreadable``, see ``persistent``)."""
        lines = text.split(b"\n")
        if len(lines) < _HEADER_LINES or not lines[0].startswith(b"IP Virtual Server"):
            raise Unreadable("not /proc/net/ip_vs: " + lines[0][:60].decode(errors="replace"))
        table: dict[ServiceKey, VirtualService] = {}
        stats: dict[tuple[ServiceKey, tuple[IPAddress, int]], ServerStats] = {}
        now: dict[bytes, tuple[tuple[bytes, ...], VirtualService]] = {}
        i, end = _HEADER_LINES, len(lines)
        while i < end:
            head = lines[i]
            i += 1
            if not head:
                continue
            if head.startswith(b" "):
                raise Unreadable(f"a server line outside a service: {head[:60]!r}")
            servers: list[bytes] = []
            gauges: list[tuple[bytes, bytes]] = []
            while i < end and lines[i].startswith(b"  -> "):
                fields = lines[i].rsplit(None, 2)
                if len(fields) != 3:
                    raise Unreadable(f"a server line of an unknown shape: {lines[i][:60]!r}")
                servers.append(fields[0])
                gauges.append((fields[1], fields[2]))
                i += 1
            shape = tuple(servers)
            known = self._last.get(head)
            if known is not None and known[0] == shape:
                vs = known[1]
            else:
                made = _service(head, hz)
                if made is None:
                    continue  # a firewall-mark or another protocol's service: never dockerlb's
                vs = VirtualService.of(made, [_server(s) for s in servers])
            now[head] = (shape, vs)
            table[vs.service.key] = vs
            for (active, inactive), server in zip(gauges, vs.servers.values(), strict=True):
                if active != b"0" or inactive != b"0":
                    stats[(vs.service.key, server.ident)] = ServerStats(int(active), int(inactive))
        self._last = now
        return table, stats


def persistent(text: bytes) -> list[Persistent]:
    """Every persistent service the text shows, with its timeout in jiffies
    (to learn HZ from, beside what netlink says in seconds)."""
    found = []
    for line in text.split(b"\n")[_HEADER_LINES:]:
        if line and not line.startswith(b" ") and b" persistent " in line:
            tokens = line.split()
            key = _key(tokens)
            if key is not None:
                found.append(Persistent(key, int(tokens[tokens.index(b"persistent") + 1])))
    return found


def _key(tokens: list[bytes]) -> ServiceKey | None:
    proto = _PROTOS.get(tokens[0])
    if proto is None or len(tokens) < 3:
        return None
    where, _, port = tokens[1].rpartition(b":")
    if where.startswith(b"["):
        addr: IPAddress = IPv6Address(bytes.fromhex(where[1:-1].replace(b":", b"").decode()))
    else:
        addr = IPv4Address(int(where, 16))
    return ServiceKey(proto, addr, int(port, 16))


def _service(line: bytes, hz: int | None) -> Service | None:
    tokens = line.split()
    key = _key(tokens)
    if key is None:
        return None
    persistence = 0
    if b"persistent" in tokens:
        if not hz:
            raise Unreadable("a persistent service, and the kernel's HZ is not known")
        jiffies = int(tokens[tokens.index(b"persistent") + 1])
        persistence = jiffies // hz
    return Service(key, tokens[2].decode(), persistence)


def _server(fields: bytes) -> RealServer:
    """One server line without its gauges: ``  -> ADDR:PORT FORWARD WEIGHT``."""
    _, where_port, forward, weight = fields.split()
    where, _, port = where_port.rpartition(b":")
    if where.startswith(b"["):
        addr: IPAddress = IPv6Address(bytes.fromhex(where[1:-1].replace(b":", b"").decode()))
    else:
        addr = IPv4Address(int(where, 16))
    fwd = _FORWARDS.get(forward)
    if fwd is None:
        raise Unreadable(f"a forwarding method of an unknown name: {forward!r}")
    return RealServer(addr, int(port, 16), int(weight), fwd)
