"""What an event pass must rebuild: the containers and services an event
touches, and the last pass's desired table with that part replaced.

Pure bookkeeping: no Docker, no kernel. The desired table of a service
depends on the containers that label it; a container's real servers (its
``ServerPrep``, whether it is skipped whole) on every service it labels.
So the scope of an event is the triggered containers' services, old and
new, closed over that container <-> service graph: ``build_desired`` over
the scope's containers gives exactly those services' entries, and the rest
of the last pass's table still holds (issue 16).

Some results depend on containers outside that graph; then ``Index.update``
answers None and the pass builds everything (see there why each case).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from dockerlb.core.desired import Desired, group_of
from dockerlb.core.labels import LabelCache
from dockerlb.core.model import Container, IPAddress, ServiceKey
from dockerlb.core.ownership import Claim


@dataclass(frozen=True)
class Scope:
    """An event pass's part of the table."""

    ids: frozenset[str]  # containers whose entries are rebuilt (gone ones included)
    keys: frozenset[ServiceKey]  # services rebuilt and planned
    names: frozenset[str]  # those containers' names, old and new (problems name them)
    # Services outside the scope on its VIPs: a VIP (its address on the
    # director) serves every port's service, not the scope's alone.
    neighbours: frozenset[ServiceKey] = frozenset()
    # The containers the pass is about (``ids`` is them and what they pull in).
    roots: frozenset[str] = frozenset()
    # Services patched, not rebuilt: built over the roots and each one's
    # head alone (``Index.update``), the roots' servers put in the last
    # table's entry (``merged``). Empty: every service in ``keys`` is built
    # over all its containers.
    patched: frozenset[ServiceKey] = frozenset()
    # Per patched service, where the roots' servers were (address, port).
    dropped: Mapping[ServiceKey, frozenset[tuple[IPAddress, int]]] = field(default_factory=dict)
    root_names: frozenset[str] = frozenset()  # the roots' names, old and new


@dataclass(frozen=True, slots=True)
class _Entry:
    """One container's part of the index. Tuples of distinct items, not
    frozensets: one per container, and at 10,000 containers a frozenset's
    hash table was most of the index's memory (issue 16)."""

    name: str
    # The services it claims, running or not (a stopped container keeps its
    # group's claim: ownership.py), and the port it serves each on.
    keys: tuple[ServiceKey, ...]
    ports: tuple[int, ...]
    addresses: tuple[IPAddress, ...]  # its own and its networks' gateways
    own: tuple[IPAddress, ...] = ()  # its own alone
    group: str = ""
    running: bool = False
    # Two of its label groups name one service (``ports`` has the first's
    # port alone): it may be two servers of it, never patched.
    repeats: bool = False


_NONE = _Entry("", (), (), ())
_T = TypeVar("_T")


