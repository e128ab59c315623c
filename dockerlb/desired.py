"""Containers -> the desired IPVS table. Pure: no Docker, no kernel.

Rules:
- only running, non-paused containers that are healthy (or have no
  HEALTHCHECK) become real servers; a running container that is not healthy
  still keeps its service in place (with no real server of its own); label
  problems are reported for every running container, serving or not;
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

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from dockerlb.labels import LabelProblem, Spec, parse_labels
from dockerlb.model import (
    Container,
    Forward,
    IPAddress,
    RealServer,
    ServerPrep,
    Service,
    ServiceKey,
    VirtualService,
)


@dataclass(frozen=True)
class Desired:
    table: dict[ServiceKey, VirtualService]
    problems: tuple[LabelProblem, ...] = ()
    warnings: tuple[str, ...] = ()
    # Container id -> what its namespace needs (DR, TUN, routed NAT).
    preps: dict[str, ServerPrep] = field(default_factory=dict)
    # VIPs whose NAT traffic is SNATed to the director's address.
    snat_vips: frozenset[IPAddress] = frozenset()


def build_desired(
    containers: Iterable[Container], prefix: str = "dockerlb.", masquerade: bool = True
) -> Desired:
    """Containers -> desired table, label problems, conflict warnings and what
    real servers' namespaces need. ``masquerade`` is the default for NAT
    services whose labels do not say. No side effects."""
    services: dict[ServiceKey, Service] = {}
    snat: dict[ServiceKey, bool] = {}
    preps: dict[str, ServerPrep] = {}
    owners: dict[ServiceKey, str] = {}
    servers: dict[ServiceKey, dict[tuple[IPAddress, int], RealServer]] = {}
    problems: list[LabelProblem] = []
    warnings: list[str] = []

    for c in sorted(containers, key=lambda c: (c.created, c.name, c.id)):
        if not c.running:
            continue
        parsed = parse_labels(c.name, c.labels, prefix)
        resolved = [(spec, _address(c, spec)) for spec in parsed.specs]
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
            if not c.serving:
                # Running but not healthy (yet): the service stays, so its
                # VIP and counters survive a moment with no healthy server.
                continue
            server = RealServer(addr, spec.target_port, spec.weight, spec.forward, container=c.name)
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
    return Desired(table, tuple(problems), tuple(warnings), preps, snat_vips)


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
