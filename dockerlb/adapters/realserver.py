"""The real-server adapter: what DR, TUN and routed NAT need inside a real
server's own network namespace, and taking it away again.

A container's namespace is reached through its PID (/proc/PID/ns/net):
netlink sockets opened there (``netns.open_in``) for addresses and routes,
``sysctl`` for /proc/sys. What dockerlb adds carries a mark, so it
is found again after a controller restart (the kernel is the state): its IPv4
addresses have the label ``<ifname>:dlb``, its default route the protocol
number ``RTPROT``.
Sysctls carry no mark: the value each had before is remembered while the
controller runs, and put back when the container stops being a real server.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dockerlb.adapters import sysctl
from dockerlb.adapters.netns import open_in
from dockerlb.core.model import IPAddress, ServerPrep, parse_ip
from dockerlb.errors import NetnsError, RealServerError

MARK = "dlb"
TUNNEL = "tunl0"  # the fallback IP-in-IP device: exists in every namespace once ipip is loaded
# Route protocol of dockerlb's default routes: unused in iproute2's rt_protos
# (/etc/iproute2/rt_protos), so `ip route` shows it as "proto 76".
RTPROT = 76
_MAIN_TABLE = 254
NO_TUNNEL = (
    "there is no tunl0: load the ipip module on the host (modprobe ipip), then every namespace has one"
)
# What the kernel's own IPVS docs ask of a DR/TUN real server: answer ARP only
# for addresses on the asking interface (never for the VIP on lo/tunl0), and
# announce with the interface's own address.
_ARP = {"arp_ignore": "1", "arp_announce": "2"}


def netns_of(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def unreachable(pid: int) -> str | None:
    """Why the controller cannot enter process ``pid``'s namespace, or None."""
    if pid <= 0:
        return "it is not running"
    path = netns_of(pid)
    if not os.path.exists(path):
        return (
            f"{path} is not visible: the controller does not see the host's processes (run it with pid: host)"
        )
    if not os.access(path, os.R_OK):
        return f"{path} is not readable: the controller needs CAP_SYS_ADMIN to enter it"
    return None


class RealServerNetns:
    def __init__(self) -> None:
        # pid -> sysctl name -> its value before dockerlb changed it.
        self._before: dict[int, dict[str, str]] = {}

    def converge(
        self,
        pid: int,
        prep: ServerPrep,
        director: IPAddress | None = None,
        docker_gateway: IPAddress | None = None,
    ) -> list[str]:
        """Make process ``pid``'s namespace hold exactly what ``prep`` asks of
        dockerlb (an empty prep: nothing). ``director`` is where a routed-NAT
        default route points; ``docker_gateway`` where it goes back to.
        Returns what changed, one phrase each, for the log."""
        path = netns_of(pid)
        changes: list[str] = []
        try:
            # The namespace is opened once and every step goes through this
            # descriptor: a PID reused mid-way (the container died, another
            # process got its number) can never receive a later step.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise RealServerError(f"cannot reach {prep.container}'s namespace ({path}): {e}") from e
        ns = f"/proc/self/fd/{fd}"
        try:
            with open_in(ns, IPRoute) as ipr:
                ifname = _ifname_of(ipr, prep.address)
                if prep.tunnel and not ipr.link_lookup(ifname=TUNNEL):
                    raise RealServerError(NO_TUNNEL)
                if prep.loopback or prep.tunnel:
                    self._set_sysctls(pid, ns, _wanted_sysctls(prep, ifname), changes)
                _sync_marked(ipr, "lo", prep.loopback, changes)
                _sync_marked(ipr, TUNNEL, prep.tunnel, changes)
                _sync_route(ipr, ifname, prep, director, docker_gateway, changes)
                if not (prep.loopback or prep.tunnel):
                    self._restore_sysctls(pid, ns, keep=set(), changes=changes)
                elif not prep.tunnel:
                    keep = set(_wanted_sysctls(prep, ifname))
                    self._restore_sysctls(pid, ns, keep=keep, changes=changes)
        except NetlinkError as e:
            raise RealServerError(f"in {prep.container}'s namespace: {e}") from e
        except (NetnsError, OSError) as e:
            raise RealServerError(f"cannot reach {prep.container}'s namespace ({path}): {e}") from e
        finally:
            os.close(fd)
        return changes

    def forget(self, pid: int) -> None:
        """The process is gone, and its namespace with it."""
        self._before.pop(pid, None)

    def _set_sysctls(self, pid: int, ns: str, wanted: dict[str, str], changes: list[str]) -> None:
        before = self._before.setdefault(pid, {})
        for name, value in wanted.items():
            old = sysctl.read(ns, name)
            if old != value:
                before.setdefault(name, old)
                try:
                    sysctl.write(ns, name, value)
                except OSError as e:
                    if e.errno != errno.EROFS:
                        raise
                    raise RealServerError(
                        f"{name} must be {value}, and /proc/sys is read-only for the controller "
                        "(a container without CAP_SYS_ADMIN): set it on the real server "
                        f"(compose sysctls: {name}: {value})"
                    ) from e
                changes.append(f"{name}={value}")

    def _restore_sysctls(self, pid: int, ns: str, keep: set[str], changes: list[str]) -> None:
        before = self._before.get(pid, {})
        for name in [n for n in before if n not in keep]:
            value = before.pop(name)
            try:
                if sysctl.write(ns, name, value):
                    changes.append(f"{name}={value} (as before)")
            except FileNotFoundError:
                pass  # its interface is gone: nothing to put back