class Index:
    """Container id -> the services it claims; service -> the containers
    claiming it (running or not); and, counted over every container, the
    addresses they use and the VIPs running ones label."""

    def __init__(self, labels: LabelCache) -> None:
        self._labels = labels
        self._records: dict[str, Container] = {}  # what each entry was made from
        self._entries: dict[str, _Entry] = {}
        self._by_key: dict[ServiceKey, set[str]] = {}
        self._by_vip: dict[IPAddress, set[ServiceKey]] = {}  # the services of each labelled VIP
        self._addresses: Counter[IPAddress] = Counter()
        self._vips: Counter[IPAddress] = Counter()
        self._groups: dict[ServiceKey, Counter[str]] = {}  # per service, its claimants' groups

    def sync(self, containers: Mapping[str, Container]) -> None:
        """Index exactly these (a full pass). A container whose record is
        unchanged keeps its entry: re-indexing all 10,000 hashed every
        address again, a fifth of a full pass. Its new record replaces the
        old one, though: a full pass lists every container anew, and the old
        records (labels, networks, ...) were kept alive by this index alone,
        a second copy of every container after each resync (issue 16)."""
        for cid in [cid for cid in self._records if cid not in containers]:
            self._put(cid, None)
        for cid, c in containers.items():
            old = self._records.get(cid)
            if old is None or not (old is c or old == c):
                self._put(cid, c)
            elif old is not c:
                self._records[cid] = c

    def update(
        self, roots: Iterable[str], containers: Mapping[str, Container], base: Desired | None = None
    ) -> Scope | None:
        """Index ``roots`` as ``containers`` holds them now (absent: gone), and
        say what an event pass over them must rebuild; None when only a full
        build gives the right answer. With ``base`` (the last pass's desired
        table), services the roots only join or leave are patched (see
        ``_patchable``): the scope is the roots and those services' heads,
        not every container on them (a start into a service of 10,000
        replicas built all 10,000: issue 31)."""
        roots = set(roots)
        before = {cid: self._entries.get(cid, _NONE) for cid in roots}
        records = {cid: self._records.get(cid) for cid in roots}
        for cid in roots:
            self._put(cid, containers.get(cid))
        after = {cid: self._entries.get(cid, _NONE) for cid in roots}
        root_keys = {k for e in (*before.values(), *after.values()) for k in e.keys}
        moved = {a for e in (*before.values(), *after.values()) for a in e.addresses}
        names = {e.name for e in (*before.values(), *after.values())} - {""}
        plain = not any(e.repeats for e in (*before.values(), *after.values()))
        if base is not None and plain and self._patchable(roots, root_keys, records, base):
            ids = roots | {base.heads[k] for k in root_keys}
            dropped = _dropped(root_keys, before.values())
            return self._scope(roots, ids, root_keys, moved, before, names, root_keys, dropped)
        ids, keys = self._closure(roots, root_keys)
        return self._scope(roots, ids, keys, moved, before, names)

    def widen(self, scope: Scope) -> Scope | None:
        """A patched scope built over every container of its services instead."""
        ids, keys = self._closure(set(scope.roots), set(scope.keys))
        names = {n for n in scope.names if n in scope.root_names}
        moved = {a for cid in scope.roots for a in self._entries.get(cid, _NONE).addresses}
        return self._scope(set(scope.roots), ids, keys, moved, {}, set(scope.root_names), names=names)

    def keys_of(self, ids: Iterable[str]) -> set[ServiceKey]:
        """The services these containers claim."""
        return {k for cid in ids for k in self._entries.get(cid, _NONE).keys}

    def _scope(
        self,
        roots: set[str],
        ids: set[str],
        keys: set[ServiceKey],
        moved: set[IPAddress],
        before: Mapping[str, _Entry],
        root_names: set[str],
        patched: set[ServiceKey] | None = None,
        dropped: Mapping[ServiceKey, frozenset[tuple[IPAddress, int]]] | None = None,
        names: set[str] | None = None,
    ) -> Scope | None:
        vips = {k.vip for k in keys}
        # A VIP is refused when it is some container's (or a gateway's)
        # address (desired.py, ``_addresses``). The scope's own build sees
        # only the scope's addresses: a scope VIP that is anyone's address
        # now or was a moved one's, or an address that came or went being a
        # VIP anyone labels, changes answers outside the scope or needs
        # addresses from outside it. Rare (a misconfiguration); a full build.
        if any(v in self._addresses or v in moved for v in vips) or any(a in self._vips for a in moved):
            return None
        neighbours = {k for v in vips for k in self._by_vip.get(v, ())} - keys
        names = (names or set()) | {e.name for e in before.values()}
        names |= {self._entries[cid].name for cid in ids if cid in self._entries}
        return Scope(
            frozenset(ids),
            frozenset(keys),
            frozenset(names - {""}),
            frozenset(neighbours),
            frozenset(roots),
            frozenset(patched or ()),
            dropped or {},
            frozenset(root_names),
        )

    def _patchable(
        self,
        roots: set[str],
        keys: set[ServiceKey],
        records: Mapping[str, Container | None],
        base: Desired,
    ) -> bool:
        """Whether the roots' services can be patched: each has a head (the
        container that set it, not a root, still indexed) that sorts before
        every root, before and after (so the roots change neither its
        settings nor who is oldest), and had no warning (a conflict or two
        claims of one server: those depend on every container of it). What
        only the build can tell is checked after it (``passes``)."""
        if not keys:
            return False
        warned = set(base.warned)
        heads = []
        for key in keys:
            head = base.heads.get(key)
            if head is None or head in roots or key in warned or head not in self._records:
                return False
            heads.append(_order(self._records[head]))
        last_head = max(heads)
        for cid in roots:
            for c in (records.get(cid), self._records.get(cid)):
                if c is not None and _order(c) <= last_head:
                    return False
        return True

    def claimants(self, keys: Iterable[ServiceKey]) -> dict[ServiceKey, Counter[str]]:
        """Per service, how many existing containers of each group claim it
        (counted as containers come and go: not by walking its claimants)."""
        return {k: Counter(self._groups.get(k, ())) for k in keys}

    def claimed(self) -> set[ServiceKey]:
        """Every service some existing container claims."""
        return set(self._by_key)

    def group_at(self, keys: Iterable[ServiceKey]) -> dict[Claim, str]:
        """Who claims each of these services at which address and port: its group."""
        found: dict[Claim, str] = {}
        for key in keys:
            for cid in self._by_key.get(key, ()):
                entry = self._entries[cid]
                port = entry.ports[entry.keys.index(key)]
                for addr in entry.own:
                    found.setdefault((key, (addr, port)), entry.group)
        return found

    def _closure(self, ids: set[str], keys: set[ServiceKey]) -> tuple[set[str], set[ServiceKey]]:
        """Every container on these services, and every service of those, until nothing new."""
        ids, keys = set(ids), set(keys)
        todo = list(keys)
        while todo:
            for cid in self._by_key.get(todo.pop(), ()):
                if cid in ids:
                    continue
                ids.add(cid)
                for key in [k for k in self._entries[cid].keys if k not in keys]:
                    keys.add(key)
                    todo.append(key)
        return ids, keys

    def _put(self, cid: str, c: Container | None) -> None:
        old = self._entries.pop(cid, _NONE)
        self._addresses.subtract(old.addresses)
        if old.running:
            self._vips.subtract(k.vip for k in old.keys)
        for key in old.keys:
            self._by_key[key].discard(cid)
            groups = self._groups[key]
            groups[old.group] -= 1
            if groups[old.group] <= 0:
                del groups[old.group]
            if not self._by_key[key]:
                del self._by_key[key]
                del self._groups[key]
                self._by_vip[key.vip].discard(key)
                if not self._by_vip[key.vip]:
                    del self._by_vip[key.vip]
        if c is None:
            self._records.pop(cid, None)
            self._drop_zeros(old)
            return
        self._records[cid] = c
        parsed = self._labels.parse(c.id, c.name, c.labels)
        ports: dict[ServiceKey, int] = {}
        for spec in parsed.specs:
            ports.setdefault(spec.key, spec.target_port)
        repeats = len(ports) < len(parsed.specs)
        own = _distinct(a for net in c.networks.values() for a in (net.ipv4, net.ipv6) if a is not None)
        new = _Entry(
            c.name,
            tuple(ports),
            tuple(ports.values()),
            _addresses_of(c),
            own,
            group_of(c.labels, parsed.owner),
            c.running,
            repeats,
        )
        self._entries[cid] = new
        self._addresses.update(new.addresses)
        # Only running containers' labels make services (build_desired skips
        # the others); every container's addresses are taken.
        if new.running:
            self._vips.update(k.vip for k in new.keys)
        for key in new.keys:
            self._by_key.setdefault(key, set()).add(cid)
            self._groups.setdefault(key, Counter())[new.group] += 1
            self._by_vip.setdefault(key.vip, set()).add(key)
        self._drop_zeros(old)

    def _drop_zeros(self, old: _Entry) -> None:
        """A count at zero means absent (``in`` must say no)."""
        vips = {k.vip for k in old.keys} if old.running else set()
        for counter, items in ((self._addresses, old.addresses), (self._vips, vips)):
            for item in items:
                if counter[item] <= 0:
                    del counter[item]


