"""`dockerlb doctor`: can this controller do its job here, and if not, the exact fix.

Each check looks, changes nothing, and says pass or fail with a fix. A check
is *required* when a configured feature needs it (masquerade on, a label
asking for dr or tun); only a failing required check fails the doctor.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from dockerlb.adapters.announce import BirdSpeaker, RouteTable
from dockerlb.adapters.director import ARP_SYSCTLS, Director, ipvs_sysctls
from dockerlb.adapters.ipvs import IpvsAdapter, missing_ipvs_fix
from dockerlb.adapters.netns import resolve_netns
from dockerlb.adapters.realserver import unreachable
from dockerlb.adapters.sources import Source, open_source
from dockerlb.adapters.sysctl import sysctl_path
from dockerlb.app.pair import sync_interface_of
from dockerlb.app.probe import probe_checks
from dockerlb.core.announce import SpeakerState
from dockerlb.core.desired import VipPolicy
from dockerlb.core.labels import parse_labels
from dockerlb.core.model import Check, Container, Forward, addr_order
from dockerlb.core.sync import wanted_daemons
from dockerlb.errors import DockerlbError, IpvsUnavailable, NetnsError
from dockerlb.settings import Settings

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CHAIN_LIMIT = 8  # connections per IPVS hash bucket before doctor asks for a bigger table
CAP_FIX = "give the controller CAP_NET_ADMIN: docker run --cap-add NET_ADMIN, or compose cap_add: [NET_ADMIN]"


class _Failed(Exception):
    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.fix = fix


def run_checks(settings: Settings, probe: bool = False, probe_from: str = "") -> list[Check]:
    """Every check, in the order an operator would fix things; with
    ``probe``, then real connections to each real server (app/probe.py),
    and through each VIP from ``probe_from``'s namespace when given."""
    checks: list[Check] = []

    def check(name: str, fn: Callable[[], str], required: bool = True) -> bool:
        try:
            checks.append(Check(name, True, fn(), required=required))
            return True
        except _Failed as e:
            checks.append(Check(name, False, str(e), e.fix, required))
        except (DockerlbError, OSError) as e:
            checks.append(Check(name, False, str(e), "see the detail", required))
        return False

    check("CAP_NET_ADMIN", _net_admin)
    docker: list[Source] = []
    check("Docker engine", lambda: _docker(settings, docker))
    source = docker[0] if docker else None
    containers = _labelled(source)

    path: list[str | None] = []
    if not check("director namespace", lambda: _namespace(settings, source, path)):
        return checks
    netns = path[0]
    connections: list[int] = []
    has_ipvs = check("IPVS in the kernel", lambda: _ipvs(netns, settings, connections))
    if has_ipvs:
        check("IPVS connection table", lambda: _conn_table(connections[0], conn_table_size()), required=False)
    users = {f: _users(containers, settings, f) for f in (Forward.DR, Forward.TUN)}
    with _director(netns, settings) as director:
        check("sysctl net.ipv4.ip_forward", lambda: _sysctl(director, "net.ipv4.ip_forward"))
        # `run` refuses to start without these (a director answering ARP for its VIPs).
        for name, value in ARP_SYSCTLS.items():
            check(f"sysctl {name}", functools.partial(_sysctl, director, name, value))
        masq = settings.masquerade
        if has_ipvs:  # the vs.* sysctls exist only once ip_vs is loaded
            check("sysctl net.ipv4.vs.conntrack", lambda: _sysctl(director, "net.ipv4.vs.conntrack"), masq)
            # Draining and restarts rely on these; `run` only warns without them.
            for name, value in ipvs_sysctls(settings.conn_reuse_mode).items():
                check(f"sysctl {name}", functools.partial(_sysctl, director, name, value), required=False)
        check("masquerade (nftables)", lambda: _nft(director), masq)
        if settings.announce and has_ipvs:
            check("sysctl net.ipv4.vs.sloppy_tcp", lambda: _sloppy(director), required=False)
        if settings.pair and has_ipvs:
            check("director pair: sync daemons", lambda: _sync(netns, settings, director, source))
        if settings.pair:
            check("director pair: sync channel", lambda: _sync_channel(settings), required=False)
        for forward, who in users.items():
            check(
                f"forward={forward}: real-server namespaces",
                functools.partial(_real_servers, forward, who, containers),
                bool(who),
            )
    check("ipip module for forward=tun", _ipip, bool(users[Forward.TUN]))
    if settings.announce:
        check("announce: routing table", lambda: _announce_table(netns, settings))
        speaker = BirdSpeaker(settings.speaker_socket).state()
        if check("announce: BGP speaker", lambda: _speaker(speaker, settings)):
            check("announce: BGP sessions", lambda: _sessions(speaker))

    check("VIP allow-list (--vip-cidr)", lambda: _vip_allow_list(containers, settings), required=False)
    checked = _checked(containers, settings)
    check("health checks (dockerlb.check)", lambda: _health_checks(checked, netns), bool(checked and netns))
    if (probe or probe_from) and has_ipvs:
        try:
            checks += probe_checks(settings, netns, containers, probe_from, _pid_of(source))
        except (DockerlbError, OSError) as e:
            checks.append(Check("probe", False, f"could not probe: {e}", "see the detail"))
    return checks


