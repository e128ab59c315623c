"""RTM_NEWADDR messages read with struct (dockerlb/adapters/address_dump.py),
built here by hand in the layout of include/uapi/linux/if_addr.h."""

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from dockerlb.adapters.address_dump import InterfaceAddress, _new_host, address_of

pytestmark = pytest.mark.unit


def nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def newaddr(family: int, prefixlen: int, index: int, *attrs: bytes) -> bytes:
    return struct.pack("=BBBBI", family, prefixlen, 0x80, 0, index) + b"".join(attrs)


def test_an_ipv4_address_is_read_from_ifa_address():
    msg = newaddr(
        socket.AF_INET, 32, 7,
        nla(1, bytes([1, 2, 3, 4])),  # IFA_ADDRESS
        nla(2, bytes([1, 2, 3, 4])),  # IFA_LOCAL
        nla(3, b"dockerlb0\0"),  # IFA_LABEL
        nla(8, struct.pack("=I", 0x80)),  # IFA_FLAGS
    )  # fmt: skip
    assert address_of(msg) == InterfaceAddress(7, IPv4Address("1.2.3.4"), 32)


def test_an_ipv6_address_after_other_attributes_is_found():
    msg = newaddr(
        socket.AF_INET6, 64, 2,
        nla(6, b"\0" * 16),  # IFA_CACHEINFO first
        nla(1, IPv6Address("fd00::5").packed),
    )  # fmt: skip
    assert address_of(msg) == InterfaceAddress(2, IPv6Address("fd00::5"), 64)


def test_a_point_to_point_address_is_its_peer_as_ifa_address_says():
    msg = newaddr(socket.AF_INET, 32, 3, nla(2, bytes([10, 0, 0, 1])), nla(1, bytes([10, 0, 0, 2])))
    assert address_of(msg) == InterfaceAddress(3, IPv4Address("10.0.0.2"), 32)


def test_another_family_or_no_address_reads_as_none():
    assert address_of(newaddr(socket.AF_PACKET, 0, 1, nla(1, b"\1" * 6))) is None
    assert address_of(newaddr(socket.AF_INET, 24, 1, nla(3, b"eth0\0"))) is None
    assert address_of(newaddr(socket.AF_INET, 24, 1, nla(1, b"\1\2"))) is None  # wrong size


def test_a_vip_is_added_as_a_host_address_acknowledged_as_ip_addr_add_words_it():
    msg = _new_host(7, IPv4Address("10.0.0.5"), 42)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq) == (len(msg), 20, 42)  # RTM_NEWADDR
    assert flags == 0x1 | 0x4 | 0x400 | 0x200  # request, acknowledged, create, exclusive
    local = address = bytes([10, 0, 0, 5])
    assert msg[16:] == struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 7) + nla(2, local) + nla(1, address)
    v6 = _new_host(3, IPv6Address("fd00::1"), 1)
    assert v6[16:24] == struct.pack("=BBBBI", socket.AF_INET6, 128, 0, 0, 3)
    assert address_of(v6[16:]) == InterfaceAddress(3, IPv6Address("fd00::1"), 128)
