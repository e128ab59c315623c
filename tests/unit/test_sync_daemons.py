"""The connection-sync daemons of a director pair (issue 17): what to start
and stop, a controller keeping them running, and how status and the
metrics show them. Expectations are literals."""

import struct
from ipaddress import ip_address

import pytest
from loguru import logger

from dockerlb.adapters.ipvs_wire import daemon_of, daemon_start, daemon_stop
from dockerlb.adapters.metrics import _pair
from dockerlb.app.controller import Controller
from dockerlb.core.ports import Trigger
from dockerlb.core.render import pair_data, pair_text
from dockerlb.core.sync import PairState, SyncDaemon, plan_daemons, wanted_daemons
from dockerlb.errors import IpvsRejected
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, container

pytestmark = pytest.mark.unit
MASTER7 = SyncDaemon("master", "eth1", 7)
BACKUP7 = SyncDaemon("backup", "eth1", 7)
PAIR = Settings(vip_cidr=TEST_VIP_CIDRS, sync_interface="eth1", sync_id=7)


def test_no_sync_interface_wants_no_daemon_and_leaves_running_ones_alone():
    assert wanted_daemons("", 7) == frozenset()
    assert plan_daemons(frozenset(), frozenset({SyncDaemon("master", "eth0", 1)})) == ([], [])


def test_a_pair_wants_a_master_and_a_backup_on_one_interface_with_one_id():
    assert wanted_daemons("eth1", 7) == {MASTER7, BACKUP7}
    assert plan_daemons(wanted_daemons("eth1", 7), frozenset()) == ([], [BACKUP7, MASTER7])
    assert plan_daemons(wanted_daemons("eth1", 7), frozenset({BACKUP7})) == ([], [MASTER7])
    assert plan_daemons(wanted_daemons("eth1", 7), frozenset({BACKUP7, MASTER7})) == ([], [])


def test_a_daemon_running_with_another_interface_or_id_is_stopped_then_started_as_set():
    running = frozenset({SyncDaemon("master", "eth0", 7), SyncDaemon("backup", "eth1", 3)})
    assert plan_daemons(wanted_daemons("eth1", 7), running) == (["backup", "master"], [BACKUP7, MASTER7])


def controller(ipvs: MemoryIpvs, director: MemoryDirector | None = None, settings: Settings = PAIR):
    docker = MemoryDocker(
        [container("web1", {"dockerlb.vip": "1.2.3.4:80"}, nets={"lab": ("10.0.0.11", None)})]
    )
    return docker, Controller(settings, docker, ipvs, director or MemoryDirector())


def test_a_full_pass_starts_both_daemons_and_puts_back_one_stopped_by_hand():
    ipvs = MemoryIpvs()
    docker, ctl = controller(ipvs)
    ctl.reconcile(None)
    assert ipvs.daemons() == {MASTER7, BACKUP7}
    ipvs.stop_daemon("master")  # someone ran ipvsadm --stop-daemon master
    docker.die("id-web1")
    ctl.reconcile([Trigger("id-web1", "die", down=True)])
    assert ipvs.daemons() == {BACKUP7}  # an event pass reads no daemons
    ctl.reconcile(None)
    assert ipvs.daemons() == {MASTER7, BACKUP7}


def test_without_a_sync_interface_a_pass_starts_and_stops_no_daemon():
    ipvs = MemoryIpvs()
    ipvs.start_daemon(SyncDaemon("master", "eth0", 1))  # an operator's, by hand
    _, ctl = controller(ipvs, settings=Settings(vip_cidr=TEST_VIP_CIDRS))
    ctl.reconcile(None)
    assert ipvs.daemons() == {SyncDaemon("master", "eth0", 1)}