def _announce_table(netns: str | None, settings: Settings) -> str:
    table = RouteTable(netns, settings)
    try:
        routes = table.routes()
    finally:
        table.close()
    shown = ", ".join(str(r.vip) for r in sorted(routes, key=lambda r: addr_order(r.vip))) or "none"
    return (
        f"table {settings.announce_table}, proto {settings.announce_proto}: {len(routes)} VIP(s) announced "
        f"now ({shown})"
    )


def _sloppy(director: Director) -> str:
    name = "net.ipv4.vs.sloppy_tcp"
    if director.read_sysctl(name) == "1":
        return f"{name}=1: a connection the network moves here mid-way is taken (with mh or sync)"
    raise _Failed(
        f"{name}=0: a connection moved here from another director mid-way is dropped",
        f"for active-active directors set it: compose sysctls: [{name}=1] (docs/several-hosts.md)",
    )


def _speaker(speaker: SpeakerState, settings: Settings) -> str:
    if speaker.error:
        raise _Failed(
            speaker.error,
            "run BIRD 2 in the director's network namespace (compose/bgp: the bird sidecar) with its "
            f"control socket at {settings.speaker_socket} shared with dockerlb (--speaker-socket), and a "
            f"`protocol kernel` that learns table {settings.announce_table}",
        )
    return f"{speaker.version} answers on {settings.speaker_socket}"


def _sessions(speaker: SpeakerState) -> str:
    if not speaker.sessions:
        raise _Failed(
            "the speaker has no BGP session", "add a `protocol bgp` towards the router to BIRD's config"
        )
    down = [s for s in speaker.sessions if not s.established]
    if down:
        raise _Failed(
            "not established: " + ", ".join(f"{s.name} ({s.info or s.state})" for s in down),
            "check the peer's address and AS on both sides, and that the router accepts this director",
        )
    return "established: " + ", ".join(s.name for s in speaker.sessions)


def _pid_of(source: Source | None) -> Callable[[str], int]:
    def pid_of(name: str) -> int:
        if source is None:
            raise NetnsError(f"container:{name}: the Docker engine does not answer")
        return source.pid_of(name)

    return pid_of


def _net_admin() -> str:
    if _has_cap(CAP_NET_ADMIN):
        return "the controller has CAP_NET_ADMIN"
    raise _Failed("the controller lacks CAP_NET_ADMIN (IPVS and interfaces need it)", CAP_FIX)


def _has_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _docker(settings: Settings, out: list[Source]) -> str:
    fix = (
        "mount the socket (-v /var/run/docker.sock:/var/run/docker.sock) or set DOCKER_HOST; "
        "is dockerd running?" + (" With --swarm, it must be a Swarm manager's." if settings.swarm else "")
    )
    manager = " as a Swarm manager" if settings.swarm else ""
    try:
        source = open_source(settings)
        source.ping()
        if settings.swarm:
            source.list_containers()  # /services and /tasks: only a manager answers them
    except DockerlbError as e:
        raise _Failed(f"the Docker engine does not answer{manager}: {e}", fix) from e
    out.append(source)
    return f"answers{manager}; API version {source.api_version} (negotiated)"


def _labelled(source: Source | None) -> list[Container]:
    if source is None:
        return []
    with contextlib.suppress(DockerlbError):
        # Every one inspected: the checks below need their PIDs.
        return source.list_containers(detailed=lambda c: True)
    return []


def _namespace(settings: Settings, source: Source | None, out: list[str | None]) -> str:
    fix = (
        "set --netns to '' (run in the director's namespace, e.g. network_mode: service:director), "
        "an `ip netns` name, a path, or container:NAME (then also pid: host)"
    )

    def pid_of(name: str) -> int:
        if source is None:
            raise _Failed(f"--netns {settings.netns}: needs the Docker engine to find the container", fix)
        return source.pid_of(name)

    try:
        path = resolve_netns(settings.netns, pid_of)
    except DockerlbError as e:
        raise _Failed(str(e), fix) from e
    out.append(path)
    where = path or "the controller's own namespace"
    return f"--netns {settings.netns!r}: {where}"


