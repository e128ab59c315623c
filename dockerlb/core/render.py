"""Text, table and JSON views of the IPVS table, a plan and doctor's checks.

Pure: records in, strings (or rich renderables) out; nothing is printed here.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

from dockerlb.core.announce import Announcement, SpeakerState, decide
from dockerlb.core.labels import parse_labels
from dockerlb.core.model import (
    Check,
    Container,
    Forward,
    IPAddress,
    ServerStats,
    ServiceKey,
    Snapshot,
    addr_order,
)
from dockerlb.core.model import Table as ServiceTable
from dockerlb.core.plan import Op, op_kind
from dockerlb.core.sync import PairState

if TYPE_CHECKING:  # imported where used: only `status` on a terminal draws tables
    from rich.console import Group
    from rich.table import Table

# ipvsadm's names for the forwarding methods.
IPVSADM_FORWARD = {Forward.NAT: "Masq", Forward.DR: "Route", Forward.TUN: "Tunnel"}


@dataclass(frozen=True)
class Backend:
    """Who stands behind one real-server address, as Docker reports it."""

    container: str
    network: str
    health: str  # Docker's health status, "-" when the image has no HEALTHCHECK
    serving: bool  # running, not paused, and healthy where it has a check
    weights: Mapping[ServiceKey, int] = dataclasses.field(default_factory=dict)  # as labelled, per VIP
    node: str = ""  # the Swarm node that runs it (--swarm); "" on one engine


def owners(containers: Iterable[Container]) -> dict[IPAddress, tuple[Container, str]]:
    """Every address of the given containers: its container and network."""
    return {
        addr: (c, network)
        for c in containers
        for network, net in c.networks.items()
        for addr in (net.ipv4, net.ipv6)
        if addr is not None
    }


def backends(containers: Iterable[Container], prefix: str = "dockerlb.") -> dict[IPAddress, Backend]:
    """Every address of the given containers, mapped to who stands behind it."""
    out = {}
    weights: dict[str, dict[ServiceKey, int]] = {}  # per container, not per address
    for addr, (c, network) in owners(containers).items():
        if c.id not in weights:
            weights[c.id] = {s.key: s.weight for s in parse_labels(c.name, c.labels, prefix).specs}
        out[addr] = Backend(
            c.name, network, (c.health or "-") if c.running else "paused", c.serving, weights[c.id], c.node
        )
    return out


def server_state(key: ServiceKey, weight: int, backend: Backend | None, draining: bool = False) -> str:
    """What an operator needs to know about a real server right now
    (``draining``: the controller says its container drains)."""
    if backend is None:
        return "unknown"  # no labelled container has this address
    if weight == 0 and (draining or not backend.serving or backend.weights.get(key, 0) > 0):
        # The controller set weight 0 on a server labelled to take traffic:
        # it is stopping, unhealthy or failing its check, and leaves once drained.
        return "draining"
    if not backend.serving:
        return "not serving"  # paused or unhealthy: leaving the table
    return "serving" if weight > 0 else "weight 0"


def status_data(
    snapshot: Snapshot,
    owned_vips: frozenset[IPAddress],
    who: Mapping[IPAddress, Backend],
    drains: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One dict per service, managed ones first; ``who`` maps addresses to
    containers; ``drains``: the running controller's draining containers and
    the seconds each has left (None: no controller said)."""
    out = []
    keys = sorted(snapshot.table, key=lambda k: (k.vip not in owned_vips, *k.sort_key()))
    for key in keys:
        vs = snapshot.table[key]
        servers = []
        for ident, server in sorted(vs.servers.items(), key=lambda kv: (addr_order(kv[0][0]), kv[0][1])):
            backend = who.get(server.addr)
            left = (drains or {}).get(backend.container) if backend is not None else None
            if server.weight:
                left = None  # restored: no longer draining
            servers.append(
                {
                    "address": str(server.addr),
                    "port": server.port,
                    "forward": str(server.forward),
                    "weight": server.weight,
                    "upper_threshold": server.upper_threshold,
                    "lower_threshold": server.lower_threshold,
                    **_stats(snapshot.stats.get((key, ident))),
                    "container": backend.container if backend else "",
                    "node": backend.node if backend else "",
                    "network": backend.network if backend else "",
                    "health": backend.health if backend else "",
                    "state": server_state(key, server.weight, backend, left is not None),
                    # Seconds before the drain timeout removes it (the controller's clock).
                    "drain_left": None if left is None else round(left, 1),
                }
            )
        svc_stats = _stats(snapshot.service_stats.get(key))
        del svc_stats["active"], svc_stats["inactive"]
        out.append(
            {
                "protocol": str(key.proto),
                "vip": str(key.vip),
                "port": key.port,
                "scheduler": vs.service.scheduler,
                "persistence": vs.service.persistence,
                "managed": key.vip in owned_vips,
                **svc_stats,
                "servers": servers,
            }
        )
    return out


