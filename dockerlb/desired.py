"""Containers -> the desired IPVS table. Pure: no Docker, no kernel.

Rules:
- only running, non-paused containers are looked at; their ``Role`` says
  what they are (see ``lifecycle``): serving ones are real servers at their
  weight, draining ones at weight 0, pending and retired ones are not real
  servers but still keep their service in place; label problems are
  reported for every running container, serving or not;
- a VIP outside the allowed ranges, or one that is already some container's
  or the director's own address, is a label problem;
- a container with any label problem is skipped whole;
- the real server's address is the container's address on ``network``, or on
  its only network with an address of the VIP's family;
- service settings (scheduler, persistence) come from the oldest container
  on that service; a younger container that disagrees gets one warning that
  names both; so does masquerading (SNAT), which is per VIP;
- a serving container whose forwarding needs its own namespace set up (DR,
  TUN, NAT keeping the client's address) gets a ``ServerPrep``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network

from dockerlb.errors import ConfigError
from dockerlb.labels import LabelProblem, Spec, parse_labels
from dockerlb.model import (
    CheckTarget,
    Container,
    Forward,
    IPAddress,
    RealServer,
    Role,
    ServerPrep,
    Service,
    ServiceKey,
    Table,
    VirtualService,
)


@dataclass(frozen=True)
class VipPolicy:
    """Which addresses may be VIPs: inside ``allowed`` (empty: any), and not
    an address something already uses (``taken``: address -> who uses it)."""

    allowed: tuple[IPv4Network | IPv6Network, ...] = ()
    taken: Mapping[IPAddress, str] = field(default_factory=dict)

    def allows(self, vip: IPAddress) -> bool:
        """Inside the allowed ranges (any address when there are none)."""
        return not self.allowed or any(vip in net for net in self.allowed if net.version == vip.version)


def vip_ranges(cidrs: Iterable[str]) -> tuple[IPv4Network | IPv6Network, ...]:
    """--vip-cidr values as networks; a bad one is a ConfigError."""
    try:
        return tuple(ip_network(c.strip(), strict=False) for c in cidrs if c.strip())
    except ValueError as e:
        raise ConfigError(f"--vip-cidr: {e}") from e


@dataclass(frozen=True)
class Desired:
    table: dict[ServiceKey, VirtualService]
    problems: tuple[LabelProblem, ...] = ()
    warnings: tuple[str, ...] = ()
    # Container id -> what its namespace needs (DR, TUN, routed NAT).
    preps: dict[str, ServerPrep] = field(default_factory=dict)
    # VIPs whose NAT traffic is SNATed to the director's address.
    snat_vips: frozenset[IPAddress] = frozenset()
    # Containers (by name) whose servers drain (weight 0).
    draining: frozenset[str] = frozenset()
    # dockerlb's own health checks to run, for every running container that asks.
    checks: tuple[CheckTarget, ...] = ()


def build_desired(
    containers: Iterable[Container],
    prefix: str = "dockerlb.",
    masquerade: bool = True,
    roles: Mapping[str, Role] | None = None,
    policy: VipPolicy = VipPolicy(),
) -> Desired:
    """Containers -> desired table, label problems, conflict warnings and what
    real servers' namespaces need. ``masquerade`` is the default for NAT
    services whose labels do not say; ``roles`` (container id -> role)
    defaults to serving when Docker says healthy or has no HEALTHCHECK, and
    pending otherwise. No side effects."""
    containers = list(containers)
    policy = replace(policy, taken={**_addresses(containers), **policy.taken})
    services: dict[ServiceKey, Service] = {}
    snat: dict[ServiceKey, bool] = {}
    preps: dict[str, ServerPrep] = {}
    draining: set[str] = set()
    checks: list[CheckTarget] = []
    owners: dict[ServiceKey, str] = {}
    servers: dict[ServiceKey, dict[tuple[IPAddress, int], RealServer]] = {}
    problems: list[LabelProblem] = []
    warnings: list[str] = []

    for c in sorted(containers, key=lambda c: (c.created, c.name, c.id)):
        if not c.running:
            continue
        parsed = parse_labels(c.name, c.labels, prefix)
        resolved = [(spec, _vip_refused(c, spec, policy) or _address(c, spec)) for spec in parsed.specs]
        bad = list(parsed.problems) + [p for _, p in resolved if isinstance(p, LabelProblem)]
        if bad:
            problems.extend(bad)
            continue
        for spec, addr in resolved:
            assert not isinstance(addr, LabelProblem)
            key = spec.key
            wanted = Service(key, spec.scheduler, spec.persistence)
            wants_snat = snatted(spec, masquerade)
            if key not in services:
                services[key], owners[key], servers[key] = wanted, c.name, {}
                snat[key] = wants_snat
            elif wanted.settings() != services[key].settings():
                warnings.append(_conflict(key, services[key], owners[key], wanted, c.name))
            elif spec.forward is Forward.NAT and wants_snat != snat[key]:
                warnings.append(
                    f"{key}: container {c.name!r} asks masquerade={str(wants_snat).lower()}, but the "
                    f"oldest container {owners[key]!r} set masquerade={str(snat[key]).lower()}; "
                    f"keeping {owners[key]!r}'s"
                )
            if spec.check is not None:
                checks.append(CheckTarget(c.id, c.name, addr, spec.target_port, spec.check))
            role = roles.get(c.id, Role.PENDING) if roles is not None else _docker_role(c)
            if role not in (Role.SERVE, Role.DRAIN):
                # Not a server (yet, or any more): the service stays, so its
                # VIP and counters survive a moment with no server.
                continue
            weight = spec.weight if role is Role.SERVE else 0
            if role is Role.DRAIN:
                draining.add(c.name)
            server = RealServer(addr, spec.target_port, weight, spec.forward, container=c.name)
            taken = servers[key].get(server.ident)
            if taken is not None:
                warnings.append(
                    f"{key}: real server {server} is claimed by both {taken.container!r} and "
                    f"{c.name!r} (group {spec.group or 'default'}); keeping {taken.container!r}'s"
                )
                continue
            servers[key][server.ident] = server
            prep = _prep(preps.get(c.id) or ServerPrep(c.name, addr), spec, routed=not snat[key])
            if not prep.empty:
                preps[c.id] = prep

    table = {k: VirtualService(services[k], servers[k]) for k in sorted(services, key=ServiceKey.sort_key)}
    snat_vips = frozenset(k.vip for k, on in snat.items() if on)
    return Desired(
        table, tuple(problems), tuple(warnings), preps, snat_vips, frozenset(draining), tuple(checks)
    )


def without(table: Table, names: Iterable[str]) -> dict[ServiceKey, VirtualService]:
    """The table with the servers of these containers left out (services stay)."""
    names = set(names)
    return {
        k: VirtualService(vs.service, {i: s for i, s in vs.servers.items() if s.container not in names})
        for k, vs in table.items()
    }


def snatted(spec: Spec, masquerade: bool) -> bool:
    """Whether this spec's traffic is SNATed to the director (``masquerade``:
    the default for NAT specs whose labels do not say)."""
    return spec.forward is Forward.NAT and (masquerade if spec.masquerade is None else spec.masquerade)


def _prep(prep: ServerPrep, spec: Spec, routed: bool) -> ServerPrep:
    vip = spec.key.vip
    if spec.forward is Forward.DR:
        return replace(prep, loopback=prep.loopback | {vip})
    if spec.forward is Forward.TUN:
        return replace(prep, tunnel=prep.tunnel | {vip})
    return replace(prep, route_via_director=True) if routed else prep


def _docker_role(c: Container) -> Role:
    return Role.SERVE if c.serving else Role.PENDING


def _addresses(containers: list[Container]) -> dict[IPAddress, str]:
    """Every address the containers and their networks' gateways use."""
    taken: dict[IPAddress, str] = {}
    for c in containers:
        for name, net in c.networks.items():
            for gateway in (net.gateway4, net.gateway6):
                if gateway is not None:
                    taken[gateway] = f"the gateway of network {name!r}"
            for addr in (net.ipv4, net.ipv6):
                if addr is not None:
                    taken[addr] = f"container {c.name!r}'s address on {name!r}"
    return taken


