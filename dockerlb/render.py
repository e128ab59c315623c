"""Text and JSON views of the table and of a plan. Pure: strings in, strings out."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from dockerlb.model import Forward, IPAddress, Snapshot, addr_order
from dockerlb.plan import Op

# ipvsadm's names for the forwarding methods.
IPVSADM_FORWARD = {Forward.NAT: "Masq", Forward.DR: "Route", Forward.TUN: "Tunnel"}


def status_data(
    snapshot: Snapshot, owned_vips: frozenset[IPAddress], names: Mapping[IPAddress, str]
) -> list[dict[str, Any]]:
    """One dict per service, managed ones first; ``names`` maps addresses to containers."""
    out = []
    keys = sorted(snapshot.table, key=lambda k: (k.vip not in owned_vips, *k.sort_key()))
    for key in keys:
        vs = snapshot.table[key]
        servers = []
        for ident, server in sorted(vs.servers.items(), key=lambda kv: (addr_order(kv[0][0]), kv[0][1])):
            stats = snapshot.stats.get((key, ident))
            servers.append(
                {
                    "address": str(server.addr),
                    "port": server.port,
                    "forward": str(server.forward),
                    "weight": server.weight,
                    "active": stats.active if stats else 0,
                    "inactive": stats.inactive if stats else 0,
                    "container": names.get(server.addr, ""),
                }
            )
        out.append(
            {
                "protocol": str(key.proto),
                "vip": str(key.vip),
                "port": key.port,
                "scheduler": vs.service.scheduler,
                "persistence": vs.service.persistence,
                "managed": key.vip in owned_vips,
                "servers": servers,
            }
        )
    return out


def status_text(services: list[dict[str, Any]]) -> str:
    """ipvsadm -Ln's layout, plus the container behind each real server."""
    lines = [
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn Container",
    ]
    for svc in services:
        vip = _endpoint(svc["vip"], svc["port"])
        flags = f" persistent {svc['persistence']}" if svc["persistence"] else ""
        managed = "" if svc["managed"] else "  (not managed by dockerlb)"
        lines.append(f"{svc['protocol'].upper():<4} {vip} {svc['scheduler']}{flags}{managed}")
        for s in svc["servers"]:
            rs = _endpoint(s["address"], s["port"])
            fwd = IPVSADM_FORWARD[Forward(s["forward"])]
            lines.append(
                f"  -> {rs:<28} {fwd:<7} {s['weight']:<6} {s['active']:<10} {s['inactive']:<9} "
                f"{s['container']}".rstrip()
            )
    return "\n".join(lines)


def plan_text(ops: list[Op]) -> str:
    return "\n".join(op.describe() for op in ops) if ops else "nothing to change"


def plan_json(ops: list[Op]) -> str:
    return json.dumps([op_dict(op) for op in ops], indent=2)


def op_dict(op: Op) -> dict[str, Any]:
    kind = "".join("_" + c.lower() if c.isupper() else c for c in type(op).__name__).lstrip("_")
    return {"op": kind, **{f.name: _plain(getattr(op, f.name)) for f in dataclasses.fields(op)}}


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
