"""The director's addresses in one RTM_GETADDR dump, read with struct; and
host addresses (VIPs) added many to a send (``add_hosts``).

Why not pyroute2's ``get_addr()`` for this read: pyroute2 0.9's blocking
API steps its event loop once per message and decodes each ifaddrmsg into
a full record; with 1,000 VIPs on the director's interface a resync read
them twice (its VIPs, its own addresses), most of what a no-op resync spent
outside the listing and the IPVS read (bench/passes.py,
``director_reads_alone``). pyroute2 still does the other writes, the links and
the routes. The message layout is include/uapi/linux/if_addr.h.

Adding addresses: a cold start puts 1,000 VIPs on the interface, and
pyroute2 made each its own request (with a link lookup and a link set
before it, in ``Director.add_vip``): ``add_hosts`` sends them
``BATCH`` to a send, each acknowledged, as ``ip addr add`` words them."""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from dockerlb.adapters.netlink_wire import (
    HEADER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    attributes,
    dump_parts,
    errors_in,
)
from dockerlb.adapters.netns import entered
from dockerlb.core.model import IPAddress

RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
BATCH = 256  # addresses per send; their acknowledgements fit the receive buffer
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_NLA = struct.Struct("=HH")  # an attribute's header, for the requests add_hosts writes
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

    def add_hosts(self, index: int, addresses: Sequence[IPAddress]) -> list[int]:
        """Each address as a host address (/32, /128) of interface ``index``:
        the errno of each (0: added), in order. Raises OSError when the
        socket itself fails."""
        codes: list[int] = []
        for start in range(0, len(addresses), BATCH):
            chunk = addresses[start : start + BATCH]
            first = next(self._seq) & 0x7FFFFFFF
            seqs = [first + i for i in range(len(chunk))]
            for _ in seqs[1:]:
                next(self._seq)
            self._sock.send(b"".join(_new_host(index, a, s) for a, s in zip(chunk, seqs, strict=True)))
            answered: dict[int, int] = {}
            while len(answered) < len(seqs):
                for seq, code in errors_in(self._receive()):
                    if first <= seq <= seqs[-1]:  # anything else answers an earlier request
                        answered[seq] = code
            codes += [answered[s] for s in seqs]
        return codes

    def _receive(self) -> bytes:
        # Answered before send returned, as a rule: no wait then (see ipvs.py).
        with contextlib.suppress(BlockingIOError):
            return self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
        if not self._answers.poll(ANSWER_WAIT * 1000):
            raise TimeoutError(f"no answer to an address dump within {ANSWER_WAIT:.0f} s")
        return self._sock.recv(1 << 16)


def _new_host(index: int, address: IPAddress, seq: int) -> bytes:
    """RTM_NEWADDR for ``address`` as a host address of ``index``
    (IFA_LOCAL and IFA_ADDRESS both, as iproute2 words it), acknowledged."""
    raw = address.packed
    attr = _NLA.pack(4 + len(raw), IFA_LOCAL) + raw + _NLA.pack(4 + len(raw), IFA_ADDRESS) + raw
    body = _IFADDRMSG.pack(_FAMILIES[address.version], address.max_prefixlen, 0, 0, index) + attr
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return HEADER.pack(16 + len(body), RTM_NEWADDR, flags, seq, 0) + body


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
