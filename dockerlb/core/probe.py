"""`doctor --probe`: what was seen on the way to one real server, and which
step of that way is broken, with the exact fix. Pure: the facts come in
(app/probe.py gathers them with real connections and reads of the
director's and the server's namespaces), one ``Check`` comes out.

The steps, in the order a packet takes them (the first broken one is named):

1. route: the director has a usable route to the server's address;
2. ARP: the next hop answers ARP on the director's interface (a direct
   connection from the director that gets no answer, its neighbour entry
   FAILED or INCOMPLETE); a refused connection means nothing listens;
3. inside the server: DR needs the VIP on ``lo``, TUN on ``tunl0`` (up),
   both the ARP sysctls (never answering ARP for the VIP), TUN
   ``rp_filter`` 0 on ``tunl0`` (decapsulated packets come from clients
   routed elsewhere), routed NAT the default route via the director;
4. through the VIP, from a client (``--probe-from``): the connection the
   director sent to this server is answered; for TUN, 8 KiB sent on it one
   full-size segment at a time are acknowledged (tunnelled packets are 20
   bytes longer: a full-size one needs "fragmentation needed" to reach the
   client, or IPVS to fragment).
"""

from __future__ import annotations

from dataclasses import dataclass

from dockerlb.core.model import Check, Forward, IPAddress, RealServer, ServiceKey

ROUTE, LISTEN, ARP, NO_ANSWER = "route", "listen", "ARP", "no answer"
VIP_ON_LO, VIP_ON_TUNL0, RP_FILTER = "VIP missing on lo", "VIP missing on tunl0", "rp_filter"
RETURN_PATH, MTU, THROUGH_VIP = "return path of routed NAT", "MTU over IP-in-IP", "through the VIP"
IPIP_OVERHEAD = 20
BULK = 8192  # bytes a client sends through the VIP to a TUN server


@dataclass(frozen=True)
class Target:
    """One real server of one service, and who stands behind it."""

    key: ServiceKey
    server: RealServer
    container: str  # "" when no labelled container has its address
    routed: bool = False  # NAT keeping the client's address (masquerade=false)
    network: str = ""  # the Docker network its address is on


@dataclass(frozen=True)
class Route:
    """The director's route to the server, as `ip route get` resolves it."""

    kind: str  # "unicast", "local"; "unreachable", "blackhole", "prohibit"; "none" (no route at all)
    prefix: str = ""  # the route that matched, for a kind other than unicast (e.g. 172.30.32.5/32)
    ifname: str = ""  # the director's interface towards it
    hop: str = ""  # the next hop: the gateway, or the server itself on-link
    mtu: int = 0  # that interface's MTU


@dataclass(frozen=True)
class Inside:
    """The real server's own namespace, as read there."""

    ifname: str  # its interface with the real server's address
    noarp: bool  # that interface has ARP off
    arp_ignore: int  # effective on it: the larger of all's and its own
    arp_announce: int
    lo: frozenset[IPAddress]
    tunnel: frozenset[IPAddress] | None  # on tunl0; None: no tunl0 (no ipip)
    tunnel_up: bool
    rp_filter: int  # effective on tunl0: the larger of all's and tunl0's
    gateway: IPAddress | None  # its default route's gateway


@dataclass(frozen=True)
class Seen:
    """Everything one probe saw of one target."""

    target: Target
    route: Route
    direct: str  # "ok", "refused", "timeout", "unreachable", "skipped" (UDP: no handshake),
    # "unsupported" (this kernel opens no SCTP socket: nothing to connect with)
    neighbour: str = ""  # the next hop's neighbour state after a failed direct connection
    inside: Inside | None = None
    inside_why: str = ""  # why the server's namespace could not be read
    director_address: IPAddress | None = None  # where a routed server's default route must point
    via_vip: str = ""  # "": no client; "ok"; "failed"; "missed" (no client connection landed on it)
    bulk: str = ""  # "": not tried; "ok"; "stalled"


@dataclass(frozen=True)
class Where:
    """How to run a command in the director's namespace and a container's."""

    director: str = ""  # a command prefix ("" for the own namespace), e.g. "ip netns exec lb "
    director_container: str = ""  # the director's container, when it is one

    @staticmethod
    def of_netns(spec: str) -> Where:
        spec = spec.strip()
        if spec.startswith("container:"):
            name = spec.removeprefix("container:")
            return Where(in_container(name, ""), name)
        if not spec or spec in ("self", "own"):
            return Where()
        if "/" in spec:
            return Where(f"nsenter --net={spec} ")
        return Where(f"ip netns exec {spec} ")


