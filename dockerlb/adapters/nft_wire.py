"""Elements added to and removed from the SNAT sets of the director's nft
table, as nfnetlink messages (one batch), without running ``nft``; and
the namespace's ruleset generation (``generation``), which tells a full
pass whether anything changed the ruleset since dockerlb last wrote it.

Why: an event that makes or ends a NAT service changes one element of one
set. Running the ``nft`` program for that (a process, its libraries, its
cache of the whole ruleset) cost more than the rest of the event's pass in
the UML guest (issue 31). The table, its sets and its rules are still made
by ``nft`` (``Director.sync_masquerade``: at the first pass, at every full
pass and whenever this fails); this only changes elements of sets that
exist. The layout is what ``nft --debug=mnl add element`` sends
(include/uapi/linux/netfilter/nf_tables.h): a batch (begin, one
NEWSETELEM or DELSETELEM per set, end), each element a concatenated key,
address then port, each field padded to 4 bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
from collections.abc import Iterable

from dockerlb.adapters.netlink_wire import (
    HEADER,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_REQUEST,
    attributes,
    errors_in,
    messages,
)
from dockerlb.adapters.netns import entered
from dockerlb.core.model import ServiceKey

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
# The ruleset's generation: asked with GETGEN, answered with NEWGEN, whose
# NFTA_GEN_ID is a 32-bit counter (network order) the kernel moves by one
# at every committed transaction in the namespace, whoever made it.
NFT_MSG_NEWGEN, NFT_MSG_GETGEN, NFTA_GEN_ID = 15, 16, 1
NFPROTO_INET = 1
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
# NFTA_SET_ELEM_LIST_{TABLE,SET,ELEMENTS}; NFTA_LIST_ELEM; NFTA_SET_ELEM_KEY; NFTA_DATA_VALUE
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS, _LIST_ELEM, _ELEM_KEY, _DATA_VALUE = 1, 2, 3, 1, 1, 1
_NFGEN = struct.Struct("=BBH")  # family, version, resource id (big-endian)
ANSWER_WAIT = 30.0  # seconds


class Refused(Exception):
    """The kernel refused the batch (nothing of it took); ``code`` is its errno."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _attr(kind: int, data: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)


def _nest(kind: int, data: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, data)


def key_of(key: ServiceKey) -> bytes:
    """A service as the sets' concatenated key: its VIP, then its port in
    network order padded to 4 bytes."""
    return key.vip.packed + struct.pack("!H", key.port) + b"\0\0"


def elements(
    verb: int, table: str, sets: dict[str, list[ServiceKey]], first_seq: int
) -> tuple[bytes, list[int]]:
    """One batch changing the elements of each named set of inet ``table``
    (``verb``: NFT_MSG_NEWSETELEM or NFT_MSG_DELSETELEM); the sequence
    numbers of its element messages, each acknowledged."""
    seq = itertools.count(first_seq)
    subsys = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
    out = [HEADER.pack(16 + len(subsys), NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next(seq), 0) + subsys]
    seqs = []
    for name, keys in sets.items():
        if not keys:
            continue
        listed = b"".join(_nest(_LIST_ELEM, _nest(_ELEM_KEY, _attr(_DATA_VALUE, key_of(k)))) for k in keys)
        body = (
            _NFGEN.pack(NFPROTO_INET, 0, 0)
            + _attr(_LIST_TABLE, table.encode() + b"\0")
            + _attr(_LIST_SET, name.encode() + b"\0")
            + _nest(_LIST_ELEMENTS, listed)
        )
        kind = (NFNL_SUBSYS_NFTABLES << 8) | verb
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if verb == NFT_MSG_NEWSETELEM else 0)
        s = next(seq)
        seqs.append(s)
        out.append(HEADER.pack(16 + len(body), kind, flags, s, 0) + body)
    out.append(HEADER.pack(16 + len(subsys), NFNL_MSG_BATCH_END, NLM_F_REQUEST, next(seq), 0) + subsys)
    return b"".join(out), seqs


def generation_request(seq: int) -> bytes:
    """GETGEN: no attribute, the family unspecified."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    return (
        HEADER.pack(16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, seq, 0)
        + body
    )


def generation_of(data: bytes, seq: int) -> int | None:
    """NFTA_GEN_ID of the NEWGEN answer to ``seq`` in a datagram (None: not in it)."""
    for kind, got, payload in messages(data):
        if got != seq or kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            continue
        for attr, offset, length in attributes(payload, _NFGEN.size):
            if attr & NLA_TYPE_MASK == NFTA_GEN_ID and length >= 8:
                return int(struct.unpack_from("!I", payload, offset + 4)[0])
    return None


def continued(known: int | None, before: int | None, after: int | None) -> int | None:
    """The generation the ruleset is known to be as dockerlb left it at,
    after one ``nft`` run or batch of its own: ``before`` and ``after`` it.
    Known only if nothing else wrote since the last known one (``before``
    is it) and the run made at most its own one transaction (``after`` is
    ``before`` or one more: a read or a refused batch commits nothing)."""
    if known is None or before is None or after is None or before != known:
        return None
    return after if (after - before) % (1 << 32) in (0, 1) else None


class SetElements:
    """A NETLINK_NETFILTER socket in the director's namespace, for batches
    of set elements."""

    def __init__(self, netns_path: str | None) -> None:
        with entered(netns_path):  # the socket stays in that namespace
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._answers = select.poll()
        self._answers.register(self._sock, select.POLLIN)
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def change(
        self, table: str, added: dict[str, list[ServiceKey]], removed: dict[str, list[ServiceKey]]
    ) -> None:
        """Add and remove these elements (per set name): one batch each way,
        removals first. Raises Refused (that batch took nothing) or OSError."""
        for verb, sets in ((NFT_MSG_DELSETELEM, removed), (NFT_MSG_NEWSETELEM, added)):
            if not any(sets.values()):
                continue
            first = next(self._seq) & 0x3FFFFFFF
            for _ in range(len(sets) + 2):
                next(self._seq)
            batch, seqs = elements(verb, table, sets, first)
            self._sock.send(batch)
            self._await(seqs)

    def generation(self) -> int:
        """The namespace's ruleset generation now. Raises OSError, TimeoutError."""
        seq = next(self._seq) & 0x3FFFFFFF
        self._sock.send(generation_request(seq))
        while True:  # each receive waits at most ANSWER_WAIT (``_receive``)
            data = self._receive()
            found = generation_of(data, seq)
            if found is not None:
                return found
            for got, code in errors_in(data):
                if got == seq and code:
                    raise OSError(code, f"the ruleset's generation: {os.strerror(code)}")

    def _await(self, seqs: Iterable[int]) -> None:
        waiting = set(seqs)
        while waiting:
            for seq, code in errors_in(self._receive()):
                if seq in waiting:
                    if code:
                        raise Refused(code)
                    waiting.discard(seq)

    def _receive(self) -> bytes:
        with contextlib.suppress(BlockingIOError):
            return self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
        if not self._answers.poll(ANSWER_WAIT * 1000):
            raise TimeoutError(f"no answer to a set element batch within {ANSWER_WAIT:.0f} s")
        return self._sock.recv(1 << 16)
