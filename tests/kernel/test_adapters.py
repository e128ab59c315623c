"""Kernel tier: the IPVS and director adapters against the real kernel."""

from __future__ import annotations

import os
import resource
import subprocess
import uuid
from ipaddress import ip_address

import pytest

from dockerlb.adapters.director import Director
from dockerlb.adapters.ipvs import BATCH, IpvsAdapter
from dockerlb.adapters.metrics import ControllerMetrics
from dockerlb.app.applier import Applier
from dockerlb.core.model import Forward, Proto, RealServer, Service, ServiceKey
from dockerlb.core.plan import ADD, EDIT, REMOVE, AddServer, AddService, RemoveServer, Write
from dockerlb.errors import DirectorError, IpvsExists, IpvsNotFound, IpvsRejected
from dockerlb.settings import Settings

pytestmark = pytest.mark.kernel
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns():
    """A bare namespace with one interface and routes (IPVS wants real servers routable)."""
    name = f"dlbt-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "add", "eth0", "type", "dummy")
    sh("ip", "-n", name, "link", "set", "eth0", "up")
    sh("ip", "-n", name, "addr", "add", "10.9.0.1/24", "dev", "eth0")
    sh("ip", "-n", name, "addr", "add", "fd00::1/64", "dev", "eth0")
    yield name
    sh("ip", "netns", "del", name)


@pytest.fixture
def ipvs(netns):
    a = IpvsAdapter(f"/run/netns/{netns}", Settings())
    yield a
    a.close()


def server(last: int, weight=1, forward=Forward.NAT, port=8000):
    return RealServer(ip_address(f"10.9.0.{last}"), port, weight, forward)


def test_services_and_servers_round_trip_through_the_kernel(ipvs, netns):
    ipvs.write(Write(ADD, Service(KEY, "wlc", 0)))
    ipvs.write(Write(ADD, Service(KEY), server(5)))
    ipvs.write(Write(ADD, Service(KEY), server(6, 3, Forward.DR)))
    shown = sh("ip", "netns", "exec", netns, "ipvsadm", "-Ln")
    assert "TCP  1.2.3.4:8000 wlc" in shown
    assert "10.9.0.6:8000                Route   3" in shown
    vs = ipvs.read().table[KEY]
    assert vs.service == Service(KEY, "wlc", 0)
    assert {s.ident: s.settings() for s in vs.servers.values()} == {
        server(5).ident: (1, Forward.NAT, 0, 0),
        server(6).ident: (3, Forward.DR, 0, 0),
    }


def test_the_kernels_replies_are_read_at_the_learned_offsets_and_say_what_ipvsadm_says(ipvs, netns):
    v6 = ServiceKey(Proto.UDP, ip_address("fd00::100"), 53)
    ipvs.write(Write(ADD, Service(KEY, "wlc", 0)))
    ipvs.write(Write(ADD, Service(v6, "rr", 0)))
    ipvs.write(Write(ADD, Service(KEY), server(5)))
    ipvs.write(Write(ADD, Service(KEY), server(6, 3, Forward.DR)))
    ipvs.write(Write(ADD, Service(KEY), server(7, 0, Forward.TUN, port=8080)))
    ipvs.write(Write(ADD, Service(v6), RealServer(ip_address("fd00::5"), 53, 70000)))
    # Named services: read by netlink (a whole read goes through /proc/net/ip_vs, below).
    table = ipvs.read(counters=False, keys=[KEY, v6]).table
    assert {s.ident: s.settings() for s in table[KEY].servers.values()} == {
        (ip_address("10.9.0.5"), 8000): (1, Forward.NAT, 0, 0),
        (ip_address("10.9.0.6"), 8000): (3, Forward.DR, 0, 0),
        (ip_address("10.9.0.7"), 8080): (0, Forward.TUN, 0, 0),
    }
    assert {s.ident: s.settings() for s in table[v6].servers.values()} == {
        (ip_address("fd00::5"), 53): (70000, Forward.NAT, 0, 0),
    }
    # Every reply of this kernel fits the layout its first one showed.
    assert (ipvs.servers.fast, ipvs.servers.generic) == (4, 0)
    assert "10.9.0.7:8080                Tunnel  0" in sh("ip", "netns", "exec", netns, "ipvsadm", "-Ln")
    ipvs.read(counters=True)  # status and metrics: the counters, read the generic way
    assert (ipvs.servers.fast, ipvs.servers.generic) == (4, 4)