def in_container(container: str, command: str) -> str:
    """A command that runs ``command`` in a container's network namespace, from the host."""
    return f"nsenter -n -t $(docker inspect -f '{{{{.State.Pid}}}}' {container}) {command}"


def probe_name(t: Target) -> str:
    who = f" ({t.container})" if t.container else ""
    return f"probe {t.key} -> {t.server} {t.server.forward}{who}"


def verdict(seen: Seen, where: Where) -> Check:
    """The probe as one check: the first broken step, or what passed."""
    t = seen.target
    broken = (
        _route(seen, where)
        or _direct(seen, where)
        or _inside(seen)
        or _through_vip(seen, where)
    )  # fmt: skip
    if broken is not None:
        step, why, fix = broken
        return Check(probe_name(t), False, f"{step}: {why}", fix)
    return Check(probe_name(t), True, _passed(seen))


def _passed(seen: Seen) -> str:
    t, said = seen.target, []
    if seen.direct == "ok":
        said.append(f"the director connects to {t.server} ({seen.route.ifname})")
    elif seen.direct == "skipped":
        said.append(
            f"route via {seen.route.ifname}; {t.key.proto.upper()} has no handshake to prove the rest"
        )
    if seen.inside is not None:
        said.append(
            {
                Forward.DR: "VIP on lo, ARP sysctls",
                Forward.TUN: "VIP on tunl0, rp_filter 0, ARP sysctls",
                Forward.NAT: "default route via the director",
            }[t.server.forward]
        )
    if seen.via_vip == "ok":
        said.append(
            "a client's connection through the VIP answered" + (", 8 KiB acknowledged" if seen.bulk else "")
        )
    elif seen.via_vip == "missed":
        said.append(
            "no client connection through the VIP landed on it "
            "(persistence, weight 0, or at its upper threshold)"
        )
    return "; ".join(said)


Broken = tuple[str, str, str] | None


def _route(seen: Seen, where: Where) -> Broken:
    r, addr = seen.route, seen.target.server.addr
    if r.kind in ("unicast", "local"):
        return None
    if r.kind == "none":
        fix = (
            f"docker network connect {seen.target.network} {where.director_container}"
            if where.director_container and seen.target.network
            else where.director + f"ip route add {addr} via <a gateway that reaches it>"
        )
        return ROUTE, f"the director has no route to {addr}", fix
    return (
        ROUTE,
        f"the director's route to {addr} is {r.kind} ({r.kind} {r.prefix})",
        where.director + f"ip route del {r.kind} {r.prefix}",
    )


def _direct(seen: Seen, where: Where) -> Broken:
    t, r = seen.target, seen.route
    if seen.direct in ("ok", "skipped", "unsupported"):
        return None
    endpoint = f"{t.server}"
    if seen.direct == "refused":
        return (
            LISTEN,
            f"nothing listens on {endpoint} (connection refused)",
            f"make the server in {t.container or 'it'} listen on port {t.server.port} "
            "(on all its addresses), or set the label dockerlb.port to the port it listens on",
        )
    if seen.neighbour in ("FAILED", "INCOMPLETE", "NONE"):
        why = f"{r.hop} does not answer ARP on the director's {r.ifname} (neighbour {seen.neighbour})"
        inside = seen.inside
        if inside is not None and inside.noarp:
            fix = in_container(t.container, f"ip link set dev {inside.ifname} arp on")
        elif inside is not None and inside.arp_ignore == 8:
            fix = in_container(
                t.container,
                f"sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.{inside.ifname}.arp_ignore=1",
            )
        else:
            fix = (
                f"{r.hop} must be on the director's link {r.ifname} and answer ARP there: "
                "no arp_ignore=8, ARP on (ip link), the same L2 network"
            )
        return ARP, why, fix
    return (
        NO_ANSWER,
        f"{endpoint} does not answer the director ({seen.direct}) though ARP resolves it: "
        "something drops the packets",
        f"look for a firewall in {t.container or 'the server'} or on the host dropping port {t.server.port}",
    )


