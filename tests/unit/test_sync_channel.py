"""The pair's sync channel closed (issue 29, finding 12): the sync interface
found by Docker network (--sync-network), and sync packets taken only from
the pair's peers (an nft rule of dockerlb's own). Expectations are literals."""

import json
from ipaddress import ip_address, ip_network

import pytest
from click.testing import CliRunner
from loguru import logger

from dockerlb.adapters.director import sync_filter_script
from dockerlb.adapters.docker_source import network_from_summary
from dockerlb.app.controller import Controller
from dockerlb.app.doctor import _sync_channel
from dockerlb.core.model import DockerNetwork
from dockerlb.core.ports import Trigger
from dockerlb.core.sync import SyncDaemon, interfaces_in
from dockerlb.errors import ConfigError, DirectorError
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, container
from tests.unit.test_cli_and_render import show

pytestmark = pytest.mark.unit
SYNC = DockerNetwork(
    "ha-sync",
    (ip_network("172.31.79.0/24"),),
    (ip_address("172.31.79.1"),),
    (ip_address("172.31.79.10"), ip_address("172.31.79.11")),
)
LAB = DockerNetwork("ha-lab", (ip_network("172.31.80.0/24"),), (ip_address("172.31.80.1"),))
BY_NETWORK = Settings(
    vip_cidr=TEST_VIP_CIDRS, sync_network="ha-sync", sync_id=51, floating_dip="172.31.80.200"
)


def test_the_sync_network_and_peers_are_options_and_env_vars():
    env = {"DOCKERLB_SYNC_NETWORK": "ha-sync", "DOCKERLB_SYNC_PEER": "172.31.79.10 172.31.79.11"}
    opts = json.loads(CliRunner().invoke(show, [], env=env).output)
    assert (opts["sync_network"], opts["sync_peer"]) == ("ha-sync", ["172.31.79.10", "172.31.79.11"])
    opts = json.loads(CliRunner().invoke(show, ["--sync-peer", "10.0.0.2", "--sync-peer", "fd00::2"]).output)
    assert opts["sync_peer"] == ["10.0.0.2", "fd00::2"]
    assert Settings(sync_network="ha-sync").pair and Settings(sync_interface="eth1").pair
    assert not Settings().pair


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (
            Settings(vip_cidr=TEST_VIP_CIDRS, sync_interface="eth1", sync_network="ha-sync"),
            "--sync-interface and --sync-network both name the sync interface: give one "
            "(--sync-network finds the interface by its Docker network, whatever its name)",
        ),
        (
            Settings(vip_cidr=TEST_VIP_CIDRS, sync_peer=("10.0.0.2",)),
            "--sync-peer needs --sync-interface or --sync-network: it filters their packets",
        ),
        (
            Settings(vip_cidr=TEST_VIP_CIDRS, sync_network="ha-sync", sync_peer=("ten",)),
            "--sync-peer 'ten': not an IP address",
        ),
        (
            Settings(sync_network="ha-sync"),
            "--sync-network needs --vip-cidr: in a director pair, addresses on other interfaces inside "
            "the VIP ranges are keepalived's copies of VIPs, so the ranges must be named",
        ),
    ],
)
def test_sync_settings_that_cannot_go_together_are_refused_at_start(settings, error):
    with pytest.raises(ConfigError) as refused:
        Controller(settings, MemoryDocker(), MemoryIpvs(), MemoryDirector())
    assert str(refused.value) == error


def test_the_filter_drops_sync_packets_on_the_sync_interface_unless_a_peer_sent_them():
    peers = [ip_address("172.31.79.11"), ip_address("fd00:79::b"), ip_address("172.31.79.9")]
    assert sync_filter_script("eth1", peers) == (
        "table inet dockerlb_sync {\n"
        "  set peers4 { type ipv4_addr; }\n"
        "  set peers6 { type ipv6_addr; }\n"
        "  chain input { type filter hook input priority filter; policy accept; }\n"
        "}\n"
        "flush chain inet dockerlb_sync input\n"
        "flush set inet dockerlb_sync peers4\n"
        "flush set inet dockerlb_sync peers6\n"
        "add element inet dockerlb_sync peers4 { 172.31.79.9, 172.31.79.11 }\n"
        "add element inet dockerlb_sync peers6 { fd00:79::b }\n"
        'add rule inet dockerlb_sync input iifname "eth1" udp dport 8848 ip saddr @peers4 accept\n'
        'add rule inet dockerlb_sync input iifname "eth1" udp dport 8848 ip6 saddr @peers6 accept\n'
        'add rule inet dockerlb_sync input iifname "eth1" udp dport 8848 drop\n'
    )
    # No peer at all: every sync packet on eth1 is dropped.
    assert "add element" not in sync_filter_script("eth1", [])


