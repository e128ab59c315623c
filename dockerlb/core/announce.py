"""Which VIPs are announced to the network, and what the speaker says. Pure.

With ``--announce`` a VIP is announced (kept as a route in a routing table
of dockerlb's own, which the BGP speaker in the director's namespace
advertises: docs/several-hosts.md) while dockerlb is ready and
at least ``dockerlb.announce_min`` of its real servers serve: weight > 0 in
the desired table and in the kernel, counted once per server address across
the VIP's services. Otherwise it is withheld, and the reason says why.

The speaker is BIRD 2: ``parse_protocols`` reads its control socket's answer
to ``show protocols`` (its own text protocol: four-digit codes, ``-`` while
a reply goes on, a space on its last line, a leading space for a line of
the same code).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dockerlb.core.model import IPAddress, Table, addr_order


@dataclass(frozen=True, slots=True)
class Announcement:
    """One VIP's announcement as decided."""

    vip: IPAddress
    serving: int  # real servers (by address) at weight > 0 in the desired table and the kernel
    servers: int  # real servers (by address) the desired table lists for it, at any weight
    minimum: int  # dockerlb.announce_min: the most any of its services asks
    ready: bool  # dockerlb is ready (start-up sync done, a full pass recent, not stopping)

    @property
    def announced(self) -> bool:
        return self.ready and self.serving >= self.minimum

    def __str__(self) -> str:
        if self.announced:
            return "announced"
        if not self.ready:
            return "withheld: not ready"
        return withheld(self.serving, self.servers, self.minimum)


def withheld(serving: int, servers: int, minimum: int) -> str:
    """``withheld: 0 of 2 serving``; the minimum said when it is not 1."""
    needs = f" ({minimum} needed)" if minimum != 1 else ""
    return f"withheld: {serving} of {servers} serving{needs}"


def decide(desired: Table, kernel: Table, minimums: Mapping, ready: bool) -> dict[IPAddress, Announcement]:
    """Every VIP of the desired table, announced or withheld. ``minimums``:
    service key -> its announce_min (a VIP takes the largest of its
    services'; 1 when none says)."""
    live = {(k, s.ident) for k, vs in kernel.items() for s in vs.servers.values() if s.weight > 0}
    serving: dict[IPAddress, set[IPAddress]] = {}
    listed: dict[IPAddress, set[IPAddress]] = {}
    need: dict[IPAddress, int] = {}
    for key, vs in desired.items():
        listed.setdefault(key.vip, set())
        serving.setdefault(key.vip, set())
        need[key.vip] = max(need.get(key.vip, 0), minimums.get(key, 1))
        for s in vs.servers.values():
            listed[key.vip].add(s.addr)
            if s.weight > 0 and (key, s.ident) in live:
                serving[key.vip].add(s.addr)
    return {
        vip: Announcement(vip, len(serving[vip]), len(listed[vip]), need[vip], ready)
        for vip in sorted(listed, key=addr_order)
    }


def announced(decided: Mapping[IPAddress, Announcement]) -> frozenset[IPAddress]:
    return frozenset(vip for vip, a in decided.items() if a.announced)


@dataclass(frozen=True, slots=True)
class Route:
    """One announced VIP as a route in dockerlb's table: the VIP and its metric."""

    vip: IPAddress
    metric: int


def route_changes(
    wanted: Iterable[IPAddress], present: Iterable[Route], metric: int
) -> tuple[list[Route], list[Route]]:
    """(routes to add, routes to remove) to go from ``present`` (dockerlb's
    routes in its table) to one route per wanted VIP at ``metric``. A route
    at another metric (the setting changed) is removed and made again."""
    want = {Route(vip, metric) for vip in wanted}
    have = set(present)
    order = lambda r: (*addr_order(r.vip), r.metric)  # noqa: E731
    return sorted(want - have, key=order), sorted(have - want, key=order)


@dataclass(frozen=True, slots=True)
class Session:
    """One BGP protocol of the speaker, as ``show protocols`` lists it."""

    name: str
    state: str  # BIRD's protocol state: up, start, down, ...
    info: str  # for BGP: Established, Active, Connect, Idle, an error...

    @property
    def established(self) -> bool:
        return self.state == "up" and self.info.split()[:1] == ["Established"]

    def __str__(self) -> str:
        return f"{self.name} {self.info or self.state}".strip()


@dataclass(frozen=True, slots=True)
class SpeakerState:
    """What the speaker says: its version and BGP sessions, or why it cannot be asked."""

    version: str = ""  # "BIRD 2.0.12"; "" when it did not answer
    sessions: tuple[Session, ...] = ()
    error: str = ""  # why it could not be asked ("" when it answered)

    @property
    def up(self) -> bool:
        return not self.error

    @property
    def established(self) -> tuple[Session, ...]:
        return tuple(s for s in self.sessions if s.established)

    def problem(self) -> str:
        """What is wrong, as one line; "" when the speaker runs and every
        BGP session is established."""
        if self.error:
            return f"BGP speaker: {self.error}: no VIP reaches the network through this director"
        if not self.sessions:
            return f"BGP speaker {self.version}: no BGP session is configured"
        down = [s.name for s in self.sessions if not s.established]
        if not down:
            return ""
        # Names only: a session's info goes Active, Connect, Active... while
        # it is down, and this line is said once while it lasts.
        return (
            f"BGP speaker {self.version}: BGP session not established: {', '.join(down)}; "
            "the IPVS table stays as it is (see status)"
        )

    def summary(self) -> str:
        """One line for status."""
        if self.error:
            return f"speaker: {self.error}"
        return (
            f"speaker: {self.version}, {len(self.established)} of {len(self.sessions)} BGP sessions "
            "established" + "".join(f"; {s}" for s in self.sessions if not s.established)
        )


def parse_protocols(greeting: str, reply: str) -> SpeakerState:
    """BIRD's greeting (``0001 BIRD 2.0.12 ready.``) and its reply to
    ``show protocols``: the BGP protocols with their state and info."""
    version = greeting[5:].strip().removesuffix("ready.").strip() if greeting.startswith("0001") else ""
    sessions = []
    for line in reply.splitlines():
        # A line of the table: "1002-" first, then lines that go on with a space.
        if line.startswith(" "):
            text = line[1:]
        elif line.startswith("1002"):
            text = line[5:]
        else:
            continue
        fields = text.split(None, 5)
        if len(fields) >= 5 and fields[1] == "BGP":
            # Name Proto Table State Since Info: Since is one word (a time)
            # or two (a date and a time); Info is the rest.
            rest = text.split(None, 4)[4].split()
            since = 2 if len(rest) > 1 and ":" in rest[1] and "-" in rest[0] else 1
            sessions.append(Session(fields[0], fields[3], " ".join(rest[since:])))
    return SpeakerState(version, tuple(sessions))
