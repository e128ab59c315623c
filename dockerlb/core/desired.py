"""Containers -> the desired IPVS table. Pure: no Docker, no kernel.

Rules:
- only running, non-paused containers are looked at; their ``Role`` says
  what they are (see ``lifecycle``): serving ones are real servers at their
  weight, draining ones at weight 0, pending and retired ones are not real
  servers but still keep their service in place; label problems are
  reported for every running container, serving or not;
- a VIP outside the allowed ranges (by default the private ones:
  ``DEFAULT_VIP_RANGES``), inside a Docker network's subnet, or one that is
  already some container's, a gateway's or the director's own address, is a
  label problem;
- a VIP:port belongs to one group (``group_of``: the compose project, else
  the Swarm stack, else the ``owner`` label, else no group): the owner
  ``ownership.Owners`` decided (``owners``), else the group of its oldest
  running claimant. A container of another group asking for it is a label
  problem naming both, unless ``share`` is on; a VIP in a range an operator
  bound to a group (``--vip-owner``) is that group's alone, shared or not;
- a container with any label problem is skipped whole;
- the real server's address is the container's address on ``network``, or on
  its only network with an address of the VIP's family;
- service settings (scheduler, persistence) come from the owning group's
  oldest container on that service; a younger container that disagrees gets
  one warning that names both; so does masquerading (SNAT), and
  ``announce_min``, also per VIP:port;
- a serving container whose forwarding needs its own namespace set up (DR,
  TUN, NAT keeping the client's address) gets a ``ServerPrep``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any, cast

from dockerlb.core.labels import LabelCache, LabelProblem, Limits, Spec
from dockerlb.core.model import (
    CheckTarget,
    Container,
    DockerNetwork,
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
from dockerlb.core.ownership import Binding, bound_group
from dockerlb.errors import ConfigError

COMPOSE_PROJECT = "com.docker.compose.project"
# Swarm puts it on every service of a stack (`docker stack deploy`): the stack is the group.
STACK_NAMESPACE = "com.docker.stack.namespace"
# With no --vip-cidr, VIPs come from the ranges no one routes on the
# Internet (RFC 1918, RFC 6598's shared space, RFC 4193's unique local):
# a label cannot make a public address (someone's DNS resolver, say) a VIP.
DEFAULT_VIP_RANGES: tuple[IPv4Network | IPv6Network, ...] = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
    IPv4Network("100.64.0.0/10"),
    IPv6Network("fc00::/7"),
)
# Docker puts a container's labels among a kill event's attributes, so a
# label of this name hides the event's signal (controller.py, ``_trusted``).
SIGNAL_LABEL = "signal"


@dataclass(frozen=True)
class VipPolicy:
    """Which addresses may be VIPs: inside ``allowed`` (the private ranges
    unless an operator named others: ``named``), not inside a Docker network
    (``networks``), not an address something already uses (``taken``:
    address -> who uses it); whether groups may share a VIP:port
    (``share``); which ranges an operator bound to one group (``bindings``)."""

    allowed: tuple[IPv4Network | IPv6Network, ...] = DEFAULT_VIP_RANGES
    taken: Mapping[IPAddress, str] = field(default_factory=dict)
    networks: tuple[DockerNetwork, ...] = ()
    share: bool = False
    limits: Limits = field(default_factory=Limits)
    named: bool = False  # ``allowed`` came from --vip-cidr
    bindings: tuple[Binding, ...] = ()

    @classmethod
    def of(cls, cidrs: Iterable[str], **kw: Any) -> VipPolicy:
        """The policy for --vip-cidr values (none: the private ranges)."""
        named = vip_ranges(cidrs)
        return cls(named or DEFAULT_VIP_RANGES, named=bool(named), **kw)

    def allows(self, vip: IPAddress) -> bool:
        """Inside the allowed ranges."""
        return any(vip in net for net in self.allowed if net.version == vip.version)


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
    # Containers (by name) whose servers drain (weight 0).
    draining: frozenset[str] = frozenset()
    # dockerlb's own health checks to run, for every running container that asks.
    checks: tuple[CheckTarget, ...] = ()
    # The group each service belongs to (see ``group_of``); the next pass's ``owners``.
    owners: dict[ServiceKey, str] = field(default_factory=dict)
    # The service each warning is about, in the same order: an event pass
    # replaces the warnings of the services it rebuilt, and keeps the others.
    warned: tuple[ServiceKey, ...] = ()
    # The services whose NAT traffic is SNATed to the director's address.
    snat_keys: frozenset[ServiceKey] = frozenset()
    # Each service's dockerlb.announce_min (its owning group's oldest container's).
    announce_min: dict[ServiceKey, int] = field(default_factory=dict)
    # Each service's head: the container (by id) whose labels set its
    # scheduler, persistence, masquerading and announce_min (the owning
    # group's oldest). An event pass about another container of the service
    # patches that container's server alone (scope.py).
    heads: dict[ServiceKey, str] = field(default_factory=dict)


def build_desired(
    containers: Iterable[Container],
    prefix: str = "dockerlb.",
    masquerade: bool = True,
    roles: Mapping[str, Role] | None = None,
    policy: VipPolicy = VipPolicy(),
    owners: Mapping[ServiceKey, str] | None = None,
    labels: LabelCache | None = None,
) -> Desired:
    """Containers -> desired table, label problems, conflict warnings and what
    real servers' namespaces need. ``masquerade`` is the default for NAT
    services whose labels do not say; ``roles`` (container id -> role)
    defaults to serving when Docker says healthy or has no HEALTHCHECK, and
    pending otherwise; ``owners`` is the last pass's ``Desired.owners``;
    ``labels`` remembers parsed labels across passes (a fresh one if not
    given). No side effects beyond filling that memo."""
    containers = list(containers)
    if labels is None:
        labels = LabelCache(prefix, policy.limits)
    elif (labels.prefix, labels.limits) != (prefix, policy.limits):
        raise ValueError("the label cache parses with another prefix or other limits")
    # Docker's own names win: "the gateway of network X" says more than
    # "the director's default gateway" when both are true.
    policy = replace(policy, taken={**policy.taken, **_addresses(containers, policy.networks)})
    services: dict[ServiceKey, Service] = {}
    snat: dict[ServiceKey, bool] = {}
    minimums: dict[ServiceKey, int] = {}
    preps: dict[str, ServerPrep] = {}
    draining: set[str] = set()
    checks: list[CheckTarget] = []
    first: dict[ServiceKey, str] = {}
    heads: dict[ServiceKey, str] = {}
    servers: dict[ServiceKey, dict[tuple[IPAddress, int], RealServer]] = {}
    problems: list[LabelProblem] = []
    warnings: list[tuple[ServiceKey, str]] = []

    claims: list[tuple[Container, str, list[tuple[Spec, IPAddress]]]] = []
    for c in sorted(containers, key=lambda c: (c.created, c.name, c.id)):
        if not c.running:
            continue
        parsed = labels.parse(c.id, c.name, c.labels)
        resolved = [(spec, _vip_refused(c, spec, policy) or _address(c, spec)) for spec in parsed.specs]
        bad = list(parsed.problems) + [p for _, p in resolved if isinstance(p, LabelProblem)]
        if bad:
            problems.extend(bad)
            continue
        claims.append((c, group_of(c.labels, parsed.owner), cast(list[tuple[Spec, IPAddress]], resolved)))
    owner_of = _owners(claims, owners or {})

    for c, group, specs in claims:
        refused = [_not_its_group(c, group, spec, owner_of[spec.key], policy) for spec, _ in specs]
        if any(p is not None for p in refused):
            problems.extend(p for p in refused if p is not None)
            continue
        for spec, addr in specs:
            key = spec.key
            wanted = Service(key, spec.scheduler, spec.persistence)
            wants_snat = snatted(spec, masquerade)
            if key not in services:
                services[key], first[key], heads[key], servers[key] = wanted, c.name, c.id, {}
                snat[key], minimums[key] = wants_snat, spec.announce_min
            else:
                if wanted.settings() != services[key].settings():
                    warnings.append((key, _conflict(key, services[key], first[key], wanted, c.name)))
                elif spec.forward is Forward.NAT and wants_snat != snat[key]:
                    warnings.append(
                        (
                            key,
                            f"{key}: container {c.name!r} asks masquerade={str(wants_snat).lower()}, but the "
                            f"oldest container {first[key]!r} set masquerade={str(snat[key]).lower()}; "
                            f"keeping {first[key]!r}'s",
                        )
                    )
                if spec.announce_min != minimums[key]:
                    warnings.append(
                        (
                            key,
                            f"{key}: container {c.name!r} asks announce_min={spec.announce_min}, but the "
                            f"oldest container {first[key]!r} set announce_min={minimums[key]}; "
                            f"keeping {first[key]!r}'s",
                        )
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
            server = RealServer(
                addr,
                spec.target_port,
                weight,
                spec.forward,
                container=c.name,
                upper_threshold=spec.upper_threshold,
                lower_threshold=spec.lower_threshold,
            )
            taken = servers[key].get(server.ident)
            if taken is not None:
                warnings.append(
                    (
                        key,
                        f"{key}: real server {server} is claimed by both {taken.container!r} and "
                        f"{c.name!r} (group {spec.group or 'default'}); keeping {taken.container!r}'s",
                    )
                )
                continue
            servers[key][server.ident] = server
            prep = _prep(preps.get(c.id) or ServerPrep(c.name, addr), spec, routed=not snat[key])
            if not prep.empty:
                preps[c.id] = prep

    table = {k: VirtualService(services[k], servers[k]) for k in sorted(services, key=ServiceKey.sort_key)}
    snat_keys = frozenset(k for k, on in snat.items() if on)
    return Desired(
        table,
        tuple(problems),
        tuple(text for _, text in warnings),
        preps,
        frozenset(draining),
        tuple(checks),
        {k: group for k, (group, _) in owner_of.items()},
        tuple(key for key, _ in warnings),
        snat_keys,
        minimums,
        heads,
    )


def kept_labels(labels: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The labels dockerlb reads, of all a container has: those under the
    prefix, its compose project or Swarm stack (``group_of``) and ``signal``. What Docker
    adapters should keep of a container's labels: a compose service's
    container has ~10 more (config hash, working dir, ...) that nothing
    reads, decoded afresh for every container: most of what 10,000
    containers hold (bench/rss.py). Names and values are interned, so the
    replicas of a service share theirs."""
    return {
        sys.intern(k): sys.intern(v)
        for k, v in labels.items()
        if k.startswith(prefix) or k in (COMPOSE_PROJECT, STACK_NAMESPACE, SIGNAL_LABEL)
    }


