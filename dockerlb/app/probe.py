"""`doctor --probe`: real connections along the way to each real server of
each of dockerlb's services, and the first broken step named with its fix
(the steps and their words: dockerlb/core/probe.py).

From the director's namespace, a connection to each real server itself;
inside each DR, TUN or routed-NAT server, what its forwarding needs; and
with ``--probe-from``, connections through the VIP from that client's
namespace until each real server has had one (the director's connection
table says which server each went to). Nothing is changed; a TUN server
gets 8 KiB of zeros on one such connection (its MTU probe).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from dockerlb.adapters import paths
from dockerlb.adapters.director import Director
from dockerlb.adapters.ipvs import IpvsAdapter
from dockerlb.adapters.netns import resolve_netns
from dockerlb.adapters.realserver import unreachable
from dockerlb.core.desired import snatted
from dockerlb.core.labels import parse_labels
from dockerlb.core.model import Check, Container, Forward, IPAddress, Proto, ServiceKey
from dockerlb.core.probe import BULK, Seen, Target, Where, verdict
from dockerlb.errors import DockerlbError, NetnsError
from dockerlb.settings import Settings

TIMEOUT = 2.0  # seconds a probe connection may take
BULK_WAIT = 3.0  # seconds 8 KiB may take to be acknowledged
AT_ONCE = 256  # connections a probe round has open at once (file descriptors)


def probe_checks(
    settings: Settings,
    netns: str | None,
    containers: list[Container],
    probe_from: str,
    pid_of: Callable[[str], int],
) -> list[Check]:
    """One check per real server of each service dockerlb owns."""
    ipvs = IpvsAdapter(netns, settings)
    try:
        snapshot = ipvs.read(counters=False)
    finally:
        ipvs.close()
    director = Director(netns, settings)
    try:
        vips = director.vips()
        keys = sorted((k for k in snapshot.table if k.vip in vips), key=ServiceKey.sort_key)
        if not keys:
            return [
                Check("probe", True, "dockerlb has no service in the director namespace: nothing to probe")
            ]
        targets = _targets(settings, snapshot.table, keys, containers)
        client: str | None = None
        if probe_from:
            try:
                client = resolve_netns(probe_from, pid_of)
            except DockerlbError as e:
                return [
                    Check("probe --probe-from", False, str(e), "name a running container: container:NAME")
                ]
            if client is None:
                client = "/proc/self/ns/net"
        through = _through_vips(netns, client, targets) if client is not None else {}
        by_name = {c.name: c for c in containers}
        where = Where.of_netns(settings.netns)
        return [verdict(_seen(netns, director, t, by_name.get(t.container), through), where) for t in targets]
    finally:
        director.close()


def _targets(settings: Settings, table, keys: list[ServiceKey], containers: list[Container]) -> list[Target]:
    at: dict[IPAddress, tuple[Container, str]] = {
        a: (c, net) for c in containers for net, n in c.networks.items() for a in (n.ipv4, n.ipv6) if a
    }
    out = []
    for key in keys:
        for server in sorted(
            table[key].servers.values(), key=lambda s: (s.addr.version, int(s.addr), s.port)
        ):
            c, network = at.get(server.addr, (None, ""))
            routed = False
            if c is not None and server.forward is Forward.NAT:
                specs = parse_labels(c.name, c.labels, settings.label_prefix).specs
                routed = any(s.key == key and not snatted(s, settings.masquerade) for s in specs)
            out.append(Target(key, server, c.name if c is not None else "", routed, network))
    return out


def _through_vips(
    director: str | None, client: str, targets: list[Target]
) -> dict[tuple[ServiceKey, IPAddress, int], tuple[str, str]]:
    """Connections from the client through each VIP, until each server of
    the service has had one: per server, ("ok" or "failed", and for TUN over
    TCP "ok"/"stalled" for 8 KiB). Two rounds, each opened at once for every
    service and waited for together (paths.connect_all): one connection per
    server (a round-robin or least-connection scheduler gives each its own),
    then, for a service with a server not yet reached, as many again and two
    more (a hashing scheduler's draw). Unanswered connections cost a round's
    one timeout, not one each."""
    seen: dict[tuple[ServiceKey, IPAddress, int], tuple[str, str]] = {}
    services = {
        key: {(t.server.addr, t.server.port): t for t in targets if t.key == key}
        for key in sorted({t.key for t in targets}, key=ServiceKey.sort_key)
        if key.proto is not Proto.UDP
    }
    for extra in (0, 2):
        asks = [
            key
            for key, servers in services.items()
            if not all((key, *s) in seen for s in servers)
            for _ in range(len(servers) + extra)
        ]
        for at in range(0, len(asks), AT_ONCE):
            _probe_round(director, client, asks[at : at + AT_ONCE], services, seen)
    return seen


def _probe_round(
    director: str | None,
    client: str,
    asks: list[ServiceKey],
    services: dict[ServiceKey, dict[tuple[IPAddress, int], Target]],
    seen: dict[tuple[ServiceKey, IPAddress, int], tuple[str, str]],
) -> None:
    """One connection through each VIP of ``asks``, opened at once; each server
    they reached for the first time recorded in ``seen``."""
    conns = paths.connect_all(client, [(k.proto, k.vip, k.port) for k in asks], TIMEOUT)
    try:
        went = paths.ipvs_destinations(director)
        for key, conn in zip(asks, conns, strict=True):
            dest = went.get((key.proto, *conn.local)) if conn.local else None
            servers = services[key]
            if dest is None or dest not in servers or (key, *dest) in seen:
                continue
            bulk = ""
            if (
                conn.sock is not None
                and key.proto is Proto.TCP
                and servers[dest].server.forward is Forward.TUN
            ):
                bulk = "ok" if paths.bulk_acknowledged(conn.sock, BULK, BULK_WAIT) else "stalled"
            seen[(key, *dest)] = ("ok" if conn.result == "ok" else "failed", bulk)
    finally:
        for conn in conns:
            if conn.sock is not None:
                conn.sock.close()


def _seen(
    netns: str | None,
    director: Director,
    t: Target,
    c: Container | None,
    through: dict[tuple[ServiceKey, IPAddress, int], tuple[str, str]],
) -> Seen:
    addr = t.server.addr
    route = paths.route_to(netns, addr)
    direct, neighbour = "skipped", ""
    if route.kind in ("unicast", "local") and t.key.proto is not Proto.UDP:
        conn = paths.connect(netns, t.key.proto, addr, t.server.port, TIMEOUT)
        if conn.sock is not None:
            conn.sock.close()
        direct = conn.result
        if direct != "ok":
            neighbour = paths.neighbour_state(netns, route.hop)
    elif route.kind in ("unicast", "local"):
        direct = "skipped"
    else:
        direct = "unreachable"
    inside, why = None, ""
    needs_inside = (
        t.server.forward is not Forward.NAT or t.routed or direct not in ("ok", "skipped", "unsupported")
    )
    if needs_inside:
        pid = c.pid if c is not None else 0
        why = unreachable(pid) or ""
        if not why:
            try:
                inside = paths.inside(pid, addr)
            except (NetnsError, OSError) as e:
                why = str(e)
    toward = None
    if t.routed:
        with contextlib.suppress(DockerlbError):
            toward = director.address_towards(addr)
    via, bulk = through.get((t.key, addr, t.server.port), ("", ""))
    if through and not via and t.key.proto is not Proto.UDP:
        via = "missed"
    return Seen(t, route, direct, neighbour, inside, why, toward, via, bulk)
