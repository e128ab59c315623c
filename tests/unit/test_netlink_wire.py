"""A dump's parts read from datagrams built here by hand (netlink_wire.dump_parts)."""

import errno
import struct

import pytest

from dockerlb.adapters.netlink_wire import DumpFailed, dump_parts, errors_in

pytestmark = pytest.mark.unit
NLMSG_ERROR, NLMSG_DONE, FAMILY = 2, 3, 0x1C


def msg(kind: int, seq: int, payload: bytes) -> bytes:
    body = payload + b"\0" * (-len(payload) % 4)
    return struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, 0) + body


def done(seq: int, code: int = 0) -> bytes:
    return msg(NLMSG_DONE, seq, struct.pack("=i", -code))


def reader(*datagrams: bytes):
    queue = list(datagrams)
    return lambda: queue.pop(0)


def test_the_parts_of_one_dump_come_back_in_order_and_leftovers_of_other_requests_are_skipped():
    first = msg(FAMILY, 6, b"old!") + msg(FAMILY, 7, b"a") + msg(FAMILY, 7, b"bc")
    second = msg(NLMSG_ERROR, 5, struct.pack("=i", 0) + b"\0" * 16) + msg(FAMILY, 7, b"defg") + done(7)
    assert dump_parts(reader(first, second), 7) == [b"a", b"bc", b"defg"]


def test_a_dump_the_kernel_ends_with_an_error_raises_it():
    with pytest.raises(DumpFailed) as failed:
        dump_parts(reader(msg(FAMILY, 9, b"x") + done(9, errno.EBUSY)), 9)
    assert failed.value.code == errno.EBUSY


def test_an_error_answer_ends_a_dump_too_and_an_ack_is_no_error():
    nack = msg(NLMSG_ERROR, 4, struct.pack("=i", -errno.ENOENT) + b"\0" * 16)
    with pytest.raises(DumpFailed):
        dump_parts(reader(nack), 4)
    ack = msg(NLMSG_ERROR, 4, struct.pack("=i", 0) + b"\0" * 16)
    assert dump_parts(reader(msg(FAMILY, 4, b"p") + ack), 4) == [b"p"]
    assert errors_in(nack + ack) == [(4, errno.ENOENT), (4, 0)]
