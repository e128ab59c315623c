"""The director's addresses in one RTM_GETADDR dump, read with struct.

Why not pyroute2's ``get_addr()`` for this read: pyroute2 0.9's blocking
API steps its event loop once per message and decodes each ifaddrmsg into
a full record; with 1,000 VIPs on the director's interface a resync read
them twice (its VIPs, its own addresses), most of what a no-op resync spent
outside the listing and the IPVS read (bench/passes.py,
``director_reads_alone``). pyroute2 still does every write, the links and
the routes. The message layout is include/uapi/linux/if_addr.h."""

from __future__ import annotations

import itertools
import select
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from dockerlb.adapters.netlink_wire import HEADER, NLM_F_DUMP, NLM_F_REQUEST, attributes, dump_parts
from dockerlb.adapters.netns import entered
from dockerlb.core.model import IPAddress

RTM_GETADDR = 22
IFA_ADDRESS = 1
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_SIZES = {socket.AF_INET: 4, socket.AF_INET6: 16}
ANSWER_WAIT = 30.0  # seconds


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    index: int  # the interface's
    address: IPAddress
    prefixlen: int


class AddressReader:
    """A NETLINK_ROUTE socket in a network namespace, for dumping addresses."""

    def __init__(self, netns_path: str | None) -> None:
        with entered(netns_path):  # the socket stays in that namespace
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._answers = select.poll()  # poll: the descriptor may be numbered past 1024
        self._answers.register(self._sock, select.POLLIN)
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def addresses(self) -> list[InterfaceAddress]:
        """Every IPv4 and IPv6 address in the namespace (IFA_ADDRESS: the
        address itself, or a point-to-point link's peer). Raises OSError,
        or DumpFailed when the kernel answers with an error."""
        seq = next(self._seq) & 0x7FFFFFFF
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        self._sock.send(HEADER.pack(16 + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        return [a for part in dump_parts(self._receive, seq) if (a := address_of(part)) is not None]

    def _receive(self) -> bytes:
        if not self._answers.poll(ANSWER_WAIT * 1000):
            raise TimeoutError(f"no answer to an address dump within {ANSWER_WAIT:.0f} s")
        return self._sock.recv(1 << 16)


def address_of(payload: bytes) -> InterfaceAddress | None:
    """One RTM_NEWADDR message's address; None for a family other than
    IPv4/IPv6 or one without IFA_ADDRESS."""
    family, prefixlen, _, _, index = _IFADDRMSG.unpack_from(payload)
    size = _SIZES.get(family)
    if size is None:
        return None
    for kind, offset, length in attributes(payload, _IFADDRMSG.size):
        if kind == IFA_ADDRESS and length - 4 == size:
            raw = payload[offset + 4 : offset + length]
            return InterfaceAddress(index, IPv4Address(raw) if size == 4 else IPv6Address(raw), prefixlen)
    return None