def pair_data(pair: PairState) -> dict[str, Any] | None:
    """The sync daemons and the role, for status; None when no daemon runs
    and none is asked for (not a director pair)."""
    if not pair.daemons and not pair.wanted:
        return None
    return {
        "role": pair.role or "-",
        "daemons": [
            {"state": d.state, "interface": d.interface, "sync_id": d.sync_id, "running": d in pair.daemons}
            for d in sorted(pair.daemons | pair.wanted)
        ],
    }


def pair_text(pair: dict[str, Any] | None) -> str:
    """One line for status's text and table views ("" when not a pair)."""
    if pair is None:
        return ""
    daemons = ", ".join(
        f"{d['state']} on {d['interface']} id {d['sync_id']} {'running' if d['running'] else 'NOT RUNNING'}"
        for d in pair["daemons"]
    )
    return f"Director pair: role {pair['role']}; sync daemons: {daemons}"


def announce_data(
    kernel: ServiceTable,
    minimums: Mapping[ServiceKey, int],
    present: Iterable[IPAddress],
    speaker: SpeakerState,
) -> dict[str, Any]:
    """With --announce, for status: each VIP "announced" (its route is in
    dockerlb's table: the speaker exports it) or why not, as the kernel's
    table says (status runs no checks: a server at weight > 0 serves);
    enough servers serving and no route: dockerlb is not ready (or not
    running). And the speaker's BGP sessions."""
    routed = set(present)
    vips = []
    decided: Mapping[IPAddress, Announcement] = decide(kernel, kernel, minimums, ready=True)
    for vip, a in decided.items():
        if vip in routed:
            state = "announced"
        elif a.announced:
            state = "withheld: not ready"
        else:
            state = str(a)
        vips.append({"vip": str(vip), "announced": vip in routed, "state": state, "serving": a.serving})
    sessions = [
        {"name": x.name, "state": x.state, "info": x.info, "established": x.established}
        for x in speaker.sessions
    ]
    return {
        "vips": vips,
        "speaker": {"version": speaker.version, "error": speaker.error, "sessions": sessions},
        "summary": speaker.summary(),
    }


def minimums(containers: Iterable[Container], prefix: str) -> dict[ServiceKey, int]:
    """Each service's dockerlb.announce_min as its oldest running container says (status's view)."""
    found: dict[ServiceKey, int] = {}
    for c in sorted(containers, key=lambda c: (c.created, c.name, c.id)):
        if c.running:
            for spec in parse_labels(c.name, c.labels, prefix).specs:
                found.setdefault(spec.key, spec.announce_min)
    return found


def announce_text(data: dict[str, Any] | None) -> str:
    """Status's lines for announcement ("" without --announce)."""
    if data is None:
        return ""
    lines = [f"Announcement: {data['summary']}"]
    lines += [f"  VIP {v['vip']}: {v['state']}" for v in data["vips"]]
    return "\n".join(lines)


def _stats(stats: ServerStats | None) -> dict[str, int]:
    return dataclasses.asdict(stats or ServerStats())


_SERVER_COLUMNS = (
    ("  -> RemoteAddress:Port", 30),
    ("Forward", 7),
    ("Weight", 6),
    ("ActiveConn", 10),
    ("InActConn", 9),
    ("CPS", 6),
    ("InBPS", 9),
    ("OutBPS", 9),
    ("Container", 16),
    ("Network", 16),
    ("Health", 9),
    ("State", 0),
)