def test_a_whole_read_from_proc_net_ip_vs_says_what_netlink_says_and_learns_hz_from_both(ipvs, netns):
    v6 = ServiceKey(Proto.UDP, ip_address("fd00::100"), 53)
    sticky = ServiceKey(Proto.TCP, ip_address("1.2.3.5"), 443)
    ipvs.write(Write(ADD, Service(KEY, "wlc", 0)))
    ipvs.write(Write(ADD, Service(v6, "rr", 0)))
    ipvs.write(Write(ADD, Service(sticky, "sh", 360)))
    ipvs.write(Write(ADD, Service(KEY), server(5)))
    ipvs.write(Write(ADD, Service(KEY), server(6, 3, Forward.DR)))
    ipvs.write(Write(ADD, Service(KEY), server(7, 0, Forward.TUN, port=8080)))
    ipvs.write(Write(ADD, Service(v6), RealServer(ip_address("fd00::5"), 53, 70000)))
    ipvs.write(Write(ADD, Service(sticky), server(8, port=443)))
    # SCTP (the text says "SCTP"), and a server with connection thresholds,
    # which the text does not write: its service is read by netlink too.
    capped = ServiceKey(Proto.SCTP, ip_address("1.2.3.6"), 3868)
    ipvs.write(Write(ADD, Service(capped, "rr", 0)))
    limited = RealServer(ip_address("10.9.0.9"), 3868, 1, upper_threshold=5, lower_threshold=2)
    ipvs.write(Write(ADD, Service(capped), limited))
    # Someone else's firewall-mark service: in neither read (it has no VIP).
    sh("ip", "netns", "exec", netns, "ipvsadm", "-A", "-f", "7", "-s", "rr")
    by_netlink = ipvs.read(counters=False, keys=[KEY, v6, sticky, capped]).table
    first = ipvs.read(counters=False)  # an adapter's first whole read: by netlink
    whole = ipvs.read(counters=False)
    assert (ipvs.text_reads, ipvs.netlink_reads) == (1, 1)
    assert first.table == by_netlink and whole.table == by_netlink
    assert whole.table[capped].servers[limited.ident].settings() == (1, Forward.NAT, 5, 2)
    assert whole.table[sticky].service.persistence == 360
    # No connection: no gauge in the text; the netlink re-read says zeros.
    assert all(k == capped and not (g.active or g.inactive) for (k, _), g in whole.stats.items())


def test_edits_change_scheduler_persistence_weight_and_forward_in_place(ipvs, netns):
    ipvs.write(Write(ADD, Service(KEY, "wlc", 0)))
    ipvs.write(Write(ADD, Service(KEY), server(5)))
    ipvs.write(Write(EDIT, Service(KEY, "rr", 300)))
    ipvs.write(Write(EDIT, Service(KEY), server(5, 9, Forward.TUN)))
    vs = ipvs.read().table[KEY]
    assert vs.service == Service(KEY, "rr", 300)
    assert [s.settings() for s in vs.servers.values()] == [(9, Forward.TUN, 0, 0)]
    assert "rr persistent 300" in sh("ip", "netns", "exec", netns, "ipvsadm", "-Ln")


def test_kernel_errors_become_the_projects_own(ipvs):
    ipvs.write(Write(ADD, Service(KEY)))
    with pytest.raises(IpvsExists):
        ipvs.write(Write(ADD, Service(KEY)))
    with pytest.raises(IpvsNotFound):
        ipvs.write(Write(REMOVE, Service(KEY), server(99)))
    # ENOENT on a new service: its scheduler is missing; the error lists the kernel's.
    with pytest.raises(IpvsRejected, match=r"scheduler 'nosuch' is not in this kernel \(it has: dh, fo, "):
        ipvs.write(
            Write(ADD, Service(ServiceKey(Proto.UDP, KEY.vip, 53), "nosuch"))
        )  # <= 16 chars, else EINVAL


def test_ipv6_and_udp_services_round_trip(ipvs):
    key = ServiceKey(Proto.UDP, ip_address("fd00::100"), 53)
    ipvs.write(Write(ADD, Service(key, "rr", 60)))
    ipvs.write(Write(ADD, Service(key), RealServer(ip_address("fd00::5"), 53, 2)))
    vs = ipvs.read().table[key]
    assert vs.service == Service(key, "rr", 60)
    assert [(str(s.addr), s.weight) for s in vs.servers.values()] == [("fd00::5", 2)]


