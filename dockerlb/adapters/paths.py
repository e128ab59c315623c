"""What `doctor --probe` looks at on the way to a real server: the director's
route and neighbour entry, real connections from a namespace, the IPVS
connection table (which server a connection went to), and a real server's
own namespace. Reads and connects; changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import select
import selectors
import socket
import struct
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dockerlb.adapters import sysctl
from dockerlb.adapters.netns import entered, open_in
from dockerlb.core.model import IPAddress, Proto, parse_ip
from dockerlb.core.probe import Inside, Route
from dockerlb.errors import NetnsError

_ROUTE_KINDS = {1: "unicast", 2: "local", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
_NUD = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY", 0x10: "PROBE", 0x20: "FAILED",
        0x40: "NOARP", 0x80: "PERMANENT"}  # fmt: skip
_IFF_UP, _IFF_NOARP = 0x1, 0x80
_RTAX_MTU = "RTAX_MTU"
_MAIN = 254


def _ipr(netns: str | None) -> IPRoute:
    return open_in(netns, IPRoute)


def route_to(netns: str | None, addr: IPAddress) -> Route:
    """The director's route to ``addr``, as `ip route get` resolves it; for
    one that refuses (unreachable, blackhole, prohibit), the route that matched."""
    ipr = _ipr(netns)
    try:
        try:
            (msg,) = ipr.route("get", dst=str(addr))[:1]
        except NetlinkError:
            return _refusing(ipr, addr)
        kind = _ROUTE_KINDS.get(msg["type"], str(msg["type"]))
        if kind not in ("unicast", "local"):
            return _refusing(ipr, addr)
        oif = msg.get_attr("RTA_OIF")
        (link,) = ipr.link("get", index=oif)
        metrics = msg.get_attr("RTA_METRICS")
        mtu = (metrics.get_attr(_RTAX_MTU) if metrics is not None else None) or link.get_attr("IFLA_MTU") or 0
        return Route(
            "unicast", "", link.get_attr("IFLA_IFNAME"), msg.get_attr("RTA_GATEWAY") or str(addr), mtu
        )
    finally:
        ipr.close()


def _refusing(ipr: IPRoute, addr: IPAddress) -> Route:
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    best: tuple[int, str, str] | None = None
    for msg in ipr.route("dump", family=family):
        kind = _ROUTE_KINDS.get(msg["type"])
        if kind in (None, "unicast", "local") or (msg.get_attr("RTA_TABLE") or msg["table"]) != _MAIN:
            continue
        dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if addr.version == 4 else "::")
        net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
        if addr in net and (best is None or msg["dst_len"] > best[0]):
            best = (msg["dst_len"], kind, str(net))
    if best is None:
        return Route("none")
    return Route(best[1], best[2])


def neighbour_state(netns: str | None, hop: str) -> str:
    """The director's neighbour entry for ``hop``: REACHABLE, FAILED, ...; NONE without one."""
    ipr = _ipr(netns)
    try:
        states = [n["state"] for n in ipr.get_neighbours(dst=hop)]
    finally:
        ipr.close()
    if not states:
        return "NONE"
    return _NUD.get(states[0], hex(states[0]))


@dataclass
class Connection:
    result: str  # "ok", "refused", "timeout", "unreachable", or an errno name
    local: tuple[IPAddress, int] | None  # the connecting socket's own address
    sock: socket.socket | None  # open when "ok"; the caller closes it


def connect(netns: str | None, proto: Proto, addr: IPAddress, port: int, timeout: float) -> Connection:
    """A real connection (TCP) or association (SCTP) from namespace ``netns``."""
    return connect_all(netns, [(proto, addr, port)], timeout)[0]


def connect_all(
    netns: str | None, where: Sequence[tuple[Proto, IPAddress, int]], timeout: float
) -> list[Connection]:
    """One real connection to each (protocol, address, port) of ``where``,
    in that order, all from namespace ``netns``: opened at once and waited
    for together, so that many that go unanswered cost one ``timeout``, not
    one each (a director with a few hundred servers is probed in seconds)."""
    out: list[Connection | None] = [None] * len(where)
    pending: dict[socket.socket, int] = {}
    for i, (proto, addr, port) in enumerate(where):
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        kind = socket.IPPROTO_SCTP if proto is Proto.SCTP else socket.IPPROTO_TCP
        try:
            sock = open_in(netns, functools.partial(socket.socket, family, socket.SOCK_STREAM, kind))
        except OSError as e:  # EPROTONOSUPPORT: a kernel without SCTP sockets
            code = e.errno or 0
            out[i] = Connection("unsupported" if code == errno.EPROTONOSUPPORT else _result(code), None, None)
            continue
        sock.setblocking(False)
        try:
            code = sock.connect_ex((str(addr), port))
        except OSError as e:
            code = e.errno or errno.EIO
        if code in (0, errno.EINPROGRESS):
            pending[sock] = i
        else:
            out[i] = _finished(sock, _result(code))
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as waiting:  # epoll: no FD_SETSIZE limit
        for sock in pending:
            waiting.register(sock, selectors.EVENT_WRITE, sock)
        while pending and (left := deadline - time.monotonic()) > 0:
            for ready, _ in waiting.select(left):
                done: socket.socket = ready.data
                waiting.unregister(done)
                code = done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                out[pending.pop(done)] = _finished(done, _result(code))
    for sock, i in pending.items():
        out[i] = _finished(sock, "timeout")
    return [c for c in out if c is not None]


