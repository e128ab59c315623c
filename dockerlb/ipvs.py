"""The IPVS adapter: the only door to the kernel's IPVS table (generic netlink).

Model records go in and come out; pyroute2 records and netlink errors never
leave this module. One socket, opened in the director's namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import os
import re
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPVS, IPVSDest, IPVSService
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.ipvs import GENL_VERSION, IPVS_CMD_GET_CONFIG, IPVS_CMD_SET_CONFIG, ipvsmsg

from dockerlb.errors import IpvsBusy, IpvsExists, IpvsNotFound, IpvsRejected, IpvsUnavailable
from dockerlb.model import (
    SCHEDULERS,
    Forward,
    IPAddress,
    Proto,
    RealServer,
    ServerStats,
    Service,
    ServiceKey,
    Snapshot,
    VirtualService,
    parse_ip,
)
from dockerlb.retry import retrying
from dockerlb.settings import Settings

T = TypeVar("T")

# include/uapi/linux/ip_vs.h
_FWD = {Forward.NAT: 0, Forward.TUN: 2, Forward.DR: 3}  # IP_VS_CONN_F_MASQ/TUNNEL/DROUTE
_FWD_BACK = {v: k for k, v in _FWD.items()}
_FWD_MASK = 0x0007
_SVC_F_PERSISTENT = 0x0001
_PROTO = {Proto.TCP: socket.IPPROTO_TCP, Proto.UDP: socket.IPPROTO_UDP}
_PROTO_BACK = {v: k for k, v in _PROTO.items()}
_TIMEOUTS = ("TCP", "TCP_FIN", "UDP")
_BUSY = {errno.EAGAIN, errno.ENOBUFS, errno.EINTR, errno.EBUSY}


class IpvsAdapter:
    def __init__(self, netns_path: str | None, settings: Settings) -> None:
        self._settings = settings
        self._netns = netns_path
        try:
            # flags=0: never let pyroute2 create a namespace that is not there.
            self._sock = IPVS(netns=netns_path, flags=0) if netns_path else IPVS()
        except NetlinkError as e:
            raise IpvsUnavailable(f"no IPVS in this kernel: {missing_ipvs_fix()}") from e
        except OSError as e:
            raise IpvsUnavailable(f"cannot open IPVS in namespace {netns_path}: {e}") from e

    def close(self) -> None:
        self._sock.close()

    # -- reading -----------------------------------------------------------
    def read(self) -> Snapshot:
        table: dict[ServiceKey, VirtualService] = {}
        stats: dict[tuple[ServiceKey, tuple[IPAddress, int]], ServerStats] = {}
        service_stats: dict[ServiceKey, ServerStats] = {}
        for msg in self._call(lambda: list(self._sock.service("dump"))):
            svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            service = _service_from(svc)
            if service is None:
                continue  # fwmark services have no VIP; never ours, nothing to show
            key = service.key
            service_stats[key] = _stats_from(svc.get_attr("IPVS_SVC_ATTR_STATS64"))
            servers = []
            query = _service_record(service)
            for dmsg in self._call(lambda q=query: list(self._sock.dest("dump", service=q))):
                server, counters = _server_from(dmsg.get_attr("IPVS_CMD_ATTR_DEST"))
                servers.append(server)
                stats[(key, server.ident)] = counters
            table[key] = VirtualService.of(service, servers)
        return Snapshot(table, stats, service_stats)

    # -- connection timeouts (ipvsadm --set) ---------------------------------
    def timeouts(self) -> tuple[int, int, int]:
        """The namespace's (tcp, tcpfin, udp) connection timeouts, seconds."""
        (reply,) = self._call(lambda: self._config(IPVS_CMD_GET_CONFIG, NLM_F_REQUEST))
        return tuple(_u32_of(reply.get_attr(f"IPVS_CMD_ATTR_TIMEOUT_{n}")) for n in _TIMEOUTS)  # type: ignore[return-value]

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        """Set them (0 leaves one as it is, as with ipvsadm --set)."""
        self._call(lambda: self._config(IPVS_CMD_SET_CONFIG, NLM_F_REQUEST | NLM_F_ACK, (tcp, tcpfin, udp)))

    def _config(self, cmd: int, flags: int, values: tuple[int, int, int] | None = None) -> list[Any]:
        # pyroute2's IPVS class has no call for the CONFIG commands: send the
        # message through its socket the way its own service() does. It types
        # the timeout attributes as raw bytes; the kernel reads u32s.
        msg = ipvsmsg()
        msg["cmd"] = cmd
        msg["version"] = GENL_VERSION
        if values is not None:
            msg["attrs"] = [
                (f"IPVS_CMD_ATTR_TIMEOUT_{n}", struct.pack("=I", v))
                for n, v in zip(_TIMEOUTS, values, strict=True)
            ]
        sock = self._sock
        return list(sock._run_with_cleanup(sock.asyncore._do_request, msg, flags))

    # -- writing -----------------------------------------------------------
    def add_service(self, service: Service) -> None:
        with _scheduler_named(service):
            self._call(lambda: self._sock.service("add", service=_service_record(service)))

    def edit_service(self, service: Service) -> None:
        with _scheduler_named(service):
            self._call(lambda: self._sock.service("set", service=_service_record(service)))

    def remove_service(self, service: Service) -> None:
        self._call(lambda: self._sock.service("del", service=_service_record(service)))

    def add_server(self, key: ServiceKey, server: RealServer) -> None:
        self._dest("add", key, server)

    def edit_server(self, key: ServiceKey, server: RealServer) -> None:
        self._dest("set", key, server)

    def remove_server(self, key: ServiceKey, server: RealServer) -> None:
        self._dest("del", key, server)

    def _dest(self, command: str, key: ServiceKey, server: RealServer) -> None:
        svc = _service_record(Service(key))
        dest = IPVSDest(
            addr=str(server.addr),
            port=server.port,
            fwd_method=_FWD[server.forward],
            weight=server.weight,
        )
        self._call(lambda: self._sock.dest(command, service=svc, dest=dest))

    def _call(self, fn: Callable[[], T]) -> T:
        for attempt in retrying(self._settings):
            with attempt:
                try:
                    return fn()
                except NetlinkError as e:
                    raise _translate(e) from e
        raise AssertionError("unreachable: tenacity reraises")


