"""IPVS messages as bytes: the writes and dumps of the IPVS adapter.

Why not pyroute2's own records here: building and encoding one real-server
message through pyroute2's IPVSDest/ipvsmsg classes measured ~0.9 ms of
Python on the host, and decoding one dumped real server ~0.6 ms (about 20x
that under the guest's emulation): a cold sync of 10,000 real servers was
far slower than ``ipvsadm -R``, and reading such a table took seconds. The
messages have a fixed layout (include/uapi/linux/ip_vs.h), so struct packs
and unpacks them in microseconds. pyroute2 still opens the socket (in the
director's namespace) and resolves the family; tests check these bytes
against pyroute2's own encoding and decoding.
"""

from __future__ import annotations

import functools
import operator
import socket
import struct
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from pyroute2.netlink.generic import ipvs as genl

from dockerlb.adapters.netlink_wire import (
    HEADER,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    attributes,
)
from dockerlb.core.model import Forward, IPAddress, Proto, RealServer, ServerStats, Service, ServiceKey
from dockerlb.core.plan import ADD, EDIT, REMOVE, Write
from dockerlb.core.sync import BACKUP, MASTER, SyncDaemon

_NLA_NESTED = 0x8000
_NLA_HEADER = struct.Struct("=HH").unpack_from

# include/uapi/linux/ip_vs.h
_CMD_ATTR_SERVICE, _CMD_ATTR_DEST = 1, 2
_SVC_AF, _SVC_PROTOCOL, _SVC_ADDR, _SVC_PORT = 1, 2, 3, 4
_SVC_SCHED_NAME, _SVC_FLAGS, _SVC_TIMEOUT, _SVC_NETMASK = 6, 7, 8, 9
_DEST_ADDR, _DEST_PORT, _DEST_FWD, _DEST_WEIGHT, _DEST_U_THRESH, _DEST_L_THRESH = 1, 2, 3, 4, 5, 6
_DEST_ACTIVE, _DEST_INACTIVE, _DEST_AF, _DEST_STATS64 = 7, 8, 11, 12
_SVC_FWMARK, _SVC_STATS64 = 5, 12
_SVC_F_PERSISTENT = 0x0001
# IP_VS_SVC_F_SCHED1, which sh and mh read as "fallback": a client hashed to
# a server at weight 0 (draining, or its check down) goes to the next one in
# the hash table. Without it the kernel drops that client's new connections
# for as long as the server drains (ip_vs_sh_get, ip_vs_mh_get), and mh keeps
# a drained server's slots (its last weight) until it is removed.
_SVC_F_SCHED_FALLBACK = 0x0008
_FALLBACK_SCHEDULERS = frozenset({"sh", "mh"})
_CMD_ATTR_DAEMON = 3
_DAEMON_STATE, _DAEMON_IFN, _DAEMON_SYNC_ID = 1, 2, 3
_DAEMON_CODES = {MASTER: 1, BACKUP: 2}  # IP_VS_STATE_MASTER / _BACKUP
_DAEMON_STATES = {v: k for k, v in _DAEMON_CODES.items()}
FORWARD_CODES = {Forward.NAT: 0, Forward.TUN: 2, Forward.DR: 3}  # IP_VS_CONN_F_MASQ/TUNNEL/DROUTE
_FORWARD_OF = {v: k for k, v in FORWARD_CODES.items()}
_FWD_MASK = 0x0007
PROTO_NUMBERS = {
    Proto.TCP: socket.IPPROTO_TCP,
    Proto.UDP: socket.IPPROTO_UDP,
    Proto.SCTP: socket.IPPROTO_SCTP,
}
_PROTO_OF = {v: k for k, v in PROTO_NUMBERS.items()}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_VERSION_OF: dict[int, int] = {v: k for k, v in _AF.items()}
_NO_COUNTERS = ServerStats()
# IPVS_STATS_ATTR_CONNS (1) .. OUTBPS (10), in ServerStats' order after the gauges.
_STATS_FIELDS = (
    "conns",
    "inpkts",
    "outpkts",
    "inbytes",
    "outbytes",
    "cps",
    "inpps",
    "outpps",
    "inbps",
    "outbps",
)

_SERVICE_CMD = {
    ADD: genl.IPVS_CMD_NEW_SERVICE,
    EDIT: genl.IPVS_CMD_SET_SERVICE,
    REMOVE: genl.IPVS_CMD_DEL_SERVICE,
}
_DEST_CMD = {ADD: genl.IPVS_CMD_NEW_DEST, EDIT: genl.IPVS_CMD_SET_DEST, REMOVE: genl.IPVS_CMD_DEL_DEST}


