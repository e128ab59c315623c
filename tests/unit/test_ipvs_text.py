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
    web, dns, v6 = (
        key(Proto.TCP, "1.2.3.4", 80),
        key(Proto.UDP, "1.2.3.5", 53),
        key(Proto.TCP, "fd00::1", 443),
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
    }  # SCTP and firewall-mark services are never dockerlb's: left out, as by netlink
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