def _order(c: Container) -> tuple[str, str, str]:
    """Where a container sorts among claimants (``build_desired``'s order: oldest first)."""
    return (c.created, c.name, c.id)


def _dropped(
    keys: Iterable[ServiceKey], entries: Iterable[_Entry]
) -> dict[ServiceKey, frozenset[tuple[IPAddress, int]]]:
    """Per service, where these (old) entries could have had a server: each
    own address of the service's family, at the port it served."""
    found: dict[ServiceKey, set[tuple[IPAddress, int]]] = {k: set() for k in keys}
    for e in entries:
        for key, port in zip(e.keys, e.ports, strict=True):
            found[key].update((a, port) for a in e.own if a.version == key.vip.version)
    return {k: frozenset(v) for k, v in found.items()}


def _addresses_of(c: Container) -> tuple[IPAddress, ...]:
    return _distinct(
        a
        for net in c.networks.values()
        for a in (net.ipv4, net.ipv6, net.gateway4, net.gateway6)
        if a is not None
    )


def _distinct(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))


def merged(base: Desired, part: Desired, scope: Scope) -> Desired:
    """``base`` (the last pass's desired table) with the scope's part
    replaced by ``part`` (``build_desired`` over the scope's containers).
    Whole maps are copied once, never rebuilt key by key: a copy reuses the
    keys' hashes, and hashing an address is most of what a loop would cost;
    what did not change is kept as it was (the SNAT set, the draining
    names: the same objects, which the director and the next pass compare
    by identity first)."""
    keys, ids, names = scope.keys, scope.ids, scope.names
    table, owners, heads = dict(base.table), dict(base.owners), dict(base.heads)
    minimums = dict(base.announce_min)
    for key in keys:
        table.pop(key, None)
        owners.pop(key, None)
        heads.pop(key, None)
        minimums.pop(key, None)
    # Only the scope's services: a patched scope's heads bring theirs too,
    # each with no server but the head's.
    table.update((k, v) for k, v in part.table.items() if k in keys)
    owners.update((k, v) for k, v in part.owners.items() if k in keys)
    heads.update((k, v) for k, v in part.heads.items() if k in keys)
    minimums.update((k, v) for k, v in part.announce_min.items() if k in keys)
    preps = base.preps
    if part.preps or any(cid in preps for cid in ids):
        preps = dict(preps)
        for cid in ids:
            preps.pop(cid, None)
        preps.update(part.preps)
    snat = base.snat_keys
    part_snat = frozenset(k for k in part.snat_keys if k in keys)
    if frozenset(k for k in keys if k in snat) != part_snat:
        snat = (snat - keys) | part_snat
    draining = base.draining
    if part.draining or any(n in draining for n in names):
        draining = frozenset(n for n in draining if n not in names) | part.draining
    kept = [(k, w) for k, w in zip(base.warned, base.warnings, strict=True) if k not in keys]
    kept += [(k, w) for k, w in zip(part.warned, part.warnings, strict=True) if k in keys]
    return Desired(
        table,
        tuple(p for p in base.problems if p.container not in names) + part.problems,
        tuple(w for _, w in kept),
        preps,
        draining,
        tuple(t for t in base.checks if t.container_id not in ids) + part.checks,
        owners,
        tuple(k for k, _ in kept),
        snat,
        minimums,
        heads,
    )
