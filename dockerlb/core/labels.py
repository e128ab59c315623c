"""Container labels -> service specs, or one ``LabelProblem`` per bad label.

Pure: no Docker, no kernel. Never raises on input; every problem is returned
as a value naming the container, the label and what is wrong with it.

Contract (version 1), with the prefix ``dockerlb.`` by default::

    dockerlb.vip          IPv4:PORT or [IPv6]:PORT (opts the container in)
    dockerlb.port         container port to send to (default: the VIP's port)
    dockerlb.protocol     tcp | udp | sctp (default tcp)
    dockerlb.scheduler    an IPVS scheduler name (default wlc)
    dockerlb.forward      nat | dr | tun (default nat)
    dockerlb.weight       0..65535 (default 1)
    dockerlb.persistence  seconds, 0 = off (default 0)
    dockerlb.upper_threshold  connections (active + inactive) at which the
                          server gets no new one, 0..65535, 0 = no limit
    dockerlb.lower_threshold  connections below which it gets new ones
                          again, 0..upper (default 0: the kernel's 3/4 of upper)
    dockerlb.masquerade   forward=nat only: true = SNAT to the director's
                          address; false = keep the client's address (the
                          server's default route goes via the director);
                          default: the controller's --masquerade setting
    dockerlb.network      Docker network whose address is used
    dockerlb.check        tcp | http:/PATH: dockerlb's own health check,
                          run from the director; the container is a real
                          server only while it passes (default: none)
    dockerlb.check_status expected HTTP status (default: any 2xx or 3xx)
    dockerlb.check_interval / check_timeout   seconds (default 2 / 1)
    dockerlb.check_rise / check_fall  passes / failures in a row that make
                          the server up / down (default 2 / 3)
    dockerlb.announce_min with --announce: the VIP is announced (a route
                          for the BGP speaker) while at least this many of
                          its real servers serve, 0..65535 (default 1)
    dockerlb.enable       false opts out (default true)
    dockerlb.owner        the group that owns the container's VIPs when it is
                          not a compose service (compose's project label wins)
    dockerlb.<name>.<key> the same keys in a named group (one more VIP)

Values are read exactly as written: no surrounding spaces; numbers in ASCII
digits; names (protocol, scheduler, forward, tcp/http, true/false) in any
case. A VIP is a unicast address for use on a network: not loopback,
link-local, multicast, broadcast, 0.0.0.0/8, 240.0.0.0/4, IPv4-mapped, and
with no IPv6 scope.

Named groups are independent: they do not inherit the unnamed group's keys,
so what a group does can be read from its own labels.

Limits (``Limits``): a value or label name longer than ``chars``, more than
``groups`` named groups, or more than ``vips`` VIPs is one problem and the
container is skipped whole, before anything else is parsed. Problems quote a
value only in part (``shown``), so a huge label never makes a huge log line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import cast

from dockerlb.core.model import SCHEDULERS, Forward, HealthCheck, IPAddress, Proto, ServiceKey

KEYS = frozenset(
    {
        "vip",
        "port",
        "protocol",
        "scheduler",
        "forward",
        "weight",
        "persistence",
        "upper_threshold",
        "lower_threshold",
        "masquerade",
        "network",
        "enable",
        "check",
        "check_status",
        "check_interval",
        "check_timeout",
        "check_rise",
        "check_fall",
        "announce_min",
    }
)
_CHECK_KEYS = frozenset(k for k in KEYS if k.startswith("check_"))
MAX_WEIGHT = 65535
# IPVS keeps the thresholds as u32, ipvsadm takes 0..65535: so do we.
MAX_THRESHOLD = 65535
# The kernel keeps persistence as seconds * HZ in 32 bits; 30 days fits any HZ.
MAX_PERSISTENCE = 30 * 24 * 3600
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
# Values are read exactly as written: no surrounding spaces, ASCII digits
# only (no sign, no "_", no exponent), names case-insensitive. A lenient
# parse turns a typo into a setting nobody meant.
_DIGITS = re.compile(r"[0-9]{1,10}")
_SECONDS = re.compile(r"[0-9]{1,4}(\.[0-9]{1,3})?s?")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NETWORK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
# An HTTP check's path: the characters RFC 3986 allows in a path and query.
_HTTP_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/%?-]{0,1023}")
_THIS_NETWORK = IPv4Network("0.0.0.0/8")
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# How much of a bad value a problem quotes.
SHOWN_CHARS = 60


@dataclass(frozen=True, slots=True)
class Limits:
    """What one container may ask for (settings --max-label-chars,
    --max-groups, --max-vips, --max-labels)."""

    chars: int = 1024  # of a label's name or value
    groups: int = 16  # named groups
    vips: int = 16  # VIPs, the unnamed group's included
    labels: int = 256  # labels under the prefix, known or not


def has_prefix(labels: Iterable[str], prefix: str) -> bool:
    """Whether any of these label names is under the prefix: what makes a
    container (or a Swarm service) one dockerlb looks at."""
    return any(k.startswith(prefix) for k in labels)


def shown(text: str) -> str:
    """``text`` quoted, cut to SHOWN_CHARS characters (saying how long it was)."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


