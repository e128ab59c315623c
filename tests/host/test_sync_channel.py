"""Host tier: the pair's sync channel (issue 29, finding 12) in real
containers' namespaces: the sync interface found by Docker network, and the
nft filter that takes sync packets from the peers alone, as the kernel
applies it (the host kernel has nftables; IPVS itself is the kernel tier's)."""

import subprocess
import sys
import time
from ipaddress import ip_address

import pytest

from dockerlb.adapters.director import Director
from dockerlb.adapters.docker_source import DockerSource
from dockerlb.app.pair import sync_interface_of
from dockerlb.core.model import Proto, ServiceKey
from dockerlb.settings import Settings
from harness.dockerlab import in_netns, pid_of

pytestmark = pytest.mark.host
VIPS = ("1.2.3.4/32",)
# Prints each datagram that reaches UDP 8848 in the namespace it runs in.
LISTEN = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 8848)); "
    "print('ready', flush=True)\n"
    "while True: print(s.recv(100).decode(), flush=True)"
)
SEND = (
    "import socket, sys; "
    "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[2].encode(), (sys.argv[1], 8848))"
)


@pytest.fixture
def source():
    s = DockerSource(Settings())
    yield s
    s.close()


def ours(pid: int) -> list[str]:
    """dockerlb's nft tables in the namespace (Docker's DNS keeps an ``ip nat`` of its own there)."""
    return [t for t in in_netns(pid, "nft", "list", "tables").splitlines() if "dockerlb" in t]


def received(director_pid: int, senders: dict[str, int], to: str) -> list[str]:
    """What a UDP 8848 socket in the director's namespace got from each sender (name -> PID)."""
    listener = subprocess.Popen(
        ["/usr/bin/nsenter", "-t", str(director_pid), "-n", sys.executable, "-c", LISTEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    got = []
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        for name, pid in senders.items():
            for _ in range(3):
                in_netns(pid, sys.executable, "-c", SEND, to, name)
        # Read until the peer's "end", sent last (the filter always takes
        # the peer's): what came before it has been read, no sleep.
        in_netns(senders["peer"], sys.executable, "-c", SEND, to, "end")
        deadline = time.monotonic() + 30
        while (line := listener.stdout.readline().strip()) != "end":
            assert line and time.monotonic() < deadline, f"no end marker; got {got}"
            got.append(line)
    finally:
        listener.terminate()
        listener.communicate(timeout=10)
    return sorted(set(got))


def test_the_sync_filter_takes_sync_packets_from_the_peers_alone_and_a_full_pass_repairs_it(lab):
    net = lab.network("sync", subnet="10.78.0.0/24")
    director, peer, stranger = (lab.run(n, network=net) for n in ("director", "peer", "stranger"))
    pid = pid_of(director)
    to = lab.ip(director, net)
    senders = {"peer": pid_of(peer), "stranger": pid_of(stranger)}
    assert received(pid, senders, to) == ["peer", "stranger"]  # no filter: anyone

    d = Director(f"/proc/{pid}/ns/net", Settings(vip_cidr=VIPS, sync_interface="eth0"))
    try:
        d.sync_filter("eth0", [ip_address(lab.ip(peer, net))])
        ruleset = in_netns(pid, "nft", "list", "table", "inet", "dockerlb_sync")
        assert f"elements = {{ {lab.ip(peer, net)} }}" in ruleset
        for rule in (
            'iifname "eth0" udp dport 8848 ip saddr @peers4 accept',
            'iifname "eth0" udp dport 8848 ip6 saddr @peers6 accept',
            'iifname "eth0" udp dport 8848 drop',
        ):
            assert rule in ruleset, ruleset
        assert received(pid, senders, to) == ["peer"]

        # Masquerade's table going (no SNAT wanted) leaves the filter alone.
        d.sync_masquerade({ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 80)})
        d.sync_masquerade(set())
        assert ours(pid) == ["table inet dockerlb_sync"]

        # Deleted or emptied by hand: the next call (each full pass makes one) puts it back.
        in_netns(pid, "nft", "delete", "table", "inet", "dockerlb_sync")
        assert received(pid, senders, to) == ["peer", "stranger"]
        d.sync_filter("eth0", [ip_address(lab.ip(peer, net))])
        assert received(pid, senders, to) == ["peer"]
        in_netns(pid, "nft", "flush", "chain", "inet", "dockerlb_sync", "input")
        d.sync_filter("eth0", [ip_address(lab.ip(peer, net))])
        assert in_netns(pid, "nft", "list", "table", "inet", "dockerlb_sync") == ruleset

        # No longer a pair: the table goes.
        d.sync_filter("", None)
        assert ours(pid) == []
    finally:
        d.close()
    host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "dockerlb_sync" not in host


def test_the_sync_interface_is_the_directors_interface_on_the_named_network_and_its_peers_are_listed(
    source, lab
):
    lab_net = lab.network("servers", subnet="10.79.0.0/24")
    sync = lab.network("sync", subnet="10.78.0.0/24")
    director = lab.run("director", network=lab_net)
    sync.connect(director)  # its second interface
    other = lab.run("other", network=sync)
    pid = pid_of(director)
    d = Director(f"/proc/{pid}/ns/net", Settings())
    try:
        settings = Settings(vip_cidr=VIPS, sync_network=sync.name)
        assert sync_interface_of(settings, source.networks(), d.interfaces()) == ("eth1", "")
        on_servers = Settings(vip_cidr=VIPS, sync_network=lab_net.name)
        assert sync_interface_of(on_servers, source.networks(), d.interfaces()) == ("eth0", "")
        missing = Settings(vip_cidr=VIPS, sync_network="dlbt-no-such-network")
        assert sync_interface_of(missing, source.networks(), d.interfaces()) == (
            "",
            "IPVS sync: Docker has no network 'dlbt-no-such-network' (--sync-network); "
            "no sync daemon started",
        )
    finally:
        d.close()
    network = source.network(sync.name)
    assert network is not None
    assert sorted(map(str, network.members)) == sorted([lab.ip(director, sync), lab.ip(other, sync)])
    assert source.network("dlbt-no-such-network") is None