def test_batched_writes_apply_in_order_and_answer_for_each_write(ipvs, netns):
    v6 = ServiceKey(Proto.UDP, ip_address("fd00::100"), 53)
    writes = [
        Write(ADD, Service(KEY, "wlc")),
        Write(ADD, Service(KEY), server(5)),
        Write(ADD, Service(KEY), server(6, 3, Forward.DR)),
        Write(ADD, Service(KEY), server(5)),  # already there
        Write(EDIT, Service(KEY), server(5, 4, Forward.TUN)),
        Write(REMOVE, Service(KEY), server(99)),  # never there
        Write(ADD, Service(v6, "rr", 60)),
        Write(ADD, Service(v6), RealServer(ip_address("fd00::5"), 53, 2)),
        Write(EDIT, Service(KEY, "sh", 300)),
    ]
    results = ipvs.write_all(writes)
    assert [type(r).__name__ if r else None for r in results] == [
        None, None, None, "IpvsExists", None, "IpvsNotFound", None, None, None,
    ]  # fmt: skip
    table = ipvs.read().table
    assert table[KEY].service == Service(KEY, "sh", 300)
    assert {s.ident: s.settings() for s in table[KEY].servers.values()} == {
        server(5).ident: (4, Forward.TUN, 0, 0),
        server(6).ident: (3, Forward.DR, 0, 0),
    }
    assert [(str(s.addr), s.weight) for s in table[v6].servers.values()] == [("fd00::5", 2)]
    # The single-call path (pyroute2's own messages) still works on the same socket.
    ipvs.write(Write(REMOVE, Service(KEY), server(6)))
    assert len(ipvs.read().table[KEY].servers) == 1


def test_more_writes_than_one_batch_take_several_sends_and_all_land(ipvs, netns):
    keys = [ServiceKey(Proto.TCP, ip_address("1.2.4.0") + i, 80) for i in range(120)]
    writes = [Write(ADD, Service(k, "rr")) for k in keys]
    writes += [Write(ADD, Service(k), server(10 + n)) for k in keys for n in range(10)]
    assert len(writes) > 2 * BATCH
    assert ipvs.write_all(writes) == [None] * len(writes)
    table = ipvs.read().table
    assert set(table) == set(keys) and {len(vs.servers) for vs in table.values()} == {10}
    saved = sh("ip", "netns", "exec", netns, "ipvsadm", "-Sn").splitlines()
    assert len(saved) == len(writes)


class Recorded:
    """The real adapter, with the names of the calls made on it kept in order."""

    def __init__(self, ipvs: IpvsAdapter) -> None:
        self.ipvs, self.made = ipvs, []

    def __getattr__(self, name: str):
        if name != "write":
            self.made.append(name)
            return getattr(self.ipvs, name)

        def write(w: Write) -> None:  # a lone write, named by what it does
            self.made.append(f"{w.verb}_{'server' if w.server else 'service'}")
            self.ipvs.write(w)

        return write


def test_the_applier_mends_what_appeared_or_went_since_the_read_and_names_a_missing_scheduler(ipvs):
    ipvs.write(Write(ADD, Service(KEY, "wlc")))
    ipvs.write(Write(ADD, Service(KEY), server(5, 1)))
    missing = Service(ServiceKey(Proto.UDP, KEY.vip, 53), "nosuch")
    ops = [
        AddService(Service(KEY, "rr")),  # exists: becomes an edit
        AddServer(KEY, server(5, 7)),  # exists: becomes an edit
        RemoveServer(KEY, server(99)),  # already gone: done
        AddService(missing),
        AddServer(missing.key, server(6)),  # its service could not be made: not tried alone
    ]
    calls = Recorded(ipvs)
    outcome = Applier(calls, None, ControllerMetrics()).apply(ops)  # type: ignore[arg-type]
    # A failure is a value of the outcome (the controller says it, once).
    errors = [str(f) for f in outcome.failures]
    assert len(errors) == 1, errors
    assert [type(op).__name__ for op in outcome.applied] == ["AddService", "AddServer", "RemoveServer"]
    # One batch; what was already there is changed at once (no second add);
    # the missing scheduler's service is tried alone to name it.
    assert calls.made == ["write_all", "edit_service", "edit_server", "add_service"], calls.made
    assert "scheduler 'nosuch' is not in this kernel" in errors[0]
    table = ipvs.read().table
    assert table[KEY].service == Service(KEY, "rr") and missing.key not in table
    assert [s.settings() for s in table[KEY].servers.values()] == [(7, Forward.NAT, 0, 0)]


def test_the_adapter_reads_and_writes_with_its_socket_numbered_past_1024(netns):
    # A controller may hold many descriptors (select() cannot watch these).
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(limits[1], 4096)))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        ipvs = IpvsAdapter(f"/run/netns/{netns}", Settings())
        try:
            assert ipvs._raw.fileno() > 1024
            ipvs.write(Write(ADD, Service(KEY, "rr")))
            again = [Write(ADD, Service(KEY), server(5))] * 2
            assert [type(r).__name__ if r else None for r in ipvs.write_all(again)] == [None, "IpvsExists"]
            assert [s.ident for s in ipvs.read().table[KEY].servers.values()] == [server(5).ident]
        finally:
            ipvs.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_connection_timeouts_are_set_and_read_back_per_namespace(ipvs):
    before = ipvs.timeouts()
    assert before == (900, 120, 300)  # the kernel's defaults in a fresh namespace
    ipvs.set_timeouts(3600, 30, 0)  # 0 leaves UDP as it is
    assert ipvs.timeouts() == (3600, 30, 300)