@dataclass(frozen=True, slots=True)
class LabelProblem:
    container: str
    label: str
    reason: str

    def __str__(self) -> str:
        return f"container {self.container!r}: label {shown(self.label)}: {self.reason}; container skipped"


@dataclass(frozen=True, slots=True)
class Spec:
    """One VIP a container asks to be a real server of."""

    group: str  # "" for the unnamed group
    key: ServiceKey
    target_port: int
    scheduler: str = "wlc"
    forward: Forward = Forward.NAT
    weight: int = 1
    persistence: int = 0
    upper_threshold: int = 0  # connections; 0: no limit
    lower_threshold: int = 0  # 0: the kernel's default (3/4 of upper)
    masquerade: bool | None = None  # None: the controller's setting
    network: str | None = None
    check: HealthCheck | None = None
    announce_min: int = 1  # serving real servers the VIP needs to be announced (--announce)
    network_label: str = ""  # the label to name when the network is the problem
    vip_label: str = ""  # the label to name when the VIP is refused


@dataclass(frozen=True, slots=True)
class ParsedLabels:
    specs: tuple[Spec, ...] = ()
    problems: tuple[LabelProblem, ...] = ()
    owner: str | None = None  # the dockerlb.owner label's value, if set


class _Invalid(Exception):
    """Internal: one label's value is wrong; becomes a LabelProblem."""