def test_a_daemon_that_cannot_start_is_one_error_line_while_it_lasts_and_the_table_is_still_built():
    ipvs = MemoryIpvs()
    ipvs.no_such_interface.add("eth1")
    docker, ctl = controller(ipvs)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")
    try:
        for n in range(3):
            ctl.reconcile(None)
            # Event passes between full ones (they do not look at daemons).
            docker.start(
                container(
                    f"web{n + 2}", {"dockerlb.vip": "1.2.3.4:80"}, nets={"lab": (f"10.0.0.{n + 12}", None)}
                )
            )
            ctl.reconcile([Trigger(f"id-web{n + 2}", "start", started=True)])
            ctl.reconcile([Trigger(f"id-web{n + 2}", "start", started=True)])
    finally:
        logger.remove(sink)
    assert lines == [
        "IPVS sync daemon backup on eth1 (sync id 7): cannot start it: "
        "IPVS rejected the request (ENODEV: no such device)",
        "IPVS sync daemon master on eth1 (sync id 7): cannot start it: "
        "IPVS rejected the request (ENODEV: no such device)",
    ]
    assert [str(k) for k in ipvs.read().table] == ["TCP 1.2.3.4:80"]
    ipvs.no_such_interface.clear()  # fixed: the daemons start, and a new failure would be said again
    ctl.reconcile(None)
    assert ipvs.daemons() == {MASTER7, BACKUP7}


class UnreadableDaemons(MemoryIpvs):
    """A fake fault: the kernel refusing to list its sync daemons (not
    something a test can make a real kernel do)."""

    def daemons(self):
        raise IpvsRejected("IPVS rejected the request (EPERM: operation not permitted)")


def test_daemons_that_cannot_be_read_are_one_error_line_while_it_lasts():
    _, ctl = controller(UnreadableDaemons())
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")
    try:
        for _ in range(3):
            ctl.reconcile(None)
    finally:
        logger.remove(sink)
    assert lines == [
        "IPVS sync daemons: cannot read which run: IPVS rejected the request (EPERM: operation not permitted)"
    ]


def test_a_daemon_running_with_other_settings_is_replaced_and_said_as_a_warning():
    ipvs = MemoryIpvs()
    ipvs.start_daemon(SyncDaemon("master", "eth0", 3))  # someone else's
    _, ctl = controller(ipvs)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        ctl.reconcile(None)
    finally:
        logger.remove(sink)
    assert ipvs.daemons() == {MASTER7, BACKUP7}
    assert [line for line in lines if "sync daemon" in line] == [
        "IPVS sync daemon stopped: master on eth0 (sync id 3) (not as set)"
    ]


def test_the_director_holding_its_vip_on_another_interface_is_the_active_one():
    ipvs, director = MemoryIpvs(), MemoryDirector()
    _, ctl = controller(ipvs, director)
    ctl.reconcile(None)
    vips = frozenset({ip_address("1.2.3.4")})
    assert ctl.pair_state(vips) == PairState(
        frozenset({MASTER7, BACKUP7}), frozenset({MASTER7, BACKUP7}), "standby"
    )
    director.own[ip_address("1.2.3.4")] = "the director's address on eth0"  # keepalived put it there
    assert ctl.pair_state(vips).role == "active"
    _, alone = controller(MemoryIpvs(), director, Settings(vip_cidr=TEST_VIP_CIDRS))
    assert alone.pair_state(vips) == PairState(frozenset(), frozenset(), "")


def test_status_shows_each_daemon_running_or_not_and_the_role():
    pair = PairState(frozenset({BACKUP7}), frozenset({MASTER7, BACKUP7}), "standby")
    assert pair_data(pair) == {
        "role": "standby",
        "daemons": [
            {"state": "backup", "interface": "eth1", "sync_id": 7, "running": True},
            {"state": "master", "interface": "eth1", "sync_id": 7, "running": False},
        ],
    }
    assert pair_text(pair_data(pair)) == (
        "Director pair: role standby; sync daemons: "
        "backup on eth1 id 7 running, master on eth1 id 7 NOT RUNNING"
    )
    assert pair_data(PairState(frozenset(), frozenset(), "")) is None
    assert pair_text(None) == ""


def test_the_metrics_show_each_daemon_and_whether_this_director_is_active():
    families = _pair(PairState(frozenset({MASTER7}), frozenset({MASTER7, BACKUP7}), "active"))
    samples = [(s.name, s.labels, s.value) for f in families for s in f.samples]
    assert samples == [
        ("dockerlb_sync_daemon_running", {"state": "backup", "interface": "eth1", "sync_id": "7"}, 0),
        ("dockerlb_sync_daemon_running", {"state": "master", "interface": "eth1", "sync_id": "7"}, 1),
        ("dockerlb_director_active", {}, 1),
    ]
    assert _pair(None) == []


def nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def test_a_start_asks_for_state_interface_and_id_in_the_daemon_nest():
    msg = daemon_start(0x1C, 5, MASTER7)
    length, family, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, family, flags, seq, pid) == (len(msg), 0x1C, 0x5, 5, 0)  # REQUEST | ACK
    assert msg[16:20] == bytes([9, 1, 0, 0])  # IPVS_CMD_NEW_DAEMON, genl version 1
    inner = nla(1, struct.pack("=I", 1)) + nla(2, b"eth1\0") + nla(3, struct.pack("=I", 7))
    assert msg[20:] == nla(3 | 0x8000, inner)  # IPVS_CMD_ATTR_DAEMON, NLA_F_NESTED
    stop = daemon_stop(0x1C, 6, "backup")
    assert stop[16:20] == bytes([10, 1, 0, 0]) and stop[20:] == nla(0x8003, nla(1, struct.pack("=I", 2)))


def test_a_dumped_daemon_reads_as_the_kernel_wrote_it():
    # ip_vs_genl_fill_daemon: STATE, MCAST_IFN, SYNC_ID, SYNC_MAXLEN, MCAST_PORT, MCAST_TTL, MCAST_GROUP
    inner = (
        nla(1, struct.pack("=I", 2))
        + nla(2, b"eth1\0")
        + nla(3, struct.pack("=I", 7))
        + nla(4, struct.pack("=H", 1472))
        + nla(7, struct.pack("=H", 8848))
        + nla(8, b"\1")
        + nla(5, bytes([224, 0, 0, 81]))
    )
    assert daemon_of(bytes([9, 1, 0, 0]) + nla(3, inner)) == BACKUP7
    assert daemon_of(bytes([9, 1, 0, 0]) + nla(3, nla(1, struct.pack("=I", 4)))) is None  # no such state


def test_the_director_holding_the_floating_dip_is_the_active_one_too():
    director = MemoryDirector()
    _, ctl = controller(
        MemoryIpvs(),
        director,
        Settings(vip_cidr=TEST_VIP_CIDRS, sync_interface="eth1", floating_dip="10.9.0.100"),
    )
    director.own[ip_address("10.9.0.100")] = "the director's address on eth1"
    assert ctl.pair_state(frozenset()).role == "active"


def warnings_of(settings: Settings, labels: dict[str, str]) -> list[str]:
    docker = MemoryDocker([container("web1", labels, nets={"lab": ("10.0.0.11", None)})])
    ctl = Controller(settings, docker, MemoryIpvs(), MemoryDirector())
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        ctl.reconcile(None)
        ctl.reconcile(None)
    finally:
        logger.remove(sink)
    return [line for line in lines if "director pair" in line]


def test_a_pair_masquerading_nat_to_its_own_address_is_warned_once_since_connections_cannot_survive():
    nat = {"dockerlb.vip": "1.2.3.4:80"}
    warned = [
        "director pair without --floating-dip: NAT services SNAT to, or route their servers' replies via, "
        "this director's own address, so their connections cannot survive a failover (and two directors "
        "take turns rewriting routed servers' default routes); set --floating-dip to the pair's floating "
        "inside address (docs/ha.md)"
    ]
    assert warnings_of(PAIR, nat) == warned
    assert warnings_of(PAIR, {**nat, "dockerlb.masquerade": "false"}) == warned  # routed NAT
    assert (
        warnings_of(Settings(vip_cidr=TEST_VIP_CIDRS, sync_interface="eth1", floating_dip="10.9.0.100"), nat)
        == []
    )
    assert warnings_of(PAIR, {**nat, "dockerlb.forward": "dr"}) == []  # DR: nothing to SNAT or route
    assert warnings_of(Settings(vip_cidr=TEST_VIP_CIDRS), nat) == []  # not a pair