def _wanted_sysctls(prep: ServerPrep, ifname: str) -> dict[str, str]:
    wanted = {}
    for dev in ("all", ifname):
        for key, value in _ARP.items():
            wanted[f"net.ipv4.conf.{dev}.{key}"] = value
    if prep.tunnel:
        # Decapsulated packets arrive on tunl0 from a client routed via the
        # other interface: strict reverse-path filtering would drop them.
        for dev in ("all", TUNNEL, ifname):
            wanted[f"net.ipv4.conf.{dev}.rp_filter"] = "0"
    return wanted


def _ifname_of(ipr: IPRoute, addr: IPAddress) -> str:
    for msg in ipr.addr("dump"):
        if msg.get_attr("IFA_ADDRESS") and parse_ip(msg.get_attr("IFA_ADDRESS")) == addr:
            return _name(ipr, msg["index"])
    raise RealServerError(f"no interface has the real server's address {addr}")


def _name(ipr: IPRoute, index: int) -> str:
    return ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME")


def _sync_marked(ipr: IPRoute, ifname: str, wanted: frozenset[IPAddress], changes: list[str]) -> None:
    """The marked addresses on ``ifname`` become exactly ``wanted``."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        if wanted and ifname == TUNNEL:
            raise RealServerError(NO_TUNNEL)
        return
    index = found[0]
    label = f"{ifname}:{MARK}"
    have = {
        parse_ip(m.get_attr("IFA_ADDRESS"))
        for m in ipr.addr("dump", index=index)
        if m.get_attr("IFA_LABEL") == label
    }
    if wanted:
        ipr.link("set", index=index, state="up")
    for vip in sorted(wanted - have, key=str):
        _tolerate(
            errno.EEXIST,
            functools.partial(ipr.addr, "add", index=index, address=str(vip), prefixlen=32, label=label),
        )
        changes.append(f"+{vip}/32 on {ifname}")
    for vip in sorted(have - wanted, key=str):
        _tolerate(
            errno.EADDRNOTAVAIL,
            functools.partial(ipr.addr, "del", index=index, address=str(vip), prefixlen=32),
        )
        changes.append(f"-{vip}/32 on {ifname}")
    if ifname == TUNNEL and have and not wanted:
        ipr.link("set", index=index, state="down")  # it was down before dockerlb raised it
        changes.append(f"{ifname} down")


def _sync_route(
    ipr: IPRoute,
    ifname: str,
    prep: ServerPrep,
    director: IPAddress | None,
    docker_gateway: IPAddress | None,
    changes: list[str],
) -> None:
    family = socket.AF_INET if prep.address.version == 4 else socket.AF_INET6
    dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
    default = [
        m
        for m in ipr.route("dump", family=family)
        if m["dst_len"] == 0 and (m.get_attr("RTA_TABLE") or m["table"]) == _MAIN_TABLE
    ]
    ours = [m for m in default if m["proto"] == RTPROT]
    if prep.route_via_director:
        if director is None:
            raise RealServerError(f"the director has no address towards {prep.address}")
        if any(m.get_attr("RTA_GATEWAY") and parse_ip(m.get_attr("RTA_GATEWAY")) == director for m in ours):
            return
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.route("replace", dst=dst, family=family, gateway=str(director), oif=index, proto=RTPROT)
        changes.append(f"default route via the director {director}")
    elif ours:
        if docker_gateway is not None:
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.route(
                "replace", dst=dst, family=family, gateway=str(docker_gateway), oif=index, proto=3
            )  # "boot", as Docker set it
            changes.append(f"default route via Docker's gateway {docker_gateway} (as before)")
        else:
            ipr.route("del", dst=dst, family=family, proto=RTPROT)
            changes.append("dockerlb's default route removed")


def _tolerate(code: int, call: Callable[[], object]) -> None:
    try:
        call()
    except NetlinkError as e:
        if e.code != code:
            raise
