"""Netlink framing shared by the adapters that read the kernel's dumps
themselves (ipvs_wire for IPVS, address_dump for the director's addresses):
message headers, error answers, a dump's parts, and the one walk over a
message's attributes."""

from __future__ import annotations

import struct
from collections.abc import Callable

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port id
_ATTR = struct.Struct("=HH")  # an attribute's length (its header included) and type
NLA_TYPE_MASK = 0x3FFF  # an attribute's type without the nested / byte-order flags


def attributes(data: bytes, offset: int = 0) -> list[tuple[int, int, int]]:
    """(type as sent, offset of its header, length) of each attribute from
    ``offset`` on, in order; a malformed one ends the walk."""
    found = []
    end = len(data) - 4
    while offset <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < 4 or offset + length > len(data):
            break
        found.append((kind, offset, length))
        offset += (length + 3) & ~3
    return found


def messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in a datagram."""
    out = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, seq, _ = HEADER.unpack_from(data, offset)
        out.append((kind, seq, data[offset + 16 : offset + length]))
        offset += (length + 3) & ~3 or len(data)
    return out


def error_of(payload: bytes) -> int:
    """The errno an NLMSG_ERROR or NLMSG_DONE carries (0: none)."""
    return -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0


def errors_in(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of every NLMSG_ERROR in a netlink datagram;
    errno 0 is an acknowledgement."""
    return [(seq, error_of(payload)) for kind, seq, payload in messages(data) if kind == NLMSG_ERROR]


class DumpFailed(Exception):
    """The kernel ended a dump with an error; ``code`` is its errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def dump_parts(receive: Callable[[], bytes], seq: int) -> list[bytes]:
    """The payloads of the dump answering request ``seq``, read with
    ``receive`` until its NLMSG_DONE; what answers other requests (left over
    from an earlier one) is skipped. Raises DumpFailed for an error answer."""
    parts: list[bytes] = []
    while True:
        for kind, s, payload in messages(receive()):
            if s != seq:
                continue
            if kind in (NLMSG_ERROR, NLMSG_DONE):
                if code := error_of(payload):
                    raise DumpFailed(code)
                return parts
            parts.append(payload)
