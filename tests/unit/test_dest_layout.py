"""Dumped real servers read at the offsets the kernel's first reply showed
(ipvs_wire.DestReader): the same servers as the generic attribute walk, a
reply that breaks the layout read the generic way. The replies are built
here as linux 6.1's ip_vs_genl_fill_dest writes them (net/netfilter/ipvs/
ip_vs_ctl.c), with this file's own packing: expectations are literals or the
generator's own input."""

import socket
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dockerlb.adapters.ipvs_wire import DestReader
from dockerlb.core.model import Forward, RealServer, ServerStats

pytestmark = pytest.mark.unit
IPVS_CMD_NEW_DEST = 5
FWD_CODE = {Forward.NAT: 0, Forward.TUN: 2, Forward.DR: 3}


def nla(kind: int, value: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(value), kind)
    return header + value + b"\0" * (-len(value) % 4)


def u8(v):
    return struct.pack("=B", v)


def u16(v):
    return struct.pack("=H", v)


def u32(v):
    return struct.pack("=I", v)


def u64(v):
    return struct.pack("=Q", v)


def kernel_reply(
    addr, port, fwd, weight, active=0, inactive=0, *, order=None, family=True, upper=0, lower=0
) -> bytes:
    """One IPVS_CMD_NEW_DEST reply after its netlink header: genl header,
    then the CMD_ATTR_DEST nest with the attributes in the kernel's order."""
    fields = [
        (1, addr.packed.ljust(16, b"\0")),  # ADDR: union nf_inet_addr
        (2, struct.pack("!H", port)),  # PORT
        (3, u32(fwd)),  # FWD_METHOD
        (4, u32(weight)),  # WEIGHT
        (13, u8(0)),  # TUN_TYPE
        (14, struct.pack("!H", 0)),  # TUN_PORT
        (15, u16(0)),  # TUN_FLAGS
        (5, u32(upper)),  # U_THRESH
        (6, u32(lower)),  # L_THRESH
        (7, u32(active)),  # ACTIVE_CONNS
        (8, u32(inactive)),  # INACT_CONNS
        (9, u32(0)),  # PERSIST_CONNS
    ]
    if family:
        fields.append((11, u16(socket.AF_INET6 if addr.version == 6 else socket.AF_INET)))
    if order is not None:
        fields = [fields[i] for i in order]
    stats = nla(10, b"".join(nla(k, u32(k * 7)) for k in range(1, 11)))
    stats64 = nla(12, b"".join(nla(k, u64(k * 11)) for k in range(1, 11)))
    dest = nla(2, b"".join(nla(k, v) for k, v in fields) + stats + stats64)
    return bytes([IPVS_CMD_NEW_DEST, 1, 0, 0]) + dest


def test_a_second_reply_of_the_same_length_is_read_at_the_learned_offsets():
    reader = DestReader()
    first = kernel_reply(ip_address("172.18.0.3"), 8000, 0, 1, active=5, inactive=6)
    second = kernel_reply(ip_address("172.18.0.4"), 8080, 3, 70000, active=1, inactive=2)
    assert reader.read(first, 4) == (
        RealServer(IPv4Address("172.18.0.3"), 8000, 1, Forward.NAT),
        ServerStats(active=5, inactive=6),
    )
    assert reader.read(second, 4) == (
        RealServer(IPv4Address("172.18.0.4"), 8080, 70000, Forward.DR),
        ServerStats(active=1, inactive=2),
    )
    assert (reader.fast, reader.generic) == (2, 0)


def test_an_ipv6_tunnelled_server_is_read_through_the_layout_every_time():
    reader = DestReader()
    v6 = kernel_reply(ip_address("fd00::a"), 53, 2, 0)
    for _ in range(3):
        assert reader.read(v6, 6) == (RealServer(IPv6Address("fd00::a"), 53, 0, Forward.TUN), ServerStats())
    assert (reader.fast, reader.generic) == (3, 0)


def test_the_servers_own_family_wins_over_its_services():
    # A v4 server behind a v6 service (the kernel allows mixed families for TUN).
    reader = DestReader()
    got = reader.read(kernel_reply(ip_address("10.9.0.3"), 80, 2, 1), 6)
    assert got[0] == RealServer(IPv4Address("10.9.0.3"), 80, 1, Forward.TUN)


def test_a_reply_of_the_learned_length_with_its_fields_elsewhere_is_read_the_generic_way():
    reader = DestReader()
    reader.read(kernel_reply(ip_address("10.9.0.2"), 80, 0, 1), 4)
    # FWD_METHOD and WEIGHT swapped: the same length, other headers at the offsets.
    swapped = kernel_reply(ip_address("10.9.0.3"), 81, 3, 9, order=[0, 1, 3, 2, *range(4, 13)])
    assert reader.read(swapped, 4) == (RealServer(IPv4Address("10.9.0.3"), 81, 9, Forward.DR), ServerStats())
    assert (reader.fast, reader.generic) == (1, 1)


def test_a_reply_without_the_address_family_is_read_the_generic_way_from_its_service():
    reader = DestReader()  # older kernels do not send IPVS_DEST_ATTR_ADDR_FAMILY
    old = kernel_reply(ip_address("fd00::5"), 53, 0, 2, family=False)
    for _ in range(2):
        assert reader.read(old, 6) == (RealServer(IPv6Address("fd00::5"), 53, 2, Forward.NAT), ServerStats())
    assert (reader.fast, reader.generic) == (0, 2)


def test_a_read_with_counters_takes_the_generic_way_and_has_them():
    reader = DestReader()
    reply = kernel_reply(ip_address("10.9.0.2"), 80, 0, 1, active=3, inactive=4)
    _, stats = reader.read(reply, 4, counters=True)
    assert (stats.active, stats.inactive, stats.conns, stats.inpkts, stats.outbps) == (3, 4, 11, 22, 110)
    assert (reader.fast, reader.generic) == (0, 1)


@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(1, 2**128 - 1).map(IPv6Address)
            ),
            st.integers(0, 65535),
            st.sampled_from(sorted(FWD_CODE, key=str)),
            st.integers(0, 2**31 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 65535),
            st.integers(0, 65535),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_every_server_reads_back_as_it_was_written(servers):
    reader = DestReader()
    for addr, port, forward, weight, active, inactive, upper, lower in servers:
        reply = kernel_reply(
            addr, port, FWD_CODE[forward], weight, active, inactive, upper=upper, lower=lower
        )
        got = reader.read(reply, addr.version)
        assert (got[0].upper_threshold, got[0].lower_threshold) == (upper, lower)
        assert got == (
            RealServer(addr, port, weight, forward, upper_threshold=upper, lower_threshold=lower),
            ServerStats(active=active, inactive=inactive),
        )
    assert reader.generic == 0