def group_of(labels: Mapping[str, str], owner: str | None) -> str:
    """The group a container belongs to: its compose project, else its Swarm
    stack, else its ``owner`` label, else "" (no group)."""
    return labels.get(COMPOSE_PROJECT) or labels.get(STACK_NAMESPACE) or owner or ""


def _owners(
    claims: list[tuple[Container, str, list[tuple[Spec, IPAddress]]]], before: Mapping[ServiceKey, str]
) -> dict[ServiceKey, tuple[str, str]]:
    """Service -> (owning group, its oldest running claimant, "" if none runs):
    the owner decided before the build (``ownership.Owners``), whether or
    not one of its containers runs now, else the oldest claimant's group."""
    claimants: dict[ServiceKey, dict[str, str]] = {}  # key -> group -> oldest container
    for c, group, specs in claims:  # oldest first
        for spec, _ in specs:
            claimants.setdefault(spec.key, {}).setdefault(group, c.name)
    owner_of = {}
    for key, groups in claimants.items():
        kept = before.get(key)
        group = kept if kept is not None else next(iter(groups))
        owner_of[key] = (group, groups.get(group, ""))
    return owner_of


def _not_its_group(
    c: Container, group: str, spec: Spec, owner: tuple[str, str], policy: VipPolicy
) -> LabelProblem | None:
    owning, by = owner
    if group == owning:
        return None
    bound = bound_group(spec.key.vip, policy.bindings)
    if bound is not None:
        return LabelProblem(
            c.name,
            spec.vip_label,
            f"VIP {spec.key.vip} belongs to {_group_name(bound.group)} alone (--vip-owner {bound}), "
            f"and this container is in {_group_name(group)}",
        )
    if policy.share:
        return None
    held = f"container {by!r}" if by else "no container of it runs now; it keeps its claim"
    return LabelProblem(
        c.name,
        spec.vip_label,
        f"{spec.key} belongs to {_group_name(owning)} ({held}), and this container is in "
        f"{_group_name(group)}; sharing a VIP across groups needs --share-vips",
    )