def _ipvs(netns: str | None, settings: Settings, connections: list[int]) -> str:
    try:
        adapter = IpvsAdapter(netns, settings)
        try:
            snapshot = adapter.read(counters=False)  # the connection gauges suffice
        finally:
            adapter.close()
    except IpvsUnavailable as e:
        raise _Failed("the kernel's IPVS does not answer (no ip_vs loaded)", missing_ipvs_fix()) from e
    connections.append(sum(s.active + s.inactive for s in snapshot.stats.values()))
    version = Path("/proc/net/ip_vs").read_text().splitlines()[0] if Path("/proc/net/ip_vs").exists() else ""
    return f"{version or 'IPVS answers'}; {len(snapshot.table)} service(s) in the director namespace"


def _conn_table(connections: int, size: int | None) -> str:
    """IPVS hashes connections into 2^conn_tab_bits buckets (a parameter of
    the ip_vs module, global to the host). Its Kconfig help: a table "not far
    less than" the connections it holds; far more connections make long
    chains, walked for every packet."""
    if size is None:
        return "size unknown (no /proc/net/ip_vs or /sys/module/ip_vs here)"
    bits = size.bit_length() - 1
    detail = (
        f"{size:,} buckets (ip_vs conn_tab_bits={bits}); {connections:,} connection(s) in the director now"
    )
    if connections <= CHAIN_LIMIT * size:
        return detail + f"; raise it before holding more than about {CHAIN_LIMIT * size:,}"
    want = max(bits + 1, (connections - 1).bit_length())
    raise _Failed(
        detail + f": about {connections // size} per bucket, and every packet walks its bucket",
        f"on the host: echo 'options ip_vs conn_tab_bits={want}' > /etc/modprobe.d/ip_vs.conf, then reload "
        f"ip_vs while no IPVS service exists (or boot with ip_vs.conn_tab_bits={want} if it is built in)",
    )


def conn_table_size() -> int | None:
    text = Path("/proc/net/ip_vs").read_text() if Path("/proc/net/ip_vs").exists() else ""
    if found := re.search(r"\(size=(\d+)\)", text):
        return int(found[1])
    with contextlib.suppress(OSError, ValueError):
        return 1 << int(Path("/sys/module/ip_vs/parameters/conn_tab_bits").read_text())
    return None


def _sync(netns: str | None, settings: Settings, director: Director, source: Source | None) -> str:
    names = director.interface_names()
    if settings.sync_network:
        if source is None:
            raise _Failed(
                f"--sync-network {settings.sync_network}: needs the Docker engine to find its subnet",
                "see the Docker engine check",
            )
        interface, problem = sync_interface_of(settings, source.networks(), director.interfaces())
        if problem:
            raise _Failed(
                problem,
                f"attach the director to Docker network {settings.sync_network!r} "
                "(compose networks:, docker network connect), or name another with --sync-network",
            )
    elif settings.sync_interface not in names:
        raise _Failed(
            f"--sync-interface {settings.sync_interface}: no such interface in the director namespace",
            f"name one of the director's interfaces: {', '.join(sorted(names))}",
        )
    else:
        interface = settings.sync_interface
    adapter = IpvsAdapter(netns, settings)
    try:
        running = adapter.daemons()
    finally:
        adapter.close()
    wanted = wanted_daemons(interface, settings.sync_id)
    missing = ", ".join(str(d) for d in sorted(wanted - running))
    if not missing:
        return "running: " + ", ".join(str(d) for d in sorted(wanted))
    return f"not running now: {missing}; `dockerlb run` starts them"


def _sync_channel(settings: Settings) -> str:
    """Who the director takes sync packets from (the protocol has no
    authentication: anyone who can send to it can add or expire connections)."""
    if settings.sync_peer:
        return f"sync packets taken only from {', '.join(settings.sync_peer)} (--sync-peer; nft, set by run)"
    if settings.sync_network:
        return (
            f"sync packets taken only from the other containers on Docker network "
            f"{settings.sync_network!r} (nft, set by run): let only the directors join it"
        )
    raise _Failed(
        f"sync packets on {settings.sync_interface} are taken from anyone who can send to it: the protocol "
        "has no authentication, so any container there can add or expire the pair's connections",
        "run sync on a network only the directors join (--sync-network NAME) and name the other "
        "director with --sync-peer ADDR",
    )


@contextlib.contextmanager
def _director(netns: str | None, settings: Settings) -> Iterator[Director]:
    director = Director(netns, settings)
    try:
        yield director
    finally:
        director.close()


