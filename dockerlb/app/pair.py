"""A director pair (README, High availability): the kernel's connection-sync
daemons dockerlb keeps running, this director's role, and what a pair's
settings cannot keep (connections across a failover without a floating DIP)."""

from __future__ import annotations

from loguru import logger

from dockerlb.app.passes import Line
from dockerlb.core.desired import Desired
from dockerlb.core.model import IPAddress, parse_ip
from dockerlb.core.ports import DirectorPort, IpvsPort
from dockerlb.core.sync import PairState, plan_daemons, wanted_daemons
from dockerlb.errors import DockerlbError
from dockerlb.settings import Settings


def sync_daemons(settings: Settings, ipvs: IpvsPort) -> list[str]:
    """Start the connection-sync daemons a pair needs, as drift: a daemon
    stopped by hand is put back on the next full pass, and one running in a
    wanted state with another interface or id (someone else's) is replaced,
    said as a warning. Returns what failed (said once while it lasts: only
    full passes come here)."""
    wanted = wanted_daemons(settings.sync_interface, settings.sync_id)
    if not wanted:
        return []
    try:
        running = ipvs.daemons()
    except DockerlbError as e:
        return [f"IPVS sync daemons: cannot read which run: {e}"]
    failing: list[str] = []
    stop, start = plan_daemons(wanted, running)
    blocked: set[str] = set()
    for state in stop:
        replaced = ", ".join(str(d) for d in sorted(running) if d.state == state)
        try:
            ipvs.stop_daemon(state)
        except DockerlbError as e:
            failing.append(f"IPVS sync daemon {replaced}: cannot stop it to start it as set: {e}")
            blocked.add(state)
            continue
        logger.warning("IPVS sync daemon stopped: {} (not as set)", replaced)
    for daemon in start:
        if daemon.state in blocked:
            continue
        try:
            ipvs.start_daemon(daemon)
        except DockerlbError as e:
            failing.append(f"IPVS sync daemon {daemon}: cannot start it: {e}")
            continue
        logger.info("IPVS sync daemon started: {}", daemon)
    return failing


def warnings(settings: Settings, desired: Desired) -> list[Line]:
    """A pair whose NAT services SNAT to, or route via, a director's own address."""
    if not settings.sync_interface or settings.floating_dip:
        return []  # not a pair, or one whose NAT survives a failover (asked first: every pass asks)
    routed = any(p.route_via_director for p in desired.preps.values())
    if not (desired.snat_keys or routed):
        return []
    return [
        Line(
            "WARNING",
            "director pair without --floating-dip: NAT services SNAT to, or route their servers' "
            "replies via, this director's own address, so their connections cannot survive a "
            "failover (and two directors take turns rewriting routed servers' default routes); "
            "set --floating-dip to the pair's floating inside address (README, High availability)",
        )
    ]


def state_of(
    settings: Settings, ipvs: IpvsPort, director: DirectorPort, vips: frozenset[IPAddress]
) -> PairState:
    """The running sync daemons, the wanted ones, and the role (of these
    adapters: the metrics thread passes its own sockets): "active" when one
    of ``vips`` (the director's own, on its dummy interface) or the floating
    DIP is on another interface of the director, where keepalived puts them
    on the VRRP master; "standby" otherwise; "" when no sync is asked."""
    wanted = wanted_daemons(settings.sync_interface, settings.sync_id)
    role = ""
    if wanted:
        floating = {parse_ip(settings.floating_dip)} if settings.floating_dip else set()
        role = "active" if (vips | floating) & director.local_addresses().keys() else "standby"
    return PairState(ipvs.daemons(), wanted, role)