def netmask(version: int) -> int:
    """IPVS_SVC_ATTR_NETMASK, a host-order u32: all ones for IPv4, a prefix
    length (128) for IPv6."""
    return 0xFFFFFFFF if version == 4 else 128


def encode(write: Write, family: int, seq: int, pid: int, flags: int = NLM_F_REQUEST) -> bytes:
    """The whole netlink message for one write."""
    service = _service_nest(write.service, full=write.server is None)
    if write.server is None:
        cmd = _SERVICE_CMD[write.verb]
        payload = service
    else:
        cmd = _DEST_CMD[write.verb]
        payload = service + _nest(_CMD_ATTR_DEST, _dest_attrs(write.server))
    return _message(family, flags, seq, pid, cmd, payload)


def dump_request(family: int, seq: int, key: ServiceKey | None = None) -> bytes:
    """Ask for every service (key None), or for one service's real servers."""
    if key is None:
        cmd, payload = genl.IPVS_CMD_GET_SERVICE, b""
    else:
        cmd, payload = genl.IPVS_CMD_GET_DEST, _service_nest(Service(key), full=False)
    return _message(family, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, cmd, payload)


def daemon_start(family: int, seq: int, daemon: SyncDaemon) -> bytes:
    """Start one connection-sync daemon (acknowledged)."""
    attrs = (
        _u32(_DAEMON_STATE, _DAEMON_CODES[daemon.state])
        + _attr(_DAEMON_IFN, daemon.interface.encode() + b"\0")
        + _u32(_DAEMON_SYNC_ID, daemon.sync_id)
    )
    return _message(
        family, NLM_F_REQUEST | NLM_F_ACK, seq, 0, genl.IPVS_CMD_NEW_DAEMON, _nest(_CMD_ATTR_DAEMON, attrs)
    )


def daemon_stop(family: int, seq: int, state: str) -> bytes:
    """Stop the daemon of one state (acknowledged)."""
    attrs = _u32(_DAEMON_STATE, _DAEMON_CODES[state])
    return _message(
        family, NLM_F_REQUEST | NLM_F_ACK, seq, 0, genl.IPVS_CMD_DEL_DAEMON, _nest(_CMD_ATTR_DAEMON, attrs)
    )


def daemons_request(family: int, seq: int) -> bytes:
    """Ask for the running daemons (a dump: one message per daemon)."""
    return _message(family, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, genl.IPVS_CMD_GET_DAEMON, b"")


def daemon_of(payload: bytes) -> SyncDaemon | None:
    """A dumped daemon; None for a state this kernel's headers do not name."""
    attrs = _attrs(_attrs(payload[4:]).get(_CMD_ATTR_DAEMON, b""))
    state = _DAEMON_STATES.get(_int(attrs.get(_DAEMON_STATE)))
    if state is None:
        return None
    interface = attrs.get(_DAEMON_IFN, b"").split(b"\0")[0].decode(errors="replace")
    return SyncDaemon(state, interface, _int(attrs.get(_DAEMON_SYNC_ID)))


def _message(family: int, flags: int, seq: int, pid: int, cmd: int, payload: bytes) -> bytes:
    """nlmsghdr + genlmsghdr + attributes."""
    body = struct.pack("=BBH", cmd, genl.GENL_VERSION, 0) + payload
    return HEADER.pack(16 + len(body), family, flags, seq, pid) + body


def service_of(payload: bytes, counters: bool = True) -> tuple[Service, ServerStats] | None:
    """A dumped service and its counters (zeros unless ``counters``); None
    for one dockerlb cannot name (a firewall-mark service has no VIP, so it
    is never dockerlb's)."""
    svc = _attrs(_attrs(payload[4:]).get(_CMD_ATTR_SERVICE, b""))
    proto = _PROTO_OF.get(_int(svc.get(_SVC_PROTOCOL)))
    if _SVC_ADDR not in svc or proto is None or _int(svc.get(_SVC_FWMARK)):
        return None
    version = _VERSION_OF.get(_int(svc.get(_SVC_AF)))
    if version is None:
        return None
    flags = _int(svc.get(_SVC_FLAGS, b"\0" * 4)[:4])
    service = Service(
        ServiceKey(proto, _ip(svc[_SVC_ADDR], version), struct.unpack("!H", svc[_SVC_PORT])[0]),
        scheduler=svc.get(_SVC_SCHED_NAME, b"").rstrip(b"\0").decode(),
        persistence=_int(svc.get(_SVC_TIMEOUT)) if flags & _SVC_F_PERSISTENT else 0,
    )
    return service, _stats(svc.get(_SVC_STATS64)) if counters else _NO_COUNTERS