def missing_ipvs_fix() -> str:
    """What to do when the kernel's IPVS netlink family does not answer."""
    release = os.uname().release
    if "# CONFIG_IP_VS is not set" in _kernel_config(release):
        return (
            f"kernel {release} is built without IPVS (CONFIG_IP_VS is not set); boot a kernel that has "
            "it, e.g. Debian's linux-image-amd64, or run dockerlb on a host that does"
        )
    return "load the module on the host: modprobe ip_vs (a container cannot load kernel modules)"


@contextlib.contextmanager
def _scheduler_named(service: Service):
    """ENOENT on a service's creation or change means its scheduler is not in
    this kernel: say which ones it has."""
    try:
        yield
    except IpvsNotFound as e:
        have = available_schedulers()
        listed = ", ".join(sorted(have)) if have else "none found in /lib/modules or /proc/modules"
        raise IpvsRejected(
            f"scheduler {service.scheduler!r} is not in this kernel (it has: {listed}); "
            "pick one of those in dockerlb.scheduler"
        ) from e


def available_schedulers(release: str | None = None) -> frozenset[str]:
    """The IPVS schedulers this kernel has: built in, as modules, or loaded.

    A container sees no /lib/modules, only /proc/modules (the loaded ones)."""
    release = release or os.uname().release
    text = ""
    for path in (
        f"/lib/modules/{release}/modules.dep",
        f"/lib/modules/{release}/modules.builtin",
        "/proc/modules",
    ):
        with contextlib.suppress(OSError):
            text += Path(path).read_text() + "\n"
    return schedulers_in(text)