def _vip_refused(c: Container, spec: Spec, policy: VipPolicy) -> LabelProblem | None:
    vip = spec.key.vip
    label = spec.vip_label
    if not policy.allows(vip):
        ranges = ", ".join(str(n) for n in policy.allowed)
        return LabelProblem(
            c.name, label, f"VIP {vip} is outside the allowed VIP ranges (--vip-cidr: {ranges})"
        )
    user = policy.taken.get(vip)
    if user is not None:
        return LabelProblem(c.name, label, f"VIP {vip} is already in use as {user}; pick a free address")
    return None


def _address(c: Container, spec: Spec) -> IPAddress | LabelProblem:
    family = spec.key.vip.version
    fam = f"IPv{family}"
    if spec.network is not None:
        net = c.networks.get(spec.network)
        if net is None:
            on = ", ".join(sorted(c.networks)) or "none"
            return LabelProblem(
                c.name,
                spec.network_label,
                f"container is not on network {spec.network!r} (it is on: {on})",
            )
        addr = net.of_family(family)
        if addr is None:
            return LabelProblem(
                c.name,
                spec.network_label,
                f"network {spec.network!r} gives the container no {fam} address",
            )
        return addr
    candidates = {name: net.of_family(family) for name, net in c.networks.items()}
    usable = sorted(name for name, addr in candidates.items() if addr is not None)
    if len(usable) == 1:
        addr = candidates[usable[0]]
        assert addr is not None
        return addr
    if not usable:
        on = ", ".join(sorted(c.networks)) or "none"
        return LabelProblem(
            c.name,
            spec.network_label,
            f"container has no {fam} address for VIP {spec.key.vip} on any network (networks: {on})",
        )
    return LabelProblem(
        c.name,
        spec.network_label,
        f"not set, and the container has {fam} addresses on several networks; "
        f"set it to one of: {', '.join(usable)}",
    )


def _conflict(key: ServiceKey, kept: Service, owner: str, asked: Service, asker: str) -> str:
    return (
        f"{key}: container {asker!r} asks scheduler={asked.scheduler} persistence={asked.persistence}, "
        f"but the oldest container {owner!r} set scheduler={kept.scheduler} "
        f"persistence={kept.persistence}; keeping {owner!r}'s"
    )