def server_of(payload: bytes, version: int, counters: bool = True) -> tuple[RealServer, ServerStats]:
    """A dumped real server and its figures: its connection gauges always,
    its counters only if ``counters``. ``version`` is its service's IP
    version (older kernels do not say the server's own)."""
    dest = _attrs(_attrs(payload[4:])[_CMD_ATTR_DEST])
    version = _VERSION_OF.get(_int(dest.get(_DEST_AF)), version)
    server = RealServer(
        _ip(dest[_DEST_ADDR], version),
        struct.unpack("!H", dest[_DEST_PORT])[0],
        weight=_int(dest.get(_DEST_WEIGHT)),
        # LOCALNODE (1) has no label name; report it as what it behaves like.
        forward=_FORWARD_OF.get(_int(dest.get(_DEST_FWD)) & _FWD_MASK, Forward.DR),
        upper_threshold=_int(dest.get(_DEST_U_THRESH)),
        lower_threshold=_int(dest.get(_DEST_L_THRESH)),
    )
    active, inactive = _int(dest.get(_DEST_ACTIVE)), _int(dest.get(_DEST_INACTIVE))
    if not counters:  # a reconcile needs the gauges (is a drain over?), not the counters
        return server, ServerStats(active, inactive)
    return server, _stats(dest.get(_DEST_STATS64), active, inactive)


def _attrs(data: bytes) -> dict[int, bytes]:
    return {kind & NLA_TYPE_MASK: data[at + 4 : at + length] for kind, at, length in attributes(data)}


def _int(value: bytes | None) -> int:
    """A u8/u16/u32/u64 attribute in host order; 0 when absent."""
    return int.from_bytes(value, sys.byteorder) if value else 0


def _ip(value: bytes, version: int) -> IPAddress:
    # By version: ip_address() would try IPv4 first and fail its way to IPv6.
    return IPv4Address(bytes(value[:4])) if version == 4 else IPv6Address(bytes(value[:16]))


def _stats(data: bytes | None, active: int = 0, inactive: int = 0) -> ServerStats:
    values = _attrs(data or b"")
    return ServerStats(active, inactive, **{f: _int(values.get(i)) for i, f in enumerate(_STATS_FIELDS, 1)})


@functools.lru_cache(maxsize=4096)
def _service_nest(service: Service, full: bool) -> bytes:
    """IPVS_CMD_ATTR_SERVICE; cached, as a service's real servers all name it."""
    return _nest(_CMD_ATTR_SERVICE, _service_attrs(service, full))


def _service_attrs(service: Service, full: bool) -> bytes:
    key: ServiceKey = service.key
    attrs = (
        _u16(_SVC_AF, _AF[key.vip.version])
        + _u16(_SVC_PROTOCOL, PROTO_NUMBERS[key.proto])
        + _attr(_SVC_ADDR, key.vip.packed)
        + _attr(_SVC_PORT, struct.pack("!H", key.port))
    )
    if full:  # a key is enough to name a service; creating or changing one needs all
        flags = _SVC_F_PERSISTENT if service.persistence else 0
        if service.scheduler in _FALLBACK_SCHEDULERS:
            flags |= _SVC_F_SCHED_FALLBACK
        attrs += (
            _attr(_SVC_SCHED_NAME, service.scheduler.encode() + b"\0")
            + _attr(_SVC_FLAGS, struct.pack("=II", flags, 0xFFFF))
            + _u32(_SVC_TIMEOUT, service.persistence)
            + _u32(_SVC_NETMASK, netmask(key.vip.version))
        )
    return attrs


# A real server's attributes, always the same seven: one pack (the hot path
# of a cold sync). Each is (length, type, value) padded to 4 bytes.
_DEST_LAYOUT = {
    version: struct.Struct(f"=HH{size}s HHH2x HH2s2x HHI HHI HHI HHI") for version, size in ((4, 4), (6, 16))
}


