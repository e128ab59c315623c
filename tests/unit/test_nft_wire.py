"""The SNAT sets' elements as nfnetlink messages (nft_wire.py), byte for
byte as ``nft --debug=mnl add element inet dockerlb tcp4 { 10.0.0.5 . 80 }``
sends them (nft 1.0.6; nft adds the set's id, which the kernel needs only
for a set made in the same batch). The host tier checks them against a
real kernel (tests/host/test_netns_and_director.py)."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from dockerlb.adapters.netlink_wire import messages
from dockerlb.adapters.nft_wire import (
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    continued,
    elements,
    generation_of,
    generation_request,
    key_of,
)
from dockerlb.core.model import Proto, ServiceKey

pytestmark = pytest.mark.unit
WEB = ServiceKey(Proto.TCP, ip_address("10.0.0.5"), 80)


def test_an_added_element_is_a_batch_of_begin_newsetelem_end_as_nft_sends_it():
    batch, seqs = elements(NFT_MSG_NEWSETELEM, "dockerlb", {"tcp4": [WEB]}, 7)
    (begin, _, subsys), (kind, seq, body), (end, _, _) = messages(batch)
    assert (begin, end, subsys) == (0x10, 0x11, bytes([0, 0, 0, 10]))  # NFNL_SUBSYS_NFTABLES
    assert (kind, seqs) == (0x0A0C, [seq]) and seq == 8
    flags = struct.unpack_from("=H", batch, 20 + 6)[0]  # the second message's header
    assert flags == 0x1 | 0x4 | 0x400  # request, acknowledged, create
    assert (
        body
        == bytes.fromhex(
            "01000000"  # inet, version 0
            "0d000100" + "646f636b65726c6200000000"  # table "dockerlb"
            "09000200" + "7463703400000000"  # set "tcp4"
            "18000380"
            "14000180"
            "10000180"
            "0c000100"  # elements / element / key / value
            "0a000005"
            "00500000"  # 10.0.0.5, port 80, padded to 4 bytes
        )
    )


def test_a_removal_is_delsetelem_and_a_v6_key_is_its_address_then_its_padded_port():
    batch, seqs = elements(NFT_MSG_DELSETELEM, "dockerlb", {"tcp4": [WEB], "udp6": []}, 1)
    assert [kind for kind, _, _ in messages(batch)] == [0x10, 0x0A0E, 0x11]  # no message for an empty set
    assert len(seqs) == 1
    v6 = ServiceKey(Proto.UDP, ip_address("fd00::1"), 53)
    assert key_of(v6) == ip_address("fd00::1").packed + bytes([0, 53, 0, 0])


def test_a_generation_request_is_getgen_with_no_attribute():
    assert generation_request(5) == bytes.fromhex(
        "14000000"  # length 20
        "100a"  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN (16)
        "0100"  # request
        "05000000"  # sequence number
        "00000000"  # port id
        "00000000"  # unspecified family, version 0, resource id 0
    )


def test_the_generation_is_read_from_the_newgen_answer_to_its_own_request():
    def newgen(seq: int, gen: int) -> bytes:
        body = bytes.fromhex("00000000") + bytes.fromhex("08000100") + gen.to_bytes(4, "big")
        body += bytes.fromhex("08000200") + (1234).to_bytes(4, "big")  # NFTA_GEN_PROC_PID
        return struct.pack("=IHHII", 16 + len(body), 0x0A0F, 0, seq, 0) + body

    assert generation_of(newgen(5, 0x01020304), 5) == 0x01020304
    assert generation_of(newgen(4, 7), 5) is None  # another request's answer
    assert generation_of(newgen(4, 7) + newgen(5, 9), 5) == 9


@pytest.mark.parametrize(
    ("known", "before", "after", "now_known"),
    [
        (10, 10, 11, 11),  # one transaction of ours
        (10, 10, 10, 10),  # a read, or a refused batch: nothing committed
        (10, 11, 12, None),  # someone wrote before ours
        (10, 10, 12, None),  # someone wrote meanwhile
        (None, 10, 11, None),  # never known
        (10, None, 11, None),  # the generation could not be read
        (0xFFFFFFFF, 0xFFFFFFFF, 0, 0),  # the counter wraps
    ],
)
def test_the_ruleset_stays_known_only_through_dockerlbs_own_transactions(known, before, after, now_known):
    assert continued(known, before, after) == now_known