def parse_labels(
    container: str, labels: Mapping[str, str], prefix: str = "dockerlb.", limits: Limits = Limits()
) -> ParsedLabels:
    """Parse one container's labels. No side effects; never raises on input."""
    ours = sorted((label, value) for label, value in labels.items() if label.startswith(prefix))
    if over := _over_limits(container, prefix, ours, limits):
        return ParsedLabels(problems=(over,))
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    problems: list[LabelProblem] = []
    owner: str | None = None
    for label, value in ours:
        parts = label[len(prefix) :].split(".")
        if parts == ["owner"]:
            if _OWNER.fullmatch(value):
                owner = value
            else:
                problems.append(
                    LabelProblem(
                        container,
                        label,
                        f"expected a name (letters, digits, _ . -; 1-63), got {shown(value)}",
                    )
                )
        elif len(parts) == 1 and parts[0] in KEYS:
            groups.setdefault("", {})[parts[0]] = (label, value)
        elif len(parts) == 2 and _GROUP.fullmatch(parts[0]) and parts[1] in KEYS:
            groups.setdefault(parts[0], {})[parts[1]] = (label, value)
        else:
            problems.append(
                LabelProblem(container, label, f"unknown label; known keys: owner, {', '.join(sorted(KEYS))}")
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
    return ParsedLabels(tuple(specs), tuple(problems), owner)


class LabelCache:
    """``parse_labels``, remembered per container id.

    Docker fixes a container's labels when it creates it, so a controller
    need parse them once, not on every pass (at 10,000 containers the
    re-parsing was about a third of every pass:
    bench/results/event_pass-20261203T132742.json). An entry is used only for
    the same name (problems name the container; a rename keeps the id) and
    equal labels (a record that says otherwise is parsed afresh). A memo of a
    pure function: what it answers is what ``parse_labels`` would.

    Containers with the same labels under the prefix (a compose service's
    replicas) share one parse when it found no problem: then nothing in it
    depends on the container (only problems name it), and one record per
    service instead of per container is most of this memo's memory at
    10,000 containers (bench/results/rss-*.json, issue 16).
    """

    def __init__(self, prefix: str = "dockerlb.", limits: Limits = Limits()) -> None:
        self.prefix = prefix
        self.limits = limits
        self._parsed: dict[str, tuple[str, Mapping[str, str], ParsedLabels]] = {}
        # The prefix's labels, sorted -> their parse, when it found no problem.
        self._shared: dict[tuple[tuple[str, str], ...], ParsedLabels] = {}

    def parse(self, container_id: str, name: str, labels: Mapping[str, str]) -> ParsedLabels:
        hit = self._parsed.get(container_id)
        if hit is not None and hit[0] == name and (hit[1] is labels or hit[1] == labels):
            if hit[1] is not labels:
                # A new record of the same container (a full pass lists them
                # anew): keep its labels, not the old record's, alive.
                self._parsed[container_id] = (name, labels, hit[2])
            return hit[2]
        ours = tuple(sorted(item for item in labels.items() if item[0].startswith(self.prefix)))
        parsed = self._shared.get(ours)
        if parsed is None:
            parsed = parse_labels(name, labels, self.prefix, self.limits)
            if not parsed.problems:
                self._shared[ours] = parsed
        self._parsed[container_id] = (name, labels, parsed)
        return parsed

    def keep_only(self, container_ids: Iterable[str]) -> None:
        """Forget every other container (a full pass: what exists now, no
        more), and every shared parse none of them uses (``forget`` leaves
        those to this: they are few, and bounded by the labels seen since)."""
        keep = set(container_ids)
        self._parsed = {k: v for k, v in self._parsed.items() if k in keep}
        used = {id(parsed) for _, _, parsed in self._parsed.values()}
        self._shared = {k: v for k, v in self._shared.items() if id(v) in used}

    def forget(self, container_ids: Iterable[str]) -> None:
        """Forget these containers (an event pass: the ones that went)."""
        for cid in container_ids:
            self._parsed.pop(cid, None)

    def __len__(self) -> int:
        return len(self._parsed)


def _over_limits(
    container: str, prefix: str, labels: list[tuple[str, str]], limits: Limits
) -> LabelProblem | None:
    """The first limit these labels exceed, as the one problem to report."""
    if len(labels) > limits.labels:
        # Before anything else: 40,000 unknown labels would be 40,000 lines.
        return LabelProblem(
            container,
            f"{prefix}*",
            f"{len(labels)} labels under the prefix; at most {limits.labels} (--max-labels)",
        )
    for label, value in labels:
        if len(label) > limits.chars:
            return LabelProblem(
                container, label, f"label name is {len(label)} characters; at most {limits.chars}"
            )
        if len(value) > limits.chars:
            return LabelProblem(container, label, f"value is {len(value)} characters; at most {limits.chars}")
    named = sorted(
        {label[len(prefix) :].split(".")[0] for label, _ in labels if label.count(".") > prefix.count(".")}
    )
    if len(named) > limits.groups:
        return LabelProblem(
            container,
            f"{prefix}{named[limits.groups]}.*",
            f"{len(named)} named groups; at most {limits.groups} (--max-groups)",
        )
    vips = [label for label, _ in labels if label.endswith(".vip") or label == f"{prefix}vip"]
    if len(vips) > limits.vips:
        return LabelProblem(
            container, vips[limits.vips], f"{len(vips)} VIPs; at most {limits.vips} (--max-vips)"
        )
    return None


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

    vip, vip_port = cast(tuple[IPAddress, int], values["vip"])
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
    if problem := _thresholds_problem(container, label_of, entries, values):
        problems.append(problem)
        return None
    check = _check_of(container, label_of, entries, values, problems)
    if len(problems) > before:
        return None
    return Spec(
        group=group,
        key=ServiceKey(values.get("protocol", Proto.TCP), vip, vip_port),  # type: ignore[arg-type]
        target_port=port,  # type: ignore[arg-type]
        scheduler=values.get("scheduler", "wlc"),  # type: ignore[arg-type]
        forward=forward,  # type: ignore[arg-type]
        weight=values.get("weight", 1),  # type: ignore[arg-type]
        persistence=values.get("persistence", 0),  # type: ignore[arg-type]
        upper_threshold=values.get("upper_threshold", 0),  # type: ignore[arg-type]
        lower_threshold=values.get("lower_threshold", 0),  # type: ignore[arg-type]
        masquerade=values.get("masquerade"),  # type: ignore[arg-type]
        network=values.get("network"),  # type: ignore[arg-type]
        check=check,
        announce_min=values.get("announce_min", 1),  # type: ignore[arg-type]
        network_label=f"{label_of}network",
        vip_label=entries["vip"][0],
    )


def _thresholds_problem(
    container: str, label_of: str, entries: dict[str, tuple[str, str]], values: dict[str, object]
) -> LabelProblem | None:
    """The kernel refuses a lower threshold above the upper one (0 upper: no limit)."""
    lower = cast(int, values.get("lower_threshold", 0))
    upper = cast(int, values.get("upper_threshold", 0))
    if lower <= upper:
        return None
    label = entries["lower_threshold"][0]
    if "upper_threshold" not in values:
        why = (
            f"applies only with {label_of}upper_threshold set: it is the count below which a "
            "server at its upper threshold takes new connections again"
        )
    else:
        why = f"lower threshold {lower} is above upper threshold {upper}" + (
            " (0: no limit)" if upper == 0 else ""
        )
    return LabelProblem(container, label, why)


def _check_of(
    container: str,
    label_of: str,
    entries: dict[str, tuple[str, str]],
    values: dict[str, object],
    problems: list[LabelProblem],
) -> HealthCheck | None:
    """The group's health check, or None; a check_* label without a check,
    or check_status on a tcp check, is a problem."""
    kind = values.get("check")
    if kind is None:
        for key in sorted(_CHECK_KEYS & values.keys()):
            problems.append(
                LabelProblem(container, entries[key][0], f"applies to no check: {label_of}check is not set")
            )
        return None
    kind_name, path = cast(tuple[str, str], kind)
    if kind_name == "tcp" and "check_status" in values:
        problems.append(
            LabelProblem(container, entries["check_status"][0], "applies to http checks only, not tcp")
        )
        return None
    default = HealthCheck(kind_name)
    check = HealthCheck(
        kind_name,
        path,
        status=values.get("check_status"),  # type: ignore[arg-type]
        interval=values.get("check_interval", default.interval),  # type: ignore[arg-type]
        timeout=values.get("check_timeout", default.timeout),  # type: ignore[arg-type]
        rise=values.get("check_rise", default.rise),  # type: ignore[arg-type]
        fall=values.get("check_fall", default.fall),  # type: ignore[arg-type]
    )
    if check.timeout > check.interval:
        problems.append(
            LabelProblem(
                container,
                entries.get("check_timeout", entries.get("check_interval", entries["check"]))[0],
                f"check timeout {check.timeout:g} s is longer than its interval {check.interval:g} s",
            )
        )
        return None
    return check


def _parse_check(raw: str) -> tuple[str, str]:
    if raw.lower() == "tcp":
        return ("tcp", "/")
    if raw[:5].lower() == "http:":
        path = raw[len("http:") :]
        if not _HTTP_PATH.fullmatch(path):
            raise _Invalid(
                "an http check needs a path starting with / in URL characters (no spaces, ASCII), "
                f"got {shown(raw)}"
            )
        return ("http", path)
    raise _Invalid(f"expected tcp or http:/PATH, got {shown(raw)}")


def _parse_seconds(raw: str) -> float:
    if not _SECONDS.fullmatch(raw):
        raise _Invalid(f"expected seconds (e.g. 2 or 0.5), got {shown(raw)}")
    value = float(raw.removesuffix("s"))
    if not 0.1 <= value <= 3600:
        raise _Invalid(f"seconds must be 0.1..3600, got {shown(raw)}")
    return value


def _parse_int(raw: str, low: int, high: int, what: str) -> int:
    if not _DIGITS.fullmatch(raw):
        raise _Invalid(f"{what} must be a whole number {low}..{high}, got {shown(raw)}")
    value = int(raw)
    if not low <= value <= high:
        raise _Invalid(f"{what} must be {low}..{high}, got {value}")
    return value


def _parse_port(raw: str) -> int:
    return _parse_int(raw, 1, 65535, "port")


def _parse_vip(raw: str) -> tuple[IPAddress, int]:
    addr: IPAddress
    try:
        if raw.startswith("["):
            host, sep, port = raw[1:].partition("]:")
            if not sep:
                raise _Invalid(f"expected [IPv6]:PORT, got {shown(raw)}")
            if "%" in host:
                raise _Invalid(f"a VIP cannot carry a scope (%zone), got {shown(raw)}")
            addr = IPv6Address(host)
        else:
            host, sep, port = raw.rpartition(":")
            if not sep:
                raise _Invalid(f"expected IPv4:PORT or [IPv6]:PORT, got {shown(raw)}")
            if ":" in host:
                raise _Invalid(f"write an IPv6 VIP in brackets, [addr]:port; got {shown(raw)}")
            addr = IPv4Address(host)
    except ValueError:  # AddressValueError is a ValueError
        raise _Invalid(f"not an IP address in {shown(raw)}") from None
    if why := _special(addr):
        raise _Invalid(f"{addr} cannot be a VIP: it is {why}")
    return addr, _parse_port(port)


def _special(addr: IPAddress) -> str:
    """What makes an address unfit for a VIP ("" when nothing does)."""
    if addr.is_unspecified:
        return "the unspecified address"
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, IPv4Address):
        if addr == IPv4Address("255.255.255.255"):
            return "the broadcast address"
        if addr in _THIS_NETWORK:
            return "in 0.0.0.0/8 (this network)"
        if addr.is_reserved:
            return "reserved (240.0.0.0/4)"
    elif addr.ipv4_mapped is not None:
        return "an IPv4-mapped IPv6 address; write the IPv4 address"
    return ""


