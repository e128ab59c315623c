"""Container labels -> service specs, or one ``LabelProblem`` per bad label.

Pure: no Docker, no kernel. Never raises on input; every problem is returned
as a value naming the container, the label and what is wrong with it.

Contract (version 1), with the prefix ``dockerlb.`` by default::

    dockerlb.vip          IPv4:PORT or [IPv6]:PORT (opts the container in)
    dockerlb.port         container port to send to (default: the VIP's port)
    dockerlb.protocol     tcp | udp (default tcp)
    dockerlb.scheduler    an IPVS scheduler name (default wlc)
    dockerlb.forward      nat | dr | tun (default nat)
    dockerlb.weight       0..65535 (default 1)
    dockerlb.persistence  seconds, 0 = off (default 0)
    dockerlb.masquerade   forward=nat only: true = SNAT to the director's
                          address; false = keep the client's address (the
                          server's default route goes via the director);
                          default: the controller's --masquerade setting
    dockerlb.network      Docker network whose address is used
    dockerlb.enable       false opts out (default true)
    dockerlb.<name>.<key> the same keys in a named group (one more VIP)

Named groups are independent: they do not inherit the unnamed group's keys,
so what a group does can be read from its own labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from dockerlb.model import SCHEDULERS, Forward, IPAddress, Proto, ServiceKey

KEYS = frozenset(
    {
        "vip",
        "port",
        "protocol",
        "scheduler",
        "forward",
        "weight",
        "persistence",
        "masquerade",
        "network",
        "enable",
    }
)
MAX_WEIGHT = 65535
# The kernel keeps persistence as seconds * HZ in 32 bits; 30 days fits any HZ.
MAX_PERSISTENCE = 30 * 24 * 3600
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_DIGITS = re.compile(r"[0-9]{1,10}")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class LabelProblem:
    container: str
    label: str
    reason: str

    def __str__(self) -> str:
        return f"container {self.container!r}: label {self.label!r}: {self.reason}; container skipped"


@dataclass(frozen=True)
class Spec:
    """One VIP a container asks to be a real server of."""

    group: str  # "" for the unnamed group
    key: ServiceKey
    target_port: int
    scheduler: str = "wlc"
    forward: Forward = Forward.NAT
    weight: int = 1
    persistence: int = 0
    masquerade: bool | None = None  # None: the controller's setting
    network: str | None = None
    network_label: str = ""  # the label to name when the network is the problem


@dataclass(frozen=True)
class ParsedLabels:
    specs: tuple[Spec, ...] = ()
    problems: tuple[LabelProblem, ...] = ()


class _Invalid(Exception):
    """Internal: one label's value is wrong; becomes a LabelProblem."""


def parse_labels(container: str, labels: Mapping[str, str], prefix: str = "dockerlb.") -> ParsedLabels:
    """Parse one container's labels. No side effects; never raises on input."""
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    problems: list[LabelProblem] = []
    for label, value in sorted(labels.items()):
        if not label.startswith(prefix):
            continue
        parts = label[len(prefix) :].split(".")
        if len(parts) == 1 and parts[0] in KEYS:
            groups.setdefault("", {})[parts[0]] = (label, value)
        elif len(parts) == 2 and _GROUP.fullmatch(parts[0]) and parts[1] in KEYS:
            groups.setdefault(parts[0], {})[parts[1]] = (label, value)
        else:
            problems.append(
                LabelProblem(container, label, f"unknown label; known keys: {', '.join(sorted(KEYS))}")
            )

    top_enable = groups.get("", {}).get("enable")
    if top_enable is not None:
        try:
            if not _parse_bool(top_enable[1]):
                return ParsedLabels()  # opted out: nothing else is looked at
        except _Invalid as e:
            problems.append(LabelProblem(container, top_enable[0], str(e)))

    specs: list[Spec] = []
    for group, entries in sorted(groups.items()):
        spec = _parse_group(container, prefix, group, entries, problems)
        if spec is not None:
            specs.append(spec)
    return ParsedLabels(tuple(specs), tuple(problems))