def _group_name(group: str) -> str:
    return f"group {group!r}" if group else "no group"


def without(
    table: Table, names: Iterable[str], keys: Iterable[ServiceKey] | None = None
) -> dict[ServiceKey, VirtualService]:
    """The table with the servers of these containers left out (services
    stay); ``keys``: the services they can be in (the others are copied as
    they are, not walked)."""
    names = set(names)
    out = dict(table)
    for k in out.keys() if keys is None else keys:
        vs = out.get(k)
        if vs is not None and any(s.container in names for s in vs.servers.values()):
            out[k] = VirtualService(
                vs.service, {i: s for i, s in vs.servers.items() if s.container not in names}
            )
    return out


def snatted(spec: Spec, masquerade: bool) -> bool:
    """Whether this spec's traffic is SNATed to the director (``masquerade``:
    the default for NAT specs whose labels do not say)."""
    return spec.forward is Forward.NAT and (masquerade if spec.masquerade is None else spec.masquerade)


def asks_namespace(specs: Iterable[Spec], masquerade: bool) -> bool:
    """Whether any of these specs needs its real server's own namespace set
    up (DR, TUN, routed NAT): everything but SNATed NAT."""
    return any(not snatted(spec, masquerade) for spec in specs)


def _prep(prep: ServerPrep, spec: Spec, routed: bool) -> ServerPrep:
    vip = spec.key.vip
    if spec.forward is Forward.DR:
        return replace(prep, loopback=prep.loopback | {vip})
    if spec.forward is Forward.TUN:
        return replace(prep, tunnel=prep.tunnel | {vip})
    return replace(prep, route_via_director=True) if routed else prep