def _parse_choice(raw: str, choices: frozenset[str], what: str) -> str:
    value = raw.lower()
    if value not in choices:
        raise _Invalid(f"unknown {what} {shown(raw)}; choose one of {', '.join(sorted(choices))}")
    return value


def _parse_bool(raw: str) -> bool:
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _Invalid(f"expected true or false, got {shown(raw)}")


def _parse_network(raw: str) -> str:
    if not raw:
        raise _Invalid("network name is empty")
    if not _NETWORK.fullmatch(raw):
        raise _Invalid(f"not a Docker network name (letters, digits, _ . -), got {shown(raw)}")
    return raw


_PARSERS = {
    "vip": _parse_vip,
    "port": _parse_port,
    "protocol": lambda raw: Proto(_parse_choice(raw, frozenset(p.value for p in Proto), "protocol")),
    "scheduler": lambda raw: _parse_choice(raw, SCHEDULERS, "scheduler"),
    "forward": lambda raw: Forward(_parse_choice(raw, frozenset(f.value for f in Forward), "forward method")),
    "weight": lambda raw: _parse_int(raw, 0, MAX_WEIGHT, "weight"),
    "persistence": lambda raw: _parse_int(raw, 0, MAX_PERSISTENCE, "persistence (seconds)"),
    "upper_threshold": lambda raw: _parse_int(raw, 0, MAX_THRESHOLD, "upper threshold (connections)"),
    "lower_threshold": lambda raw: _parse_int(raw, 0, MAX_THRESHOLD, "lower threshold (connections)"),
    "network": _parse_network,
    "masquerade": _parse_bool,
    "enable": _parse_bool,
    "check": _parse_check,
    "check_status": lambda raw: _parse_int(raw, 100, 599, "HTTP status"),
    "check_interval": _parse_seconds,
    "check_timeout": _parse_seconds,
    "check_rise": lambda raw: _parse_int(raw, 1, 100, "rise count"),
    "check_fall": lambda raw: _parse_int(raw, 1, 100, "fall count"),
    "announce_min": lambda raw: _parse_int(raw, 0, MAX_WEIGHT, "announce_min (serving real servers)"),
}
