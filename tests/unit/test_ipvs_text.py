"""The IPVS table as /proc/net/ip_vs writes it (ipvs_text.py): literal texts
in the kernel's format (ip_vs_info_seq_show), parsed into the records a
netlink read makes. The kernel tier checks the two reads agree on a real
table (tests/kernel/test_adapters.py)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from dockerlb.adapters.ipvs_text import TextTable, Unreadable, persistent
from dockerlb.core.model import Forward, Proto, RealServer, ServerStats, Service, ServiceKey, VirtualService

pytestmark = pytest.mark.unit

HEAD = (
    b"IP Virtual Server version 1.2.1 (size=4096)\n"
    b"Prot LocalAddress:Port Scheduler Flags\n"
    b"  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n"
)
TEXT = HEAD + (
    b"TCP  01020304:0050 wlc  \n"
    b"  -> 0A00000B:1F90      Masq    1      0          0         \n"
    b"  -> 0A00000C:1F90      Masq    3      12         7         \n"
    b"UDP  01020305:0035 rr ops persistent 36000 FFFFFFFF\n"
    b"  -> 0A00000D:0035      Route   0      0          0         \n"
    b"TCP  [fd00:0000:0000:0000:0000:0000:0000:0001]:01BB sh \n"
    b"  -> [fd00:0000:0000:0000:0000:0000:0000:000b]:01BB      Tunnel  2      0          0         \n"
    b"  -> [fd00:0000:0000:0000:0000:0000:0000:000c]:01BB      Local   1      0          0         \n"
    b"SCTP  01020306:0050 wlc  \n"
    b"  -> 0A00000E:0050      Masq    1      0          0         \n"
    b"FWM  00000001 wlc \n"
    b"  -> 0A00000F:0000      Masq    1      0          0         \n"
)


def key(proto: Proto, vip: str, port: int) -> ServiceKey:
    return ServiceKey(proto, ip_address(vip), port)


def test_the_text_gives_what_a_netlink_read_gives_and_the_gauges_of_busy_servers():
    table, stats = TextTable().parse(TEXT, hz=100)
    web, dns, v6, diameter = (
        key(Proto.TCP, "1.2.3.4", 80),
        key(Proto.UDP, "1.2.3.5", 53),
        key(Proto.TCP, "fd00::1", 443),
        key(Proto.SCTP, "1.2.3.6", 80),
    )
    assert table == {
        web: VirtualService.of(
            Service(web, "wlc"),
            [RealServer(ip_address("10.0.0.11"), 8080), RealServer(ip_address("10.0.0.12"), 8080, weight=3)],
        ),
        dns: VirtualService.of(
            Service(dns, "rr", persistence=360), [RealServer(ip_address("10.0.0.13"), 53, 0, Forward.DR)]
        ),
        v6: VirtualService.of(
            Service(v6, "sh"),
            [
                RealServer(ip_address("fd00::b"), 443, 2, Forward.TUN),
                RealServer(ip_address("fd00::c"), 443, 1, Forward.DR),  # a local node: as netlink reads it
            ],
        ),
        # SCTP is in the label contract (issue 32), and netlink reads it (IPPROTO_SCTP).
        diameter: VirtualService.of(Service(diameter, "wlc"), [RealServer(ip_address("10.0.0.14"), 80)]),
    }  # firewall-mark services are never dockerlb's (no VIP): left out, as by netlink
    assert stats == {(web, (ip_address("10.0.0.12"), 8080)): ServerStats(active=12, inactive=7)}


def test_a_service_whose_text_did_not_change_is_the_record_the_last_read_made():
    reader = TextTable()
    first, _ = reader.parse(TEXT, hz=100)
    busier = TEXT.replace(b"3      12         7", b"3      40         9")
    moved = busier.replace(b"0A00000D:0035      Route   0", b"0A00000D:0035      Route   5")
    second, stats = reader.parse(moved, hz=100)
    web, dns = key(Proto.TCP, "1.2.3.4", 80), key(Proto.UDP, "1.2.3.5", 53)
    assert second[web] is first[web]  # only its gauges changed
    assert second[dns] is not first[dns] and second[dns].servers[(ip_address("10.0.0.13"), 53)].weight == 5
    assert stats[(web, (ip_address("10.0.0.12"), 8080))] == ServerStats(active=40, inactive=9)


def test_a_persistent_service_needs_the_kernels_hz_which_its_jiffies_and_netlinks_seconds_give():
    with pytest.raises(Unreadable, match="HZ"):
        TextTable().parse(TEXT, hz=None)
    shown = persistent(TEXT)
    assert [(p.key, p.jiffies) for p in shown] == [(key(Proto.UDP, "1.2.3.5", 53), 36000)]


@pytest.mark.parametrize(
    "text",
    [
        b"not the table\n",
        HEAD + b"  -> 0A00000B:1F90      Masq    1      0          0\n",
        HEAD + b"TCP  01020304:0050 wlc\n  -> 0A00000B:1F90      Warp    1      0          0\n",
    ],
)
def test_text_of_another_shape_is_refused(text):
    with pytest.raises(Unreadable):
        TextTable().parse(text, hz=100)


# -- the adapter's whole read: the text, and netlink where the text cannot say -----------------
def text_of(kernel: dict[ServiceKey, VirtualService]) -> bytes:
    """``kernel`` (IPv4, not persistent, NAT) as ip_vs_info_seq_show writes it: no thresholds."""
    out = HEAD
    for k, vs in kernel.items():
        out += b"%s  %08X:%04X %s \n" % (
            k.proto.upper().encode(),
            int(k.vip),
            k.port,
            vs.service.scheduler.encode(),
        )
        for s in vs.servers.values():
            out += b"  -> %08X:%04X      Masq    %-6d 0          0         \n" % (
                int(s.addr),
                s.port,
                s.weight,
            )
    return out


def adapter_over(kernel: dict[ServiceKey, VirtualService]):
    """An IpvsAdapter with no socket: its text is ``kernel`` as the kernel
    writes it, its netlink read ``kernel`` itself (each one's keys noted)."""
    from dockerlb.adapters.ipvs import _FIRST_SEQ, IpvsAdapter
    from dockerlb.core.model import Snapshot

    a = IpvsAdapter.__new__(IpvsAdapter)
    a._text, a._hz, a.text_reads, a.netlink_reads = TextTable(), 100, 0, 0
    a._whole_by_netlink, a._thresholded = False, set()
    a._call = lambda f: f()
    a._text_of = lambda: text_of(kernel)
    a.by_netlink = []

    def netlink(counters, wanted):
        a.by_netlink.append(wanted)
        return Snapshot({k: vs for k, vs in kernel.items() if wanted is None or k in wanted}, {})

    a._read = netlink
    a._sock, a._next_seq = type("Sock", (), {"prid": 0x1C})(), _FIRST_SEQ
    a._send = lambda data: None
    a._answers_to = lambda first, last: []  # every write taken
    return a


def test_a_whole_read_by_text_reads_the_services_whose_servers_have_thresholds_by_netlink():
    from dockerlb.core.plan import EDIT, Write

    capped, plain = key(Proto.TCP, "1.2.3.4", 80), key(Proto.SCTP, "1.2.3.5", 3868)
    one = RealServer(ip_address("10.0.0.11"), 80, upper_threshold=5, lower_threshold=2)
    two = RealServer(ip_address("10.0.0.12"), 3868)
    kernel = {
        capped: VirtualService.of(Service(capped), [one]),
        plain: VirtualService.of(Service(plain, "rr"), [two]),
    }
    a = adapter_over(kernel)
    # A new adapter's first whole read is by netlink: it learns which services have thresholds.
    assert a.read(counters=False).table == kernel
    assert (a.text_reads, a.netlink_reads, a.by_netlink) == (0, 1, [None])
    # Then the text, and the thresholded service again by netlink: the text says (0, 0) for it.
    assert a.read(counters=False).table == kernel
    assert (a.text_reads, a.netlink_reads, a.by_netlink[1:]) == (1, 1, [{capped}])
    # A server given thresholds by this adapter: its service is read by netlink from then on.
    limited = RealServer(two.addr, two.port, upper_threshold=9, lower_threshold=3)
    assert a.write_all([Write(EDIT, Service(plain, "rr"), limited)]) == [None]
    kernel[plain] = VirtualService.of(Service(plain, "rr"), [limited])
    assert a.read(counters=False).table == kernel
    assert a.by_netlink[2:] == [{capped, plain}]