def _docker_role(c: Container) -> Role:
    return Role.SERVE if c.serving else Role.PENDING


def _addresses(containers: list[Container], networks: Iterable[DockerNetwork]) -> dict[IPAddress, str]:
    """Every address the containers and their networks' gateways use."""
    taken: dict[IPAddress, str] = {}
    for network in networks:
        for address in network.gateways:
            taken[address] = f"the gateway of network {network.name!r}"
    for c in containers:
        for name, net in c.networks.items():
            for gateway in (net.gateway4, net.gateway6):
                if gateway is not None:
                    taken[gateway] = f"the gateway of network {name!r}"
            for own in (net.ipv4, net.ipv6):
                if own is not None:
                    taken[own] = f"container {c.name!r}'s address on {name!r}"
    return taken


def _vip_refused(c: Container, spec: Spec, policy: VipPolicy) -> LabelProblem | None:
    vip = spec.key.vip
    label = spec.vip_label
    user = policy.taken.get(vip)
    if user is not None:
        return LabelProblem(c.name, label, f"VIP {vip} is already in use as {user}; pick a free address")
    for network in policy.networks:
        for subnet in network.subnets:
            if subnet.version == vip.version and vip in subnet:
                return LabelProblem(
                    c.name,
                    label,
                    f"VIP {vip} is inside Docker network {network.name!r} ({subnet}), whose addresses "
                    "Docker hands to containers; pick an address outside every Docker network",
                )
    # Last: what the address is says more than where the operator allows VIPs.
    if not policy.allows(vip):
        ranges = ", ".join(str(n) for n in policy.allowed)
        if policy.named:
            why = f"VIP {vip} is outside the allowed VIP ranges (--vip-cidr: {ranges})"
        else:
            why = (
                f"VIP {vip} is not a private address ({ranges}), and no --vip-cidr allows it; "
                "name the ranges your VIPs come from with --vip-cidr (DOCKERLB_VIP_CIDR)"
            )
        return LabelProblem(c.name, label, why)
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