def _dest_attrs(server: RealServer) -> bytes:
    addr = server.addr.packed
    return _DEST_LAYOUT[server.addr.version].pack(
        4 + len(addr), _DEST_ADDR, addr,
        6, _DEST_AF, _AF[server.addr.version],
        6, _DEST_PORT, server.port.to_bytes(2, "big"),
        8, _DEST_FWD, FORWARD_CODES[server.forward],
        8, _DEST_WEIGHT, server.weight,
        8, _DEST_U_THRESH, server.upper_threshold,
        8, _DEST_L_THRESH, server.lower_threshold,
    )  # fmt: skip


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def _nest(kind: int, inner: bytes) -> bytes:
    return _attr(kind | _NLA_NESTED, inner)


def _u16(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=H", value))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


# The attributes a reconcile reads of a dumped real server, in the order
# _server_from takes them, and how each unpacks: the address (16 bytes, an
# IPv4 one in its first 4), the port (network order), the rest host order.
_FIXED_FIELDS = {
    _DEST_ADDR: "16s",
    _DEST_PORT: "2s",
    _DEST_FWD: "I",
    _DEST_WEIGHT: "I",
    _DEST_U_THRESH: "I",
    _DEST_L_THRESH: "I",
    _DEST_ACTIVE: "I",
    _DEST_INACTIVE: "I",
    _DEST_AF: "H",
}
_DEST_NEST = 8  # genl header (4) + the CMD_ATTR_DEST nest's header (4)


@dataclass(frozen=True)
class _Layout:
    """Where the replies of one length hold each field: one struct unpacks
    every field with its attribute header (length, type) before it."""

    shape: struct.Struct
    headers: tuple[int, ...]  # each field's attribute length, then each one's type, in offset order
    pick: operator.itemgetter  # the values in _FIXED_FIELDS' order


class DestReader:
    """Reads dumped real servers at the offsets the first reply of each
    length showed: a kernel writes every server's attributes in the same
    order and sizes (ip_vs_genl_fill_dest), so after that first reply a
    server is one ``unpack_from`` instead of two attribute walks. Every
    reply is checked: its length picks the layout, and each field's
    attribute header must be where the layout says. One that differs, one
    of a length without every field, and every read with the counters
    (status, metrics) go through ``server_of``."""

    def __init__(self) -> None:
        self._layouts: dict[int, _Layout | None] = {}
        self.fast = 0  # replies read through a learned layout
        self.generic = 0  # replies read by server_of

    def read(self, payload: bytes, version: int, counters: bool = False) -> tuple[RealServer, ServerStats]:
        if not counters:
            size = len(payload)
            if size not in self._layouts:
                self._layouts[size] = _learn(payload)
            layout = self._layouts[size]
            if layout is not None:
                values = layout.shape.unpack_from(payload)
                if values[0::3] + values[1::3] == layout.headers:
                    self.fast += 1
                    return _server_from(layout.pick(values[2::3]), version)
        self.generic += 1
        return server_of(payload, version, counters)


def _learn(payload: bytes) -> _Layout | None:
    """The layout of a reply, or None if it lacks a field or has one of
    another size (replies of its length are then read by ``server_of``)."""
    at: dict[int, tuple[int, int]] = {}  # attribute -> (offset of its header, its length)
    for kind, offset, length in attributes(payload, _DEST_NEST):
        at.setdefault(kind & NLA_TYPE_MASK, (offset, length))
    if any(k not in at or at[k][1] - 4 != struct.calcsize("=" + f) for k, f in _FIXED_FIELDS.items()):
        return None
    fmt, position, lengths, types, kinds = "=", 0, [], [], []
    for offset, kind in sorted((at[k][0], k) for k in _FIXED_FIELDS):
        fmt += f"{offset - position}xHH{_FIXED_FIELDS[kind]}"
        position = offset + at[kind][1]
        lengths.append(at[kind][1])
        types.append(_NLA_HEADER(payload, offset)[1])
        kinds.append(kind)
    pick = operator.itemgetter(*(kinds.index(k) for k in _FIXED_FIELDS))
    return _Layout(struct.Struct(fmt), tuple(lengths) + tuple(types), pick)


def _server_from(fields: tuple, version: int) -> tuple[RealServer, ServerStats]:
    """What ``server_of`` makes of the same fields, without the counters."""
    addr, port, fwd, weight, upper, lower, active, inactive, af = fields
    version = _VERSION_OF.get(af, version)
    server = RealServer(
        _ip(addr, version),
        int.from_bytes(port, "big"),
        weight=weight,
        forward=_FORWARD_OF.get(fwd & _FWD_MASK, Forward.DR),
        upper_threshold=upper,
        lower_threshold=lower,
    )
    return server, ServerStats(active, inactive)
