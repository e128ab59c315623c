"""Keeps real servers' own namespaces as their forwarding needs: the VIP on
``lo`` (DR) or ``tunl0`` (TUN), ARP and reverse-path sysctls, the default
route via the director (NAT keeping the client's address).

A server is set up *before* IPVS sends to it and cleaned *after* IPVS stops:
the controller calls ``prepare`` before applying its plan and ``release``
after. A server whose namespace cannot be reached or set up is left out of
the IPVS table, with the reason logged once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from loguru import logger

from dockerlb.adapters.realserver import RealServerNetns, unreachable
from dockerlb.core.desired import asks_namespace
from dockerlb.core.labels import parse_labels
from dockerlb.core.model import Container, IPAddress, ServerPrep
from dockerlb.errors import DockerlbError


class AddressPort(Protocol):
    def address_towards(self, addr: IPAddress) -> IPAddress | None: ...


class ServerPreparer:
    def __init__(
        self, namespaces: RealServerNetns, director: AddressPort, masquerade: bool, prefix: str
    ) -> None:
        self._ns = namespaces
        self._director = director
        self._masquerade = masquerade
        self._prefix = prefix
        # Container id -> (pid, what its namespace was last made to hold).
        self._done: dict[str, tuple[int, ServerPrep]] = {}
        self._swept = False

    def blocked(self, preps: Mapping[str, ServerPrep], containers: Mapping[str, Container]) -> dict[str, str]:
        """Containers (by name) whose namespace the controller cannot enter,
        and why. Changes nothing. ``containers``: by id (looked up, never
        walked: an event pass must not cost a walk over 10,000)."""
        out = {}
        for cid, prep in preps.items():
            c = containers.get(cid)
            reason = "it is gone" if c is None else _elsewhere(c) or unreachable(c.pid)
            if reason:
                out[prep.container] = f"its forwarding needs its own namespace set up, but {reason}"
        return out

    def prepare(
        self, preps: Mapping[str, ServerPrep], containers: Mapping[str, Container], full: bool
    ) -> dict[str, str]:
        """Set up every namespace ``preps`` asks for (all of them again on a
        full pass: that repairs drift). Returns the containers (by name) that
        could not be set up, and why: whatever went wrong with one costs that
        one alone."""
        failed = self.blocked(preps, containers)
        if not self._swept:
            self._sweep(preps, containers.values())
        for cid, prep in preps.items():
            c = containers.get(cid)
            if c is None or prep.container in failed:
                continue
            if not full and self._done.get(cid) == (c.pid, prep):
                continue
            try:
                director = self._director.address_towards(prep.address) if prep.route_via_director else None
                changes = self._ns.converge(c.pid, prep, director, _docker_gateway(c, prep.address))
            except DockerlbError as e:
                failed[prep.container] = str(e)
                continue
            except Exception as e:  # a bug, or an error an adapter did not translate
                failed[prep.container] = f"unexpected {type(e).__name__}: {e}"
                continue
            self._done[cid] = (c.pid, prep)
            if changes:
                logger.bind(container=c.name).info("set up {}: {}", c.name, ", ".join(changes))
        return failed

    def release(self, preps: Mapping[str, ServerPrep], containers: Mapping[str, Container]) -> None:
        """Take away what dockerlb added to namespaces of containers that are
        no longer real servers needing it (stopped ones have no namespace)."""
        for cid in [cid for cid in self._done if cid not in preps]:
            pid, prep = self._done.pop(cid)
            c = containers.get(cid)
            if c is None or c.pid <= 0 or c.pid != pid or unreachable(pid):
                # Stopped (its namespace went with it) or restarted: nothing to undo.
                self._ns.forget(pid)
                continue
            self._clean(c, prep)

    def _clean(self, c: Container, prep: ServerPrep) -> None:
        empty = ServerPrep(prep.container, prep.address)
        try:
            changes = self._ns.converge(c.pid, empty, None, _docker_gateway(c, prep.address))
        except Exception as e:  # one container's clean-up, never the pass
            logger.error("could not clean up {}'s namespace: {}", c.name, e)
            return
        if changes:
            logger.bind(container=c.name).info("cleaned {}: {}", c.name, ", ".join(changes))

    def _sweep(self, preps: Mapping[str, ServerPrep], containers: Iterable[Container]) -> None:
        """Once, at start: what a previous run added to containers that no
        longer need it (the marks on addresses and routes say what)."""
        self._swept = True
        for c in containers:
            if c.id in preps or c.pid <= 0 or unreachable(c.pid) or not self._may_need(c):
                continue
            addr = next((a for n in c.networks.values() for a in (n.ipv4, n.ipv6) if a), None)
            if addr is not None:
                self._clean(c, ServerPrep(c.name, addr))

    def _may_need(self, c: Container) -> bool:
        """Whether this container's labels ever ask for namespace set-up."""
        return asks_namespace(parse_labels(c.name, c.labels, self._prefix).specs, self._masquerade)


def _docker_gateway(c: Container, addr: IPAddress) -> IPAddress | None:
    for net in c.networks.values():
        if net.of_family(addr.version) == addr:
            return net.gateway_of(addr.version)
    return None


def _elsewhere(c: Container) -> str | None:
    """Why a Swarm task's namespace is out of reach: it may run on another
    host, and dockerlb enters only namespaces on its own."""
    if not c.node:
        return None
    return (
        f"it is a Swarm task (on node {c.node}) and dockerlb cannot enter another host's namespaces; "
        "in Swarm mode use forward=nat with masquerade"
    )