def test_the_director_owns_the_vips_on_its_interface_and_sets_its_sysctls(netns):
    # A bare namespace, as a container's is (the container directors of the
    # other modules show the rest): so the TCG smoke needs no dockerd.
    path = f"/run/netns/{netns}"
    ipvs = IpvsAdapter(path, Settings())  # loads ip_vs, so vs.conntrack exists
    d = Director(path, Settings(masquerade=True))
    try:
        d.prepare()
        d.prepare()  # idempotent
        assert d.read_sysctl("net.ipv4.ip_forward") == "1"
        assert d.read_sysctl("net.ipv4.vs.conntrack") == "1"
        # IPVS's own, for draining servers (docs/operating.md: why each).
        assert d.read_sysctl("net.ipv4.vs.expire_nodest_conn") == "1"
        assert d.read_sysctl("net.ipv4.vs.expire_quiescent_template") == "1"
        assert d.read_sysctl("net.ipv4.vs.conn_reuse_mode") == "1"
        # VIPs on the dummy are never answered for, or announced, on the network.
        assert d.read_sysctl("net.ipv4.conf.all.arp_ignore") == "1"
        assert d.read_sysctl("net.ipv4.conf.all.arp_announce") == "2"
        assert ip_address("1.2.3.4") not in d.addresses()
        assert any(who.startswith("the director's address on eth0") for who in d.addresses().values())
        assert d.vips() == frozenset()
        d.add_vip(ip_address("1.2.3.4"))
        d.add_vip(ip_address("fd00::100"))
        d.add_vip(ip_address("1.2.3.4"))
        assert d.vips() == {ip_address("1.2.3.4"), ip_address("fd00::100")}
        shown = sh("ip", "-n", netns, "addr", "show", "dockerlb0")
        assert "1.2.3.4/32" in shown and "fd00::100/128" in shown
        d.remove_vip(ip_address("1.2.3.4"))
        d.remove_vip(ip_address("1.2.3.4"))
        assert d.vips() == {ip_address("fd00::100")}
    finally:
        d.close()
        ipvs.close()


def refusal(path: str, settings: Settings) -> str:
    d = Director(path, settings)
    try:
        with pytest.raises(DirectorError) as refused:
            d.prepare()
    finally:
        d.close()
    return str(refused.value)


def test_the_director_refuses_an_interface_that_is_not_its_own_dummy(netns):
    path = f"/run/netns/{netns}"
    assert refusal(path, Settings(interface="lo")) == (
        "interface lo is not a dummy interface (kind: none); every address on --interface counts "
        "as a VIP dockerlb owns: pick a name of its own"
    )
    # eth0 is a dummy here, but another controller's.
    sh("ip", "-n", netns, "link", "set", "eth0", "alias", "dockerlb prefix=team-b.")
    assert refusal(path, Settings(interface="eth0")) == (
        "interface eth0 belongs to another controller (dockerlb prefix=team-b.); give each "
        "controller in one namespace its own --interface"
    )
    assert "10.9.0.1/24" in sh("ip", "-n", netns, "addr", "show", "eth0")  # untouched


def test_two_prefixes_cannot_share_one_interface(netns):
    path = f"/run/netns/{netns}"
    first = Director(path, Settings(label_prefix="team-a."))
    second = Director(path, Settings(label_prefix="team-b."))
    try:
        first.prepare()
        with pytest.raises(
            DirectorError, match=r"belongs to another controller \(dockerlb prefix=team-a\.\)"
        ):
            second.prepare()
        assert "dockerlb prefix=team-a." in sh("ip", "-n", netns, "link", "show", "dockerlb0")
    finally:
        first.close()
        second.close()


def test_ipv6_forwarding_goes_back_to_what_it_was_when_asked(netns):
    path = f"/run/netns/{netns}"
    d = Director(path, Settings())
    try:
        d.prepare()
        assert d.read_sysctl("net.ipv6.conf.all.forwarding") == "0"
        d.add_vip(ip_address("fd00:77::1"))
        assert d.read_sysctl("net.ipv6.conf.all.forwarding") == "1"
        d.restore_forwarding()
        assert d.read_sysctl("net.ipv6.conf.all.forwarding") == "0"
    finally:
        d.close()