def schedulers_in(text: str) -> frozenset[str]:
    """Scheduler names in modules.dep / modules.builtin / /proc/modules text."""
    found = set(re.findall(r"(?:^|/)ip_vs_([a-z]+)(?:\.ko|\s)", text, re.M))
    return frozenset(found & SCHEDULERS)


def _kernel_config(release: str) -> str:
    with contextlib.suppress(OSError), gzip.open("/proc/config.gz", "rt") as f:
        return f.read()
    with contextlib.suppress(OSError):
        return Path(f"/boot/config-{release}").read_text()
    return ""


def _translate(e: NetlinkError) -> Exception:
    name = errno.errorcode.get(e.code, str(e.code))
    if e.code == errno.EEXIST:
        return IpvsExists(f"IPVS: already exists ({name})")
    if e.code in (errno.ENOENT, errno.ESRCH):
        return IpvsNotFound(f"IPVS: not found ({name}; for a new service: is the scheduler available?)")
    if e.code in _BUSY:
        return IpvsBusy(f"IPVS busy ({name})")
    if e.code == errno.EPERM:
        return IpvsRejected("IPVS: operation not permitted (the controller needs CAP_NET_ADMIN)")
    return IpvsRejected(f"IPVS rejected the request ({name}: {e})")


def _u32_of(value: Any) -> int:
    """A timeout attribute as pyroute2 decodes it ("84:03:00:00") -> int."""
    if isinstance(value, str):
        value = bytes.fromhex(value.replace(":", ""))
    return struct.unpack("=I", value)[0] if value else 0


def _netmask(version: int) -> str:
    # The kernel reads IPVS_SVC_ATTR_NETMASK as a host-order u32: all ones for
    # IPv4, a prefix length (128) for IPv6. pyroute2 types it as an IPv4
    # address, so write those u32 values as one.
    value = 0xFFFFFFFF if version == 4 else 128
    return socket.inet_ntoa(value.to_bytes(4, sys.byteorder))


def _service_record(service: Service) -> IPVSService:
    key = service.key
    return IPVSService(
        addr=str(key.vip),
        port=key.port,
        protocol=_PROTO[key.proto],
        sched_name=service.scheduler,
        timeout=service.persistence,
        flags={"flags": _SVC_F_PERSISTENT if service.persistence else 0, "mask": 0xFFFF},
        netmask=_netmask(key.vip.version),
    )


def _service_from(svc: Any) -> Service | None:
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


def _server_from(dest: Any) -> tuple[RealServer, ServerStats]:
    fwd = dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & _FWD_MASK
    server = RealServer(
        parse_ip(dest.get_attr("IPVS_DEST_ATTR_ADDR")),
        dest.get_attr("IPVS_DEST_ATTR_PORT"),
        weight=dest.get_attr("IPVS_DEST_ATTR_WEIGHT"),
        # LOCALNODE (1) has no label name; report it as what it behaves like.
        forward=_FWD_BACK.get(fwd, Forward.DR),
    )
    stats = _stats_from(
        dest.get_attr("IPVS_DEST_ATTR_STATS64"),
        active=dest.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
        inactive=dest.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0,
    )
    return server, stats


# Every ServerStats field but the connection gauges is an IPVS_STATS_ATTR_*.
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(ServerStats) if f.name not in ("active", "inactive"))


def _stats_from(s64: Any, active: int = 0, inactive: int = 0) -> ServerStats:
    """IPVS_*_ATTR_STATS64 (the 64-bit counters and estimator rates) as ServerStats."""

    def value(name: str) -> int:
        return int(s64.get_attr(f"IPVS_STATS_ATTR_{name.upper()}") or 0) if s64 is not None else 0

    return ServerStats(active, inactive, **{name: value(name) for name in _STATS_FIELDS})
