"""A director pair (docs/ha.md): the sync channel (which
interface, who may send on it), the kernel's connection-sync daemons
dockerlb keeps running, this director's role, and what a pair's settings
cannot keep (connections across a failover without a floating DIP).

The IPVS sync protocol has no authentication: the daemons run on one
interface (--sync-interface, or the one in --sync-network's subnets), and
an nft filter takes sync packets there from the peers alone."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from loguru import logger

from dockerlb.app.passes import Line
from dockerlb.core.desired import Desired
from dockerlb.core.model import DockerNetwork, IPAddress, parse_ip
from dockerlb.core.ports import DirectorPort, DockerPort, IpvsPort
from dockerlb.core.sync import PairState, interfaces_in, plan_daemons, wanted_daemons
from dockerlb.errors import ConfigError, DockerlbError
from dockerlb.settings import Settings


def peers_of(settings: Settings) -> tuple[IPAddress, ...]:
    """The sync settings checked together (a ConfigError naming what is
    wrong); the peers' addresses (--sync-peer)."""
    if settings.sync_interface and settings.sync_network:
        raise ConfigError(
            "--sync-interface and --sync-network both name the sync interface: give one "
            "(--sync-network finds the interface by its Docker network, whatever its name)"
        )
    if settings.sync_peer and not settings.pair:
        raise ConfigError("--sync-peer needs --sync-interface or --sync-network: it filters their packets")
    if settings.pair and not settings.vip_cidr:
        flag = "--sync-interface" if settings.sync_interface else "--sync-network"
        raise ConfigError(
            f"{flag} needs --vip-cidr: in a director pair, addresses on other interfaces "
            "inside the VIP ranges are keepalived's copies of VIPs, so the ranges must be named"
        )
    peers: list[IPAddress] = []
    for text in settings.sync_peer:
        try:
            peers.append(parse_ip(text))
        except ValueError:
            raise ConfigError(f"--sync-peer {text!r}: not an IP address") from None
    return tuple(peers)


def sync_pair(
    settings: Settings,
    peers: tuple[IPAddress, ...],
    networks: Sequence[DockerNetwork],
    docker: DockerPort,
    ipvs: IpvsPort,
    director: DirectorPort,
) -> tuple[str, list[str]]:
    """A full pass's care of the pair's sync channel: find the sync
    interface (by Docker network, with --sync-network), let sync packets
    in there from the peers alone, then keep the daemons running.
    Returns the interface ("" none) and what failed (said once while it
    lasts: only full passes come here). No interface found: no daemon is
    started. The filter comes before the daemons: a backup daemon never
    listens unfiltered when a filter is asked for."""
    if not settings.pair:
        try:
            director.sync_filter("", None)  # a filter left by an earlier pair goes
        except DockerlbError as e:
            return "", [f"IPVS sync filter: {e}"]
        return "", []
    try:
        addresses = director.interfaces()
    except DockerlbError as e:
        return "", [f"IPVS sync: cannot read the director's interfaces: {e}; no sync daemon started"]
    interface, problem = sync_interface_of(settings, networks, addresses)
    if problem:
        return "", [problem]
    failing: list[str] = []
    allowed, problem = _allowed(settings, peers, docker, addresses)
    if problem:
        failing.append(problem)
    else:
        try:
            director.sync_filter(interface, allowed)
        except Exception as e:  # one line while it lasts, never the pass
            why = str(e) if isinstance(e, DockerlbError) else f"unexpected {type(e).__name__}: {e}"
            failing.append(
                f"IPVS sync: {why}; until it works, sync packets on {interface} are taken from anyone"
            )
    return interface, failing + sync_daemons(settings, interface, ipvs)


def _allowed(
    settings: Settings, peers: tuple[IPAddress, ...], docker: DockerPort, own: Mapping[IPAddress, str]
) -> tuple[list[IPAddress] | None, str]:
    """Who may send sync packets: --sync-peer; else, with --sync-network,
    the other containers on that network as Docker lists them now; else
    anyone (None: no filter). With the reason when Docker cannot say."""
    if peers:
        return list(peers), ""
    if not settings.sync_network:
        return None, ""
    try:
        network = docker.network(settings.sync_network)
    except DockerlbError as e:
        network, why = None, str(e)
    else:
        why = "it is gone"
    if network is None:
        return None, (
            f"IPVS sync: cannot read who is on Docker network {settings.sync_network!r} ({why}); the "
            "sync filter stays as it was"
        )
    return [m for m in network.members if m not in own], ""