def test_the_interface_on_a_network_is_the_one_with_an_address_in_its_subnet():
    addresses = {ip_address("172.31.80.10"): "eth0", ip_address("172.31.79.10"): "eth1"}
    assert interfaces_in(SYNC.subnets, addresses) == ["eth1"]
    assert interfaces_in(LAB.subnets, addresses) == ["eth0"]
    assert interfaces_in([ip_network("fd00:79::/64")], addresses) == []


def pair(settings: Settings = BY_NETWORK, networks=(SYNC, LAB), director: MemoryDirector | None = None):
    docker = MemoryDocker(
        [container("web1", {"dockerlb.vip": "1.2.3.4:80"}, nets={"ha-lab": ("172.31.80.5", None)})],
        networks,
    )
    if director is None:
        director = MemoryDirector()
        director.ifaces = {ip_address("172.31.80.10"): "eth0", ip_address("172.31.79.10"): "eth1"}
    ipvs = MemoryIpvs()
    return docker, ipvs, director, Controller(settings, docker, ipvs, director)


class Said:
    """The log lines said at WARNING and above while in the block."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self._sink = logger.add(lambda m: self.lines.append(m.record["message"]), level="WARNING")
        return self.lines

    def __exit__(self, *exc) -> None:
        logger.remove(self._sink)


def test_by_network_the_daemons_run_on_its_interface_and_only_the_other_members_may_send():
    docker, ipvs, director, ctl = pair()
    with Said() as lines:
        ctl.reconcile(None)
    assert lines == []
    assert ipvs.daemons() == {SyncDaemon("master", "eth1", 51), SyncDaemon("backup", "eth1", 51)}
    assert director.sync_filtered == ("eth1", ("172.31.79.11",))  # not its own address
    assert ctl.sync_interface == "eth1"
    assert ctl.pair_state(frozenset()).wanted == {
        SyncDaemon("master", "eth1", 51),
        SyncDaemon("backup", "eth1", 51),
    }

    # Full passes read the network again: a third director joins, and the
    # director's interfaces are renumbered (the sync network is eth2 now).
    third = DockerNetwork(SYNC.name, SYNC.subnets, SYNC.gateways, (*SYNC.members, ip_address("172.31.79.12")))
    docker.set_networks([third, LAB])
    director.ifaces = {ip_address("172.31.80.10"): "eth1", ip_address("172.31.79.10"): "eth2"}
    ctl.reconcile([Trigger("id-web1", "start", started=True)])  # an event pass: not looked at
    assert director.sync_filtered == ("eth1", ("172.31.79.11",))
    with Said() as lines:
        ctl.reconcile(None)
    assert director.sync_filtered == ("eth2", ("172.31.79.11", "172.31.79.12"))
    assert ipvs.daemons() == {SyncDaemon("master", "eth2", 51), SyncDaemon("backup", "eth2", 51)}
    assert lines == [
        "IPVS sync daemon stopped: backup on eth1 (sync id 51) (not as set)",
        "IPVS sync daemon stopped: master on eth1 (sync id 51) (not as set)",
    ]


def test_named_peers_are_the_only_senders_and_docker_is_not_asked_who_is_on_the_network():
    settings = Settings(
        vip_cidr=TEST_VIP_CIDRS,
        sync_network="ha-sync",
        sync_peer=("172.31.79.10", "172.31.79.11"),
        floating_dip="172.31.80.200",
    )
    crowded = DockerNetwork(
        SYNC.name, SYNC.subnets, SYNC.gateways, (*SYNC.members, ip_address("172.31.79.66"))
    )
    _, _, director, ctl = pair(settings, networks=(crowded, LAB))
    ctl.reconcile(None)
    assert director.sync_filtered == ("eth1", ("172.31.79.10", "172.31.79.11"))


def test_a_sync_network_that_is_not_there_is_one_error_line_while_it_lasts_and_no_daemon_starts():
    docker, ipvs, director, ctl = pair(networks=(LAB,))
    with Said() as lines:
        for _ in range(3):
            ctl.reconcile(None)
    assert lines == ["IPVS sync: Docker has no network 'ha-sync' (--sync-network); no sync daemon started"]
    assert ipvs.daemons() == frozenset() and director.sync_filtered is None
    assert [str(k) for k in ipvs.read().table] == ["TCP 1.2.3.4:80"]  # the table is built all the same
    assert ctl.pair_state(frozenset()).wanted == frozenset()
    docker.set_networks([SYNC, LAB])  # made: the next full pass starts the daemons
    ctl.reconcile(None)
    assert ipvs.daemons() == {SyncDaemon("master", "eth1", 51), SyncDaemon("backup", "eth1", 51)}


def test_a_sync_network_the_director_is_not_on_is_one_error_line_while_it_lasts():
    director = MemoryDirector()
    director.ifaces = {ip_address("172.31.80.10"): "eth0"}
    _, ipvs, _, ctl = pair(director=director)
    with Said() as lines:
        ctl.reconcile(None)
        ctl.reconcile(None)
    assert lines == [
        "IPVS sync: the director has no interface in Docker network 'ha-sync' (172.31.79.0/24); "
        "connect it to that network; no sync daemon started"
    ]
    assert ipvs.daemons() == frozenset()


class NoNft(MemoryDirector):
    """A FAKE for nft refusing the script (a real one cannot be made to on demand)."""

    def sync_filter(self, interface, peers) -> None:
        if interface and peers is not None:
            raise DirectorError("the sync filter on eth1: nft refused: Operation not permitted")


def test_a_filter_that_cannot_be_set_is_one_error_line_and_the_daemons_still_run():
    director = NoNft()
    director.ifaces = {ip_address("172.31.79.10"): "eth1"}
    _, ipvs, _, ctl = pair(director=director)
    with Said() as lines:
        ctl.reconcile(None)
        ctl.reconcile(None)
    assert lines == [
        "IPVS sync: the sync filter on eth1: nft refused: Operation not permitted; until it works, "
        "sync packets on eth1 are taken from anyone"
    ]
    assert ipvs.daemons() == {SyncDaemon("master", "eth1", 51), SyncDaemon("backup", "eth1", 51)}


def test_a_sync_interface_with_no_peer_named_is_warned_once_as_open_to_anyone():
    settings = Settings(vip_cidr=TEST_VIP_CIDRS, sync_interface="eth1", floating_dip="172.31.80.200")
    _, _, director, ctl = pair(settings)
    with Said() as lines:
        ctl.reconcile(None)
        ctl.reconcile(None)
    assert lines == [
        "IPVS sync on eth1 takes connection entries from anyone on that network (the protocol has no "
        "authentication): name the other director with --sync-peer, or pick the interface with "
        "--sync-network, on a network only the directors join (docs/ha.md)"
    ]
    assert director.sync_filtered is None
    _, _, director, ctl = pair(
        Settings(vip_cidr=TEST_VIP_CIDRS, sync_interface="eth1", sync_peer=("10.9.0.2",))
    )
    ctl.reconcile(None)
    assert director.sync_filtered == ("eth1", ("10.9.0.2",))


def test_without_a_pair_a_filter_left_by_one_goes():
    _, _, director, ctl = pair(Settings(vip_cidr=TEST_VIP_CIDRS))
    director.sync_filtered = ("eth1", ("172.31.79.11",))
    ctl.reconcile(None)
    assert director.sync_filtered is None


def test_an_inspected_network_names_its_members_addresses_and_a_listed_one_none():
    inspected = {
        "Name": "ha-sync",
        "Driver": "bridge",
        "IPAM": {"Config": [{"Subnet": "172.31.79.0/24", "Gateway": "172.31.79.1"}]},
        "Containers": {
            "a1": {"Name": "ha_director_a_1", "IPv4Address": "172.31.79.10/24", "IPv6Address": ""},
            "b2": {
                "Name": "ha_director_b_1",
                "IPv4Address": "172.31.79.11/24",
                "IPv6Address": "fd00:79::b/64",
            },
            "c3": {"Name": "odd", "IPv4Address": None},
        },
    }
    assert network_from_summary(inspected) == DockerNetwork(
        "ha-sync",
        (ip_network("172.31.79.0/24"),),
        (ip_address("172.31.79.1"),),
        (ip_address("172.31.79.10"), ip_address("172.31.79.11"), ip_address("fd00:79::b")),
    )
    listed = {k: v for k, v in inspected.items() if k != "Containers"} | {"Containers": {}}
    assert network_from_summary(listed).members == ()


def test_doctor_says_who_the_director_takes_sync_packets_from():
    named = Settings(vip_cidr=TEST_VIP_CIDRS, sync_network="ha-sync", sync_peer=("172.31.79.11",))
    assert _sync_channel(named) == "sync packets taken only from 172.31.79.11 (--sync-peer; nft, set by run)"
    assert _sync_channel(BY_NETWORK) == (
        "sync packets taken only from the other containers on Docker network 'ha-sync' (nft, set by run): "
        "let only the directors join it"
    )
    with pytest.raises(Exception) as failed:
        _sync_channel(Settings(vip_cidr=TEST_VIP_CIDRS, sync_interface="eth0"))
    assert str(failed.value) == (
        "sync packets on eth0 are taken from anyone who can send to it: the protocol has no "
        "authentication, so any container there can add or expire the pair's connections"
    )
    assert failed.value.fix == (  # type: ignore[attr-defined]
        "run sync on a network only the directors join (--sync-network NAME) and name the other "
        "director with --sync-peer ADDR"
    )