def status_text(services: list[dict[str, Any]]) -> str:
    """Plain text for pipes: ipvsadm -Ln's layout plus rates and who each
    real server is. Services dockerlb does not own come last, apart."""
    lines = [
        "Prot LocalAddress:Port Scheduler Flags",
        _row(name for name, _ in _SERVER_COLUMNS),
    ]
    managed = [s for s in services if s["managed"]]
    foreign = [s for s in services if not s["managed"]]
    for svc in managed:
        lines.extend(_service_lines(svc))
    if foreign:
        lines.append("")
        lines.append("Not managed by dockerlb (left untouched):")
        for svc in foreign:
            lines.extend(_service_lines(svc))
    return "\n".join(lines)


def _service_lines(svc: dict[str, Any]) -> list[str]:
    flags = f" persistent {svc['persistence']}" if svc["persistence"] else ""
    lines = [f"{svc['protocol'].upper():<4} {_endpoint(svc['vip'], svc['port'])} {svc['scheduler']}{flags}"]
    lines.extend(_row(_server_cells(s)) for s in svc["servers"])
    return lines


def _server_cells(s: dict[str, Any]) -> list[str]:
    """One real server's row, in _SERVER_COLUMNS order (text and table alike)."""
    return [
        f"  -> {_endpoint(s['address'], s['port'])}",
        IPVSADM_FORWARD[Forward(s["forward"])],
        *(str(s[k]) for k in ("weight", "active", "inactive", "cps", "inbps", "outbps")),
        # In Swarm mode "task@node": web.2@worker-1.
        "@".join(filter(None, (s["container"], s.get("node")))) or "-",
        s["network"] or "-",
        s["health"] or "-",
        s["state"] + (f" ({s['drain_left']:.0f} s left)" if s.get("drain_left") is not None else ""),
    ]


def _row(cells: Iterable[str]) -> str:
    padded = (f"{cell:<{width}}" for cell, (_, width) in zip(cells, _SERVER_COLUMNS, strict=True))
    return " ".join(padded).rstrip()


def status_table(services: list[dict[str, Any]]) -> Group:
    """The same view as a table for a terminal (rich renders it)."""
    from rich.console import Group
    from rich.table import Table

    tables: list[Table] = []
    for title, group in (
        ("IPVS services managed by dockerlb", [s for s in services if s["managed"]]),
        ("Not managed by dockerlb (left untouched)", [s for s in services if not s["managed"]]),
    ):
        if not group and tables:
            continue
        table = Table(title=title, title_justify="left", expand=False)
        for name in (
            "Service / real server",
            "Sched / fwd",
            "Weight",
            "Active",
            "InAct",
            "CPS",
            "InBPS",
            "OutBPS",
            "Container",
            "Network",
            "Health",
            "State",
        ):
            numeric = name in ("Weight", "Active", "InAct", "CPS", "InBPS", "OutBPS")
            table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
        for svc in group:
            flags = f" persist {svc['persistence']}s" if svc["persistence"] else ""
            table.add_row(
                f"[bold]{svc['protocol'].upper()} {_endpoint(svc['vip'], svc['port'])}[/bold]",
                f"{svc['scheduler']}{flags}",
                "",
                "",
                "",
                str(svc["cps"]),
                str(svc["inbps"]),
                str(svc["outbps"]),
                "",
                "",
                "",
                "",
            )
            for s in svc["servers"]:
                table.add_row(*_server_cells(s))
        tables.append(table)
    return Group(*tables)


def doctor_text(checks: list[Check]) -> str:
    """One line per check; a failed one is followed by its fix. A failure no
    configured feature needs is a NOTE, not a FAIL."""
    lines = []
    for c in checks:
        mark = "PASS" if c.ok else ("FAIL" if c.required else "NOTE")
        lines.append(f"{mark}  {c.name}: {c.detail}")
        if not c.ok:
            lines.append(f"      fix: {c.fix}")
    return "\n".join(lines)


def doctor_json(checks: list[Check]) -> str:
    return json.dumps([dataclasses.asdict(c) for c in checks], indent=2)


def plan_text(ops: list[Op]) -> str:
    return "\n".join(op.describe() for op in ops) if ops else "nothing to change"


def plan_json(ops: list[Op]) -> str:
    return json.dumps([op_dict(op) for op in ops], indent=2)


def op_dict(op: Op) -> dict[str, Any]:
    return {"op": op_kind(op), **{f.name: _plain(getattr(op, f.name)) for f in dataclasses.fields(op)}}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (IPv4Address, IPv6Address)):
        return str(value)
    return value


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
