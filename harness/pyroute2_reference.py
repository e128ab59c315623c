"""pyroute2's own IPVS records, the path dockerlb's IPVS adapter used before
it packed its messages itself (dockerlb/adapters/ipvs_wire.py): the reference the
unit tests hold those bytes to, and bench/control_plane.py's per-call path;
and dump replies as the kernel sends them, encoded by pyroute2 (the unit
tests' and bench/resync_host.py's input)."""

from __future__ import annotations

import dataclasses
import socket
import sys
from typing import Any

from pyroute2 import IPVSDest, IPVSService
from pyroute2.netlink.generic import ipvs as genl

from dockerlb.core.model import Forward, Proto, RealServer, ServerStats, Service, ServiceKey, parse_ip

# The kernel's own numbers, written out here from include/uapi/linux/ip_vs.h
# and netinet/in.h, never imported from the product: a wrong constant there
# must fail the tests that hold the product's bytes to these.
_SVC_F_PERSISTENT = 0x0001  # IP_VS_SVC_F_PERSISTENT
# IP_VS_SVC_F_SCHED1: sh-fallback for sh, mh-fallback for mh (ip_vs_sh.c, ip_vs_mh.c).
_SVC_F_SCHED_FALLBACK = 0x0008
_FWD_MASK = 0x0007  # IP_VS_CONN_F_FWD_MASK
FORWARD_CODES = {Forward.NAT: 0, Forward.TUN: 2, Forward.DR: 3}  # IP_VS_CONN_F_MASQ / _TUNNEL / _DROUTE
PROTO_NUMBERS = {Proto.TCP: 6, Proto.UDP: 17, Proto.SCTP: 132}  # IPPROTO_TCP, _UDP, _SCTP
_FWD_BACK = {v: k for k, v in FORWARD_CODES.items()}
_PROTO_BACK = {v: k for k, v in PROTO_NUMBERS.items()}


def netmask(version: int) -> int:
    """IPVS_SVC_ATTR_NETMASK as ipvsadm sends it: all ones for IPv4, the prefix length (128) for IPv6."""
    return 0xFFFFFFFF if version == 4 else 128


def netmask_address(version: int) -> str:
    # pyroute2 types IPVS_SVC_ATTR_NETMASK as an IPv4 address; the kernel
    # reads a host-order u32, so write that u32 as one.
    return socket.inet_ntoa(netmask(version).to_bytes(4, sys.byteorder))


def service_record(service: Service) -> IPVSService:
    key = service.key
    return IPVSService(
        addr=str(key.vip),
        port=key.port,
        protocol=PROTO_NUMBERS[key.proto],
        sched_name=service.scheduler,
        timeout=service.persistence,
        flags={
            "flags": (_SVC_F_PERSISTENT if service.persistence else 0)
            | (_SVC_F_SCHED_FALLBACK if service.scheduler in ("sh", "mh") else 0),
            "mask": 0xFFFF,
        },
        netmask=netmask_address(key.vip.version),
    )


def server_record(server: RealServer) -> IPVSDest:
    return IPVSDest(
        addr=str(server.addr),
        port=server.port,
        fwd_method=FORWARD_CODES[server.forward],
        weight=server.weight,
        u_thresh=server.upper_threshold,
        l_thresh=server.lower_threshold,
    )


def service_from(svc: Any) -> Service | None:
    addr = svc.get_attr("IPVS_SVC_ATTR_ADDR")
    proto = _PROTO_BACK.get(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
    if not addr or proto is None or svc.get_attr("IPVS_SVC_ATTR_FWMARK"):
        return None
    flags = svc.get_attr("IPVS_SVC_ATTR_FLAGS")
    persistent = bool(flags and flags["flags"] & _SVC_F_PERSISTENT)
    return Service(
        ServiceKey(proto, parse_ip(addr), svc.get_attr("IPVS_SVC_ATTR_PORT")),
        scheduler=svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
        persistence=svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") if persistent else 0,
    )


def server_from(dest: Any) -> tuple[RealServer, ServerStats]:
    fwd = dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & _FWD_MASK
    server = RealServer(
        parse_ip(dest.get_attr("IPVS_DEST_ATTR_ADDR")),
        dest.get_attr("IPVS_DEST_ATTR_PORT"),
        weight=dest.get_attr("IPVS_DEST_ATTR_WEIGHT"),
        # LOCALNODE (1) has no label name; report it as what it behaves like.
        forward=_FWD_BACK.get(fwd, Forward.DR),
        upper_threshold=dest.get_attr("IPVS_DEST_ATTR_U_THRESH") or 0,
        lower_threshold=dest.get_attr("IPVS_DEST_ATTR_L_THRESH") or 0,
    )
    stats = stats_from(
        dest.get_attr("IPVS_DEST_ATTR_STATS64"),
        active=dest.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
        inactive=dest.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0,
    )
    return server, stats


# Every ServerStats field but the connection gauges is an IPVS_STATS_ATTR_*.
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(ServerStats) if f.name not in ("active", "inactive"))


def stats_from(s64: Any, active: int = 0, inactive: int = 0) -> ServerStats:
    """IPVS_*_ATTR_STATS64 (the 64-bit counters and estimator rates) as ServerStats."""

    def value(name: str) -> int:
        return int(s64.get_attr(f"IPVS_STATS_ATTR_{name.upper()}") or 0) if s64 is not None else 0

    return ServerStats(active, inactive, **{name: value(name) for name in _STATS_FIELDS})


FAMILY = 0x1C  # any generic netlink family id
COUNTERS = {"CONNS": 42, "INPKTS": 10, "OUTPKTS": 11, "INBYTES": 600, "OUTBYTES": 2**40, "CPS": 3}


def dumped(cmd_attr: str, attrs: list) -> bytes:
    """One part of a dump as the kernel sends it, encoded by pyroute2."""
    msg = genl.ipvsmsg()
    msg["cmd"] = genl.IPVS_CMD_NEW_DEST if cmd_attr.endswith("DEST") else genl.IPVS_CMD_NEW_SERVICE
    msg["version"] = genl.GENL_VERSION
    msg["attrs"] = [(cmd_attr, {"attrs": attrs})]
    msg["header"].update(type=FAMILY, flags=2, sequence_number=9, pid=0)
    msg.encode()
    return msg.data


def stats64(prefix: str) -> tuple:
    return (f"{prefix}STATS64", {"attrs": [(f"IPVS_STATS_ATTR_{k}", v) for k, v in COUNTERS.items()]})