def _finished(sock: socket.socket, result: str) -> Connection:
    """The connection ``sock`` ended up as: left open only when "ok"."""
    try:
        local = sock.getsockname()
        mine: tuple[IPAddress, int] | None = (parse_ip(local[0]), int(local[1]))
    except OSError as e:
        result, mine = _result(e.errno or errno.EIO), None
    if result != "ok":
        sock.close()
        return Connection(result, mine, None)
    return Connection(result, mine, sock)


def _result(code: int) -> str:
    if code == 0:
        return "ok"
    if code == errno.ECONNREFUSED:
        return "refused"
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if code == errno.ETIMEDOUT:
        return "timeout"
    return errno.errorcode.get(code, str(code))


def bulk_acknowledged(sock: socket.socket, size: int, timeout: float) -> bool:
    """Send ``size`` bytes one full-size segment at a time (TCP_NODELAY, a
    write of one MSS each, the next once the last is acknowledged) and say
    whether all were acknowledged within ``timeout`` seconds. One segment
    per write is what a client across routers sends: a write of many
    segments leaves a veth as one GSO packet, which IPVS does not hold to
    the tunnel's MTU. A reset counts as acknowledged: the packets arrived."""
    deadline = time.monotonic() + timeout
    sent = 0
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while sent < size:
            mss = max(536, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
            if not select.select([], [sock], [], max(0.0, deadline - time.monotonic()))[1]:
                return False
            sent += sock.send(b"\0" * min(mss, size - sent))
            while struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
    except OSError:
        return True
    return True


def ipvs_destinations(netns: str | None) -> dict[tuple[Proto, IPAddress, int], tuple[IPAddress, int]]:
    """Every connection in the director's table, one read: (protocol, client
    address, client port) -> the real server's (address, port)."""
    found: dict[tuple[Proto, IPAddress, int], tuple[IPAddress, int]] = {}
    protos = {p.value: p for p in Proto}
    with contextlib.suppress(OSError, NetnsError), entered(netns):
        with open("/proc/thread-self/net/ip_vs_conn") as f:
            lines = f.read().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if len(fields) >= 7 and (proto := protos.get(fields[0].lower())) is not None:
                key = (proto, _conn_ip(fields[1]), int(fields[2], 16))
                found.setdefault(key, (_conn_ip(fields[5]), int(fields[6], 16)))
    return found


def _conn_ip(text: str) -> IPAddress:
    if ":" in text:
        return parse_ip(text)
    return ipaddress.IPv4Address(int(text, 16))


def inside(pid: int, addr: IPAddress) -> Inside:
    """A real server's namespace as its forwarding needs it (read only)."""
    path = f"/proc/{pid}/ns/net"
    ipr = _ipr(path)
    try:
        names = {link["index"]: link for link in ipr.get_links()}
        addrs = [(m["index"], parse_ip(m.get_attr("IFA_ADDRESS"))) for m in ipr.addr("dump")]
        own = next((i for i, a in addrs if a == addr), None)
        if own is None:
            raise NetnsError(f"no interface there has the address {addr}")
        link = names[own]
        ifname = link.get_attr("IFLA_IFNAME")
        lo = frozenset(a for i, a in addrs if names[i].get_attr("IFLA_IFNAME") == "lo")
        tunl0 = next((i for i, lk in names.items() if lk.get_attr("IFLA_IFNAME") == "tunl0"), None)
        tunnel = None if tunl0 is None else frozenset(a for i, a in addrs if i == tunl0)
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        gateway = next(
            (
                parse_ip(m.get_attr("RTA_GATEWAY"))
                for m in ipr.route("dump", family=family)
                if m["dst_len"] == 0
                and m.get_attr("RTA_GATEWAY")
                and (m.get_attr("RTA_TABLE") or m["table"]) == _MAIN
            ),
            None,
        )
    finally:
        ipr.close()

    def conf(dev: str, key: str) -> int:
        try:
            return int(sysctl.read(path, f"net.ipv4.conf.{dev}.{key}"))
        except (OSError, ValueError):
            return 0

    return Inside(
        ifname=ifname,
        noarp=bool(link["flags"] & _IFF_NOARP),
        arp_ignore=max(conf("all", "arp_ignore"), conf(ifname, "arp_ignore")),
        arp_announce=max(conf("all", "arp_announce"), conf(ifname, "arp_announce")),
        lo=lo,
        tunnel=tunnel,
        tunnel_up=tunl0 is not None and bool(names[tunl0]["flags"] & _IFF_UP),
        rp_filter=max(conf("all", "rp_filter"), conf("tunl0", "rp_filter")) if tunl0 is not None else 0,
        gateway=gateway,
    )
