"""Host tier: the director's address reads (one RTM_GETADDR dump read with
struct, dockerlb/adapters/address_dump.py) in a real network namespace,
held to what iproute2 shows for the same namespace."""

import json
import subprocess
import uuid
from ipaddress import ip_address

import pytest

from dockerlb.adapters.address_dump import AddressReader
from dockerlb.adapters.director import Director
from dockerlb.settings import Settings

pytestmark = pytest.mark.host


def ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns():
    """A namespace with a veth pair: a0 stands for the director's interface
    (no dummy links in the host kernel), b0 for one of its own."""
    name = f"dlbh-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    ip("-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
    # No link-local address made by the kernel: it would arrive on its own
    # (linkwatch, after the link is up), possibly between two reads that a
    # test compares. A test that wants one adds it, at a time it chooses.
    for link in ("a0", "b0"):
        ip("-n", name, "link", "set", link, "addrgenmode", "none")
    for link in ("a0", "b0", "lo"):
        ip("-n", name, "link", "set", link, "up")
    yield name
    ip("netns", "del", name)


def shown(netns: str) -> set[tuple[str, str, int]]:
    """(interface, address, prefix length) of every address, as iproute2 has them."""
    return {
        (link["ifname"], a["local"], a["prefixlen"])
        for link in json.loads(ip("-n", netns, "-j", "addr"))
        for a in link.get("addr_info", [])
    }


def test_every_address_in_the_namespace_is_read_as_iproute2_shows_it(netns):
    ip("-n", netns, "addr", "add", "10.5.0.1/24", "dev", "b0")
    ip("-n", netns, "addr", "add", "fd00:5::1/64", "dev", "b0", "nodad")
    for n in range(300):  # more than one dump part holds
        ip("-n", netns, "addr", "add", f"10.200.{n // 250}.{n % 250 + 1}/32", "dev", "a0")
    ip("-n", netns, "addr", "add", "fd00::100/128", "dev", "a0", "nodad")
    ip("-n", netns, "addr", "add", "fe80::a0/64", "dev", "a0", "nodad")
    names = {link["ifindex"]: link["ifname"] for link in json.loads(ip("-n", netns, "-j", "link"))}
    reader = AddressReader(f"/run/netns/{netns}")
    try:
        read = {(names[a.index], str(a.address), a.prefixlen) for a in reader.addresses()}
    finally:
        reader.close()
    assert read == shown(netns)
    assert (
        ("a0", "10.200.1.50", 32) in read
        and ("b0", "fd00:5::1", 64) in read
        and ("lo", "127.0.0.1", 8) in read
        and ("a0", "fe80::a0", 64) in read
    )
    assert len(read) >= 300 + 3 + 2


def test_the_director_tells_its_vips_from_its_own_addresses(netns):
    ip("-n", netns, "addr", "add", "10.5.0.1/24", "dev", "b0")
    ip("-n", netns, "addr", "add", "1.2.3.4/32", "dev", "a0")
    ip("-n", netns, "addr", "add", "fd00::100/128", "dev", "a0", "nodad")
    ip("-n", netns, "addr", "add", "10.6.0.1/24", "dev", "a0")  # not a host route: not a VIP
    ip("-n", netns, "addr", "add", "10.5.0.7/32", "dev", "b0")  # a host route elsewhere: not a VIP
    ip("-n", netns, "addr", "add", "fe80::b0/64", "dev", "b0", "nodad")  # link-local: not its own
    ip("-n", netns, "addr", "add", "fe80::a0/128", "dev", "a0", "nodad")  # a link-local /128: not a VIP
    d = Director(f"/run/netns/{netns}", Settings(interface="a0"))
    try:
        assert d.vips() == {ip_address("1.2.3.4"), ip_address("fd00::100")}
        # Its own: every address but its VIP interface's, loopback and link-local.
        assert d.local_addresses() == {
            ip_address("10.5.0.1"): "the director's address on b0",
            ip_address("10.5.0.7"): "the director's address on b0",
        }
    finally:
        d.close()


def test_in_a_pair_keepaliveds_host_route_copy_of_a_vip_is_not_an_address_the_vip_must_avoid(netns):
    ip("-n", netns, "addr", "add", "10.5.0.1/24", "dev", "b0")
    ip("-n", netns, "addr", "add", "1.2.3.4/32", "dev", "a0")  # dockerlb's VIP
    ip("-n", netns, "addr", "add", "1.2.3.4/32", "dev", "b0")  # keepalived's copy on the master
    ip("-n", netns, "addr", "add", "10.5.0.9/32", "dev", "b0")  # a /32 of the director's own
    for settings, taken in (
        # alone: a VIP must not be its own address
        (Settings(interface="a0"), {"10.5.0.1", "10.5.0.9", "1.2.3.4"}),
        # in a pair: host routes are keepalived's floating copies...
        (Settings(interface="a0", sync_interface="b0"), {"10.5.0.1"}),
        # ...and with --vip-cidr, only those inside the allowed VIP ranges
        (Settings(interface="a0", sync_interface="b0", vip_cidr=("1.2.3.0/24",)), {"10.5.0.1", "10.5.0.9"}),
    ):
        d = Director(f"/run/netns/{netns}", settings)
        try:
            assert {str(a) for a in d.addresses()} == taken
            # The copy still tells which director is the active one.
            assert {str(a) for a in d.local_addresses()} == {"10.5.0.1", "10.5.0.9", "1.2.3.4"}
        finally:
            d.close()
