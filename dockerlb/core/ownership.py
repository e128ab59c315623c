"""Who owns each VIP:port: state the controller can find again, not memory.

A VIP:port belongs to one group (``desired.group_of``: a compose project,
a Swarm stack, else the ``dockerlb.owner`` label, else no group). Its owner
is, in this order:

1. the group an operator bound its VIP's range to (``--vip-owner
   CIDR=GROUP``): that range is the group's alone, whatever else asks;
2. the owner as last decided, while any container of its group claims it,
   running or not (a stopped or restarting container keeps the claim, a
   removed one does not), and for ``grace`` seconds after the last one went;
3. the group of the containers that are its real servers in the kernel now
   (so a controller restart finds every owner again in the IPVS table);
4. else the group of its oldest running claimant (``build_desired`` picks it).

Labels are something anyone can set: groups keep two projects from taking
each other's VIP:port by accident; only ``--vip-owner`` stops one that
means to. Pure: no Docker, no kernel; time is passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network

from dockerlb.core.model import IPAddress, ServiceKey, Table
from dockerlb.errors import ConfigError

_GROUP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True, slots=True)
class Binding:
    """An operator's word: VIPs in ``network`` belong to ``group`` alone."""

    network: IPv4Network | IPv6Network
    group: str

    def __str__(self) -> str:
        return f"{self.network}={self.group}"


def vip_bindings(values: Iterable[str]) -> tuple[Binding, ...]:
    """``--vip-owner`` values (``CIDR=GROUP``); a malformed one is a ConfigError."""
    found = []
    for text in values:
        cidr, sep, group = text.strip().partition("=")
        if not sep or not group or not set(group) <= _GROUP_CHARS:
            raise ConfigError(f"--vip-owner {text!r}: expected CIDR=GROUP, e.g. 10.50.0.0/24=shop")
        try:
            network = ip_network(cidr.strip(), strict=False)
        except ValueError as e:
            raise ConfigError(f"--vip-owner {text!r}: {e}") from e
        found.append(Binding(network, group))
    return tuple(found)


def bound_group(vip: IPAddress, bindings: Iterable[Binding]) -> Binding | None:
    """The binding that decides ``vip``: the most specific range holding it."""
    holding = [b for b in bindings if b.network.version == vip.version and vip in b.network]
    return max(holding, key=lambda b: b.network.prefixlen, default=None)


@dataclass(frozen=True)
class Owners:
    """Each VIP:port's owning group, and for those whose group has no
    claimant left, since when (monotonic seconds)."""

    groups: Mapping[ServiceKey, str] = field(default_factory=dict)
    orphaned: Mapping[ServiceKey, float] = field(default_factory=dict)

    def decide(
        self,
        keys: Iterable[ServiceKey],
        claimants: Mapping[ServiceKey, Counter[str]],
        evidence: Mapping[ServiceKey, str],
        now: float,
        grace: float,
        bindings: tuple[Binding, ...] = (),
    ) -> Owners:
        """The owners of ``keys`` decided again (rules 1-3 above; a key
        left out has none yet, and rule 4 is the build's); every other key
        keeps what it had. ``claimants``: per key, how many existing
        containers of each group claim it; ``evidence``: per key, the group
        its real servers in the kernel belong to."""
        groups, orphaned = dict(self.groups), dict(self.orphaned)
        for key in keys:
            groups.pop(key, None)
            since = orphaned.pop(key, None)
            bound = bound_group(key.vip, bindings)
            owner = self.groups.get(key)
            if bound is not None:
                groups[key] = bound.group
            elif owner is not None and claimants.get(key, Counter())[owner] > 0:
                groups[key] = owner
            elif owner is not None and now - (since if since is not None else now) < grace:
                groups[key], orphaned[key] = owner, since if since is not None else now
            elif key in evidence:
                groups[key] = evidence[key]
                if claimants.get(key, Counter())[evidence[key]] == 0:
                    # Known only from the kernel (a restart): its grace starts now.
                    orphaned[key] = now
        return Owners(groups, orphaned)

    def adopt(self, decided: Mapping[ServiceKey, str], keys: Iterable[ServiceKey]) -> Owners:
        """With the owners the build chose (rule 4) for ``keys`` that had none."""
        groups = dict(self.groups)
        for key in keys:
            if key not in groups and key in decided:
                groups[key] = decided[key]
        return Owners(groups, self.orphaned)


Claim = tuple[ServiceKey, tuple[IPAddress, int]]  # a service, and a claimant's address and port on it


def kernel_evidence(
    keys: Iterable[ServiceKey], kernel: Table, group_at: Mapping[Claim, str]
) -> dict[ServiceKey, str]:
    """For each key the kernel serves, the group most of its real servers
    belong to (``group_at``: who claims the service at that address and
    port); ties go to the group that sorts first."""
    found = {}
    for key in keys:
        vs = kernel.get(key)
        if vs is None:
            continue
        votes = Counter(group_at[(key, i)] for i in vs.servers if (key, i) in group_at)
        if votes:
            found[key] = min(votes, key=lambda g: (-votes[g], g))
    return found