def _parse_group(
    container: str,
    prefix: str,
    group: str,
    entries: dict[str, tuple[str, str]],
    problems: list[LabelProblem],
) -> Spec | None:
    label_of = f"{prefix}{group}." if group else prefix
    before = len(problems)
    values: dict[str, object] = {}
    for key, (label, raw) in entries.items():
        if group == "" and key == "enable":
            continue  # handled by the caller
        try:
            values[key] = _PARSERS[key](raw)
        except _Invalid as e:
            problems.append(LabelProblem(container, label, str(e)))

    if "vip" not in entries:
        # Nothing to attach the other keys to: each of them is the problem.
        for key, (label, _) in sorted(entries.items()):
            if group == "" and key == "enable":
                continue
            if key in values:
                problems.append(
                    LabelProblem(container, label, f"applies to no service: {label_of}vip is not set")
                )
        return None
    if values.get("enable") is False:
        return None
    if len(problems) > before or "vip" not in values:
        return None

    vip, vip_port = values["vip"]  # type: ignore[misc]
    port = values.get("port", vip_port)
    forward = values.get("forward", Forward.NAT)
    if forward in (Forward.DR, Forward.TUN) and port != vip_port:
        problems.append(
            LabelProblem(
                container,
                entries["port"][0],
                f"forward={forward} sends packets unchanged, so the container port must equal "
                f"the VIP port {vip_port}, not {port}",
            )
        )
        return None
    if forward is not Forward.NAT and vip.version == 6:
        problems.append(
            LabelProblem(
                container,
                entries["forward"][0],
                f"forward={forward} is IPv4 only in dockerlb so far; use forward=nat for IPv6 VIP {vip}",
            )
        )
        return None
    if forward is not Forward.NAT and "masquerade" in values:
        problems.append(
            LabelProblem(
                container,
                entries["masquerade"][0],
                f"applies to forward=nat only; with forward={forward} the server answers the client itself",
            )
        )
        return None
    return Spec(
        group=group,
        key=ServiceKey(values.get("protocol", Proto.TCP), vip, vip_port),  # type: ignore[arg-type]
        target_port=port,  # type: ignore[arg-type]
        scheduler=values.get("scheduler", "wlc"),  # type: ignore[arg-type]
        forward=forward,  # type: ignore[arg-type]
        weight=values.get("weight", 1),  # type: ignore[arg-type]
        persistence=values.get("persistence", 0),  # type: ignore[arg-type]
        masquerade=values.get("masquerade"),  # type: ignore[arg-type]
        network=values.get("network"),  # type: ignore[arg-type]
        network_label=f"{label_of}network",
    )


def _parse_int(raw: str, low: int, high: int, what: str) -> int:
    text = raw.strip()
    if not _DIGITS.fullmatch(text):
        raise _Invalid(f"{what} must be a whole number {low}..{high}, got {raw!r}")
    value = int(text)
    if not low <= value <= high:
        raise _Invalid(f"{what} must be {low}..{high}, got {value}")
    return value


def _parse_port(raw: str) -> int:
    return _parse_int(raw, 1, 65535, "port")


def _parse_vip(raw: str) -> tuple[IPAddress, int]:
    text = raw.strip()
    addr: IPAddress
    try:
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise _Invalid(f"expected [IPv6]:PORT, got {raw!r}")
            addr = IPv6Address(host)
        else:
            host, sep, port = text.rpartition(":")
            if not sep:
                raise _Invalid(f"expected IPv4:PORT or [IPv6]:PORT, got {raw!r}")
            if ":" in host:
                raise _Invalid(f"write an IPv6 VIP in brackets, [addr]:port; got {raw!r}")
            addr = IPv4Address(host)
    except ValueError as e:  # AddressValueError is a ValueError
        raise _Invalid(f"not an IP address in {raw!r}: {e}") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_link_local:
        raise _Invalid(f"{addr} cannot be a VIP: it must be a unicast, non-loopback address")
    if isinstance(addr, IPv4Address) and addr == IPv4Address("255.255.255.255"):
        raise _Invalid(f"{addr} cannot be a VIP: it is the broadcast address")
    return addr, _parse_port(port)


def _parse_choice(raw: str, choices: frozenset[str], what: str) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise _Invalid(f"unknown {what} {raw!r}; choose one of {', '.join(sorted(choices))}")
    return value


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _Invalid(f"expected true or false, got {raw!r}")


def _parse_network(raw: str) -> str:
    if not raw.strip():
        raise _Invalid("network name is empty")
    return raw.strip()


_PARSERS = {
    "vip": _parse_vip,
    "port": _parse_port,
    "protocol": lambda raw: Proto(_parse_choice(raw, frozenset(p.value for p in Proto), "protocol")),
    "scheduler": lambda raw: _parse_choice(raw, SCHEDULERS, "scheduler"),
    "forward": lambda raw: Forward(_parse_choice(raw, frozenset(f.value for f in Forward), "forward method")),
    "weight": lambda raw: _parse_int(raw, 0, MAX_WEIGHT, "weight"),
    "persistence": lambda raw: _parse_int(raw, 0, MAX_PERSISTENCE, "persistence (seconds)"),
    "network": _parse_network,
    "masquerade": _parse_bool,
    "enable": _parse_bool,
}