def sync_daemons(settings: Settings, interface: str, ipvs: IpvsPort) -> list[str]:
    """Start the connection-sync daemons a pair needs on ``interface``, as
    drift: a daemon stopped by hand is put back on the next full pass, and
    one running in a wanted state with another interface or id (someone
    else's) is replaced, said as a warning. Returns what failed."""
    wanted = wanted_daemons(interface, settings.sync_id)
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


def sync_interface_of(
    settings: Settings, networks: Sequence[DockerNetwork], addresses: Mapping[IPAddress, str]
) -> tuple[str, str]:
    """The sync interface (``addresses``: the director's own, address ->
    interface): --sync-interface as given, or the director's interface with
    an address in --sync-network's subnets (Docker's IPAM); with why there
    is none. No side effects."""
    if settings.sync_interface or not settings.sync_network:
        return settings.sync_interface, ""
    name = settings.sync_network
    network = next((n for n in networks if n.name == name), None)
    if network is None:
        return "", f"IPVS sync: Docker has no network {name!r} (--sync-network); no sync daemon started"
    found = interfaces_in(network.subnets, addresses)
    if not found:
        subnets = ", ".join(str(n) for n in network.subnets) or "no subnet"
        return "", (
            f"IPVS sync: the director has no interface in Docker network {name!r} ({subnets}); connect it "
            "to that network; no sync daemon started"
        )
    return found[0], ""


def warnings(settings: Settings, desired: Desired) -> list[Line]:
    """What a pair's settings cannot keep: sync open to anyone on its
    network, and NAT services that SNAT to, or route via, a director's own
    address."""
    lines: list[Line] = []
    if settings.sync_interface and not settings.sync_peer:
        lines.append(
            Line(
                "WARNING",
                f"IPVS sync on {settings.sync_interface} takes connection entries from anyone on that "
                "network (the protocol has no authentication): name the other director with "
                "--sync-peer, or pick the interface with --sync-network, on a network only the "
                "directors join (docs/ha.md)",
            )
        )
    # The pair's settings asked first: every pass asks, and the preps are
    # one a server (10,000 of them at scale).
    if (
        settings.pair
        and not settings.floating_dip
        and (desired.snat_keys or any(p.route_via_director for p in desired.preps.values()))
    ):
        lines.append(
            Line(
                "WARNING",
                "director pair without --floating-dip: NAT services SNAT to, or route their servers' "
                "replies via, this director's own address, so their connections cannot survive a "
                "failover (and two directors take turns rewriting routed servers' default routes); "
                "set --floating-dip to the pair's floating inside address (docs/ha.md)",
            )
        )
    return lines


def state_of(
    settings: Settings,
    interface: str,
    ipvs: IpvsPort,
    director: DirectorPort,
    vips: frozenset[IPAddress],
    docker: DockerPort | None = None,
) -> PairState:
    """The running sync daemons, the wanted ones (on ``interface``, the sync
    interface found: "" none, then found now through ``docker`` if given:
    status runs no pass), and the role (of these adapters: the metrics
    thread passes its own sockets): "active" when one of ``vips`` (the
    director's own, on its dummy interface) or the floating DIP is on
    another interface of the director, where keepalived puts them on the
    VRRP master; "standby" otherwise; "" when no sync is asked."""
    if settings.pair and not interface and docker is not None:
        with contextlib.suppress(DockerlbError):
            interface, _ = sync_interface_of(settings, docker.networks(), director.interfaces())
    wanted = wanted_daemons(interface, settings.sync_id)
    role = ""
    if settings.pair:
        floating = {parse_ip(settings.floating_dip)} if settings.floating_dip else set()
        role = "active" if (vips | floating) & director.local_addresses().keys() else "standby"
    return PairState(ipvs.daemons(), wanted, role)
