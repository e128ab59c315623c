"""An oracle for the label contract, written from the contract's text (the
label table in docs/labels.md and the labels module's docstring), not from the
parser: literal tables and patterns, so a test that asks "is this value
wrong?" never asks the code under test.

`wrong_on_its_own(label, value)` says whether a label is wrong whatever the
container's other labels say: an unknown key, a bad group name, or a value
the key can never take.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_network

PREFIX = "dockerlb."
SCHEDULERS = {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"}
NOT_A_VIP = [
    ip_network(n)
    for n in (
        *("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"),
        *("::/128", "::1/128", "fe80::/10", "ff00::/8", "::ffff:0:0/96"),
    )
]


def _whole(value: str, low: int, high: int) -> bool:
    return re.fullmatch(r"[0-9]+", value) is not None and len(value) <= 10 and low <= int(value) <= high


def _seconds(value: str) -> bool:
    m = re.fullmatch(r"([0-9]{1,4}(?:\.[0-9]{1,3})?)s?", value)
    return m is not None and 0.1 <= float(m[1]) <= 3600


def _vip(value: str) -> bool:
    if m := re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)", value):
        try:
            addr: IPv4Address | IPv6Address = IPv6Address(m[1])
        except ValueError:
            return False
    elif m := re.fullmatch(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3}):([0-9]+)", value):
        try:
            addr = IPv4Address(m[1])
        except ValueError:
            return False
    else:
        return False
    return _whole(m[2], 1, 65535) and not any(addr in n for n in NOT_A_VIP if n.version == addr.version)


RIGHT = {
    "vip": _vip,
    "port": lambda v: _whole(v, 1, 65535),
    "protocol": lambda v: v.lower() in {"tcp", "udp", "sctp"},
    "scheduler": lambda v: v.lower() in SCHEDULERS,
    "forward": lambda v: v.lower() in {"nat", "dr", "tun"},
    "weight": lambda v: _whole(v, 0, 65535),
    "persistence": lambda v: _whole(v, 0, 30 * 24 * 3600),
    "upper_threshold": lambda v: _whole(v, 0, 65535),
    "lower_threshold": lambda v: _whole(v, 0, 65535),
    "masquerade": lambda v: v.lower() in {"true", "false", "yes", "no", "on", "off", "1", "0"},
    "enable": lambda v: v.lower() in {"true", "false", "yes", "no", "on", "off", "1", "0"},
    "network": lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) is not None and len(v) <= 255,
    "check": lambda v: (
        v.lower() == "tcp"
        or (
            v[:5].lower() == "http:"
            and re.fullmatch(r"/[A-Za-z0-9._~!$&'()*+,;=:@/%?-]{0,1023}", v[5:]) is not None
        )
    ),
    "check_status": lambda v: _whole(v, 100, 599),
    "check_interval": _seconds,
    "check_timeout": _seconds,
    "check_rise": lambda v: _whole(v, 1, 100),
    "check_fall": lambda v: _whole(v, 1, 100),
    "announce_min": lambda v: _whole(v, 0, 65535),
}
KEYS = frozenset(RIGHT)


def wrong_on_its_own(label: str, value: str) -> bool:
    parts = label.removeprefix(PREFIX).split(".")
    if parts == ["owner"]:  # the container's group: top level only
        return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value) is None
    if len(parts) == 2 and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", parts[0]):
        return True
    if len(parts) not in (1, 2) or parts[-1] not in KEYS:
        return True
    return not RIGHT[parts[-1]](value)