def _inside(seen: Seen) -> Broken:
    t, inside = seen.target, seen.inside
    forward, vip, c = t.server.forward, t.key.vip, t.container
    needs = forward is not Forward.NAT or t.routed
    if not needs:
        return None
    if inside is None:
        if seen.via_vip in ("ok", ""):
            return None  # cannot look inside; a client's connection is the proof there is
        return (
            THROUGH_VIP,
            f"a client's connection through the VIP sent to it got no answer, and its namespace "
            f"cannot be read: {seen.inside_why}",
            "run doctor where it can enter real servers (the host, or pid: host with CAP_SYS_ADMIN)",
        )
    if forward is Forward.DR and vip not in inside.lo:
        return (
            VIP_ON_LO,
            f"{c} has no {vip}/32 on lo: it drops what the director sends it",
            in_container(c, f"ip addr add {vip}/32 dev lo label lo:dlb")
            + "  # `dockerlb run` puts it there at its next pass when it can enter the container",
        )
    if forward is Forward.TUN:
        if inside.tunnel is None:
            return VIP_ON_TUNL0, f"{c} has no tunl0 (no ipip module)", "modprobe ipip  # on the host"
        if vip not in inside.tunnel or not inside.tunnel_up:
            state = "has no" if vip not in inside.tunnel else "has its tunl0 down, with"
            return (
                VIP_ON_TUNL0,
                f"{c} {state} {vip}/32 on tunl0: it drops the director's IP-in-IP packets",
                in_container(c, f"ip addr add {vip}/32 dev tunl0 label tunl0:dlb")
                + " && "
                + in_container(c, "ip link set tunl0 up"),
            )
        if inside.rp_filter == 1:
            return (
                RP_FILTER,
                f"{c} has strict reverse-path filtering on tunl0 (rp_filter 1, the larger of all's and "
                "tunl0's): decapsulated packets from clients, whose route is not via tunl0, are dropped",
                in_container(c, "sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.tunl0.rp_filter=0"),
            )
    if forward in (Forward.DR, Forward.TUN) and (inside.arp_ignore < 1 or inside.arp_announce < 2):
        return (
            ARP,
            f"{c} would answer ARP for {vip} (arp_ignore {inside.arp_ignore}, arp_announce "
            f"{inside.arp_announce} on {inside.ifname}): clients on its network would bypass the director",
            in_container(
                c,
                "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 "
                f"net.ipv4.conf.{inside.ifname}.arp_ignore=1 net.ipv4.conf.{inside.ifname}.arp_announce=2",
            ),
        )
    if forward is Forward.NAT and t.routed and inside.gateway != seen.director_address:
        via = f"via {inside.gateway}" if inside.gateway is not None else "missing"
        return (
            RETURN_PATH,
            f"{c}'s default route is {via}, not via the director ({seen.director_address}): its "
            "replies to clients skip the director and are never translated back",
            in_container(
                c, f"ip route replace default via {seen.director_address} dev {inside.ifname} proto 76"
            )
            + "  # `dockerlb run` sets it at its next pass; or label the service dockerlb.masquerade=true",
        )
    return None


def _through_vip(seen: Seen, where: Where) -> Broken:
    t = seen.target
    if seen.via_vip == "failed":
        return (
            THROUGH_VIP,
            f"a client's connection through {t.key.vip}:{t.key.port} sent to {t.server} got no answer, "
            "though every step the director can see passed",
            "look for a firewall between the client and the director, or on the way back from the server",
        )
    if seen.bulk == "stalled":
        r = seen.route
        room = r.mtu - IPIP_OVERHEAD if r.mtu else 0
        return (
            MTU,
            f"{BULK} bytes a client sent through the VIP, a full-size segment at a time, were not "
            "acknowledged: the director reaches "
            f"{t.server.addr} through {r.ifname} (MTU {r.mtu}), so a tunnelled packet may carry "
            f"{room} bytes, and the 'fragmentation needed' answers for larger ones never reach the client",
            where.director
            + "sysctl -w net.ipv4.vs.pmtu_disc=0  # IPVS then fragments what does not fit the tunnel; "
            f"or clamp the MSS in {t.container}: "
            + in_container(
                t.container,
                "iptables -t mangle -A OUTPUT -p tcp --tcp-flags SYN,RST SYN "
                f"-j TCPMSS --set-mss {room - 40}",
            ),
        )
    return None