def _sysctl(director: Director, name: str, want: str = "1") -> str:
    value = director.read_sysctl(name)
    if value == want:
        return f"{name}={want}"
    if os.access(sysctl_path(name), os.W_OK):
        return f"{name}={value} now; `dockerlb run` sets it to {want} at start"
    raise _Failed(
        f"{name}={value} and /proc/sys is read-only here, so `dockerlb run` cannot set it to {want}",
        f"set it on the director: docker run --sysctl {name}={want}, or compose sysctls: [{name}={want}]",
    )


def _vip_allow_list(containers: list[Container], settings: Settings) -> str:
    policy = VipPolicy.of(settings.vip_cidr)
    allowed = ", ".join(str(n) for n in policy.allowed)
    outside = sorted(
        f"{c.name} ({s.key.vip})"
        for c in containers
        for s in parse_labels(c.name, c.labels, settings.label_prefix).specs
        if not policy.allows(s.key.vip)
    )
    if outside:
        raise _Failed(
            f"outside {allowed}, so `dockerlb run` skips them: {', '.join(outside)}",
            "change those containers' dockerlb.vip, or name their range with --vip-cidr",
        )
    if not policy.named:
        # Open: any private address, a neighbour's LAN address included.
        raise _Failed(
            f"not set: a label may ask for any private address ({allowed})",
            "name the ranges your VIPs come from: --vip-cidr (DOCKERLB_VIP_CIDR), e.g. 10.50.0.0/24",
        )
    return f"every labelled VIP is inside {allowed}"


def _checked(containers: list[Container], settings: Settings) -> list[str]:
    return sorted(
        c.name
        for c in containers
        if any(s.check for s in parse_labels(c.name, c.labels, settings.label_prefix).specs)
    )


def _health_checks(checked: list[str], netns: str | None) -> str:
    if not checked:
        return "no container asks for one"
    where = f"from {netns}" if netns else "from the controller's own namespace"
    if netns and not _has_cap(CAP_SYS_ADMIN):
        raise _Failed(
            f"{', '.join(checked)} ask for them; probes run {where}, and entering it needs CAP_SYS_ADMIN",
            "compose cap_add: [NET_ADMIN, SYS_ADMIN], or run the controller in the director's namespace "
            "(network_mode: service:director and --netns '')",
        )
    return f"{', '.join(checked)}: probed {where}"


def _nft(director: Director) -> str:
    fix = "install nftables in the controller's image (apt-get install nftables), or --no-masquerade"
    if shutil.which("nft") is None:
        raise _Failed("the nft command is missing", fix)
    try:
        director.check_nft()
    except DockerlbError as e:
        raise _Failed(str(e), fix) from e
    return "nft answers in the director namespace"


def _users(containers: list[Container], settings: Settings, forward: Forward) -> list[str]:
    return sorted(
        c.name
        for c in containers
        if any(s.forward == forward for s in parse_labels(c.name, c.labels, settings.label_prefix).specs)
    )


def _real_servers(forward: Forward, users: list[str], containers: list[Container]) -> str:
    if not users:
        return "no container asks for it"
    needs = {
        Forward.DR: "the VIP on lo, arp_ignore=1 and arp_announce=2",
        Forward.TUN: "tunl0 up with the VIP, rp_filter=0 and the same ARP settings",
    }[forward]
    pids = {c.name: c.pid for c in containers}
    blocked = {name: why for name in users if (why := unreachable(pids.get(name, 0)))}
    if blocked:
        raise _Failed(
            f"dockerlb sets {needs} in each real server, but cannot enter "
            + "; ".join(f"{name} ({why})" for name, why in sorted(blocked.items())),
            "run the controller in the host's PID namespace with CAP_SYS_ADMIN to enter namespaces "
            "(compose: pid: host, cap_add: [NET_ADMIN, SYS_ADMIN]), or on the host",
        )
    detail = f"used by {', '.join(users)}; dockerlb sets {needs} in each"
    if not os.access(sysctl_path("net.ipv4.conf.all.arp_ignore"), os.W_OK):
        detail += (
            "; /proc/sys is read-only here: dockerlb mounts a procfs of its own for them "
            "(needs CAP_SYS_ADMIN), or each real server must carry them itself (compose sysctls:)"
        )
    return detail


def _ipip() -> str:
    if Path("/sys/module/ipip").exists():
        return "ipip is loaded"
    raise _Failed(
        "the ipip module is not loaded (real servers receive tunnelled packets on its tunl0)",
        "load it on the host: modprobe ipip",
    )
