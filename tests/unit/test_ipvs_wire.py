"""The IPVS adapter's own messages say exactly what pyroute2's IPVS records
say: writes encoded both ways and decoded by pyroute2's ipvsmsg; dumps
encoded by pyroute2 and read both ways."""

import struct
from ipaddress import ip_address

import pytest
from pyroute2.netlink.generic import ipvs as genl

from dockerlb.adapters.ipvs_wire import (
    dump_request,
    encode,
    server_of,
    service_of,
)
from dockerlb.adapters.netlink_wire import errors_in
from dockerlb.core.model import Forward, Proto, RealServer, ServerStats, Service, ServiceKey
from dockerlb.core.plan import ADD, EDIT, REMOVE, Write
from harness.pyroute2_reference import (
    FAMILY,
    dumped,
    server_from,
    server_record,
    service_from,
    service_record,
    stats64,
)

pytestmark = pytest.mark.unit
V4 = Service(ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000), "wlc")
V4_PERSISTENT = Service(ServiceKey(Proto.UDP, ip_address("1.2.3.5"), 53), "sh", persistence=300)
V6 = Service(ServiceKey(Proto.TCP, ip_address("fd00::1"), 80), "rr")
SCTP = Service(ServiceKey(Proto.SCTP, ip_address("1.2.3.6"), 3868), "rr")
MH = Service(ServiceKey(Proto.TCP, ip_address("10.20.30.1"), 8000), "mh")
PYROUTE2_VERB = {ADD: "NEW", EDIT: "SET", REMOVE: "DEL"}


def pyroute2_message(write: Write) -> genl.ipvsmsg:
    """The message pyroute2's IPVS.service()/dest() would send."""
    msg = genl.ipvsmsg()
    msg["version"] = genl.GENL_VERSION
    if write.server is None:
        msg["cmd"] = getattr(genl, f"IPVS_CMD_{PYROUTE2_VERB[write.verb]}_SERVICE")
        msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", service_record(write.service).dump_nla())]
    else:
        msg["cmd"] = getattr(genl, f"IPVS_CMD_{PYROUTE2_VERB[write.verb]}_DEST")
        msg["attrs"] = [
            ("IPVS_CMD_ATTR_SERVICE", service_record(write.service).dump_key()),
            ("IPVS_CMD_ATTR_DEST", server_record(write.server).dump_nla()),
        ]
    msg["header"].update(type=FAMILY, flags=1, sequence_number=7, pid=0)
    msg.encode()
    return decoded(msg.data)


def decoded(data: bytes) -> genl.ipvsmsg:
    msg = genl.ipvsmsg(data)
    msg.decode()
    return msg


def meaning(msg: genl.ipvsmsg) -> dict:
    out = {"cmd": msg["cmd"], "version": msg["version"], "type": msg["header"]["type"]}
    for name in ("IPVS_CMD_ATTR_SERVICE", "IPVS_CMD_ATTR_DEST"):
        nla = msg.get_attr(name)
        if nla is not None:
            # TUN_*: pyroute2 sends zeros; the kernel's defaults are the same.
            out[name] = {k: v for k, v in nla["attrs"] if not k.startswith("IPVS_DEST_ATTR_TUN_")}
    return out


WRITES = [
    Write(verb, service, server)
    for verb in (ADD, EDIT, REMOVE)
    for service, server in (
        (V4, None),
        (V4_PERSISTENT, None),
        (V6, None),
        (SCTP, None),
        (MH, None),
        (V4, RealServer(ip_address("172.18.0.3"), 8000, 1, Forward.NAT)),
        (
            V4,
            RealServer(
                ip_address("172.18.0.4"), 8000, 1, Forward.NAT, upper_threshold=100, lower_threshold=60
            ),
        ),
        (SCTP, RealServer(ip_address("10.9.0.4"), 3868, 1, Forward.DR, upper_threshold=65535)),
        (V4_PERSISTENT, RealServer(ip_address("10.9.0.2"), 53, 0, Forward.DR)),
        (V4, RealServer(ip_address("10.9.0.3"), 8000, 7, Forward.TUN)),
        (V6, RealServer(ip_address("fd00::a"), 8080, 2, Forward.NAT)),
    )
]


@pytest.mark.parametrize("write", WRITES, ids=lambda w: f"{w.verb}-{w.service.key}-{w.server}")
def test_each_write_means_what_pyroute2s_own_message_means(write):
    ours = decoded(encode(write, FAMILY, 7, 0))
    assert meaning(ours) == meaning(pyroute2_message(write))
    assert ours["header"]["length"] == len(encode(write, FAMILY, 7, 0))


def test_failures_and_the_final_ack_are_read_by_sequence_number():
    def error(seq: int, code: int, echoed: bytes = b"") -> bytes:
        body = struct.pack("=i", -code) + struct.pack("=IHHII", 16, FAMILY, 1, seq, 0) + echoed
        return struct.pack("=IHHII", 16 + len(body), 2, 0, seq, 99) + body

    datagram = error(41, 17, b"\x01\x01\x00\x00") + error(42, 0)
    assert errors_in(datagram) == [(41, 17), (42, 0)]
    assert errors_in(struct.pack("=IHHII", 20, 0x1C, 2, 5, 0) + b"\0" * 4) == []  # not an answer


@pytest.mark.parametrize("service", [V4, V4_PERSISTENT, V6, SCTP], ids=str)
def test_a_dumped_service_reads_as_pyroute2_reads_it(service):
    record = service_record(service).dump_nla()["attrs"]
    data = dumped("IPVS_CMD_ATTR_SERVICE", [*record, stats64("IPVS_SVC_ATTR_")])
    ours, counters = service_of(data[16:])
    assert ours == service_from(decoded(data).get_attr("IPVS_CMD_ATTR_SERVICE")) == service
    assert counters == ServerStats(conns=42, inpkts=10, outpkts=11, inbytes=600, outbytes=2**40, cps=3)


def test_a_firewall_mark_service_is_skipped():
    fwmark = [("IPVS_SVC_ATTR_AF", 2), ("IPVS_SVC_ATTR_PROTOCOL", 0), ("IPVS_SVC_ATTR_FWMARK", 7)]
    assert service_of(dumped("IPVS_CMD_ATTR_SERVICE", fwmark)[16:]) is None


@pytest.mark.parametrize(
    "server",
    [
        RealServer(ip_address("172.18.0.3"), 8000, 1, Forward.NAT),
        RealServer(ip_address("10.9.0.2"), 53, 0, Forward.DR),
        RealServer(ip_address("10.9.0.3"), 8000, 7, Forward.TUN),
        RealServer(ip_address("fd00::a"), 8080, 2, Forward.NAT),
        RealServer(ip_address("10.9.0.4"), 80, 1, Forward.NAT, upper_threshold=3, lower_threshold=1),
    ],
    ids=str,
)
def test_a_dumped_real_server_reads_as_pyroute2_reads_it(server):
    record = server_record(server).dump_nla()["attrs"]
    gauges = [("IPVS_DEST_ATTR_ACTIVE_CONNS", 5), ("IPVS_DEST_ATTR_INACT_CONNS", 6)]
    data = dumped("IPVS_CMD_ATTR_DEST", [*record, *gauges, stats64("IPVS_DEST_ATTR_")])
    ours = server_of(data[16:], server.addr.version)
    assert ours == server_from(decoded(data).get_attr("IPVS_CMD_ATTR_DEST"))
    assert ours[0].settings() == server.settings()  # the thresholds too: equality leaves none out
    assert ours[0] == server and (ours[1].active, ours[1].inactive, ours[1].conns) == (5, 6, 42)


def test_a_dump_request_asks_for_one_services_servers_by_its_key():
    msg = decoded(dump_request(FAMILY, 3, V6.key))
    assert (msg["cmd"], msg["header"]["flags"], msg["header"]["sequence_number"]) == (
        genl.IPVS_CMD_GET_DEST, 0x301, 3,
    )  # fmt: skip
    assert dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"]) == {
        "IPVS_SVC_ATTR_AF": 10,
        "IPVS_SVC_ATTR_PROTOCOL": 6,
        "IPVS_SVC_ATTR_ADDR": "fd00::1",
        "IPVS_SVC_ATTR_PORT": 80,
    }


def test_without_counters_a_server_keeps_its_connection_gauges_only():
    server = RealServer(ip_address("172.18.0.3"), 8000, 1, Forward.NAT)
    gauges = [("IPVS_DEST_ATTR_ACTIVE_CONNS", 5), ("IPVS_DEST_ATTR_INACT_CONNS", 6)]
    data = dumped(
        "IPVS_CMD_ATTR_DEST",
        [*server_record(server).dump_nla()["attrs"], *gauges, stats64("IPVS_DEST_ATTR_")],
    )
    assert server_of(data[16:], 4, counters=False) == (server, ServerStats(active=5, inactive=6))


def test_sequence_numbers_run_consecutively_and_start_over_before_the_u32_ends():
    from dockerlb.adapters.ipvs import _FIRST_SEQ, IpvsAdapter

    adapter = IpvsAdapter.__new__(IpvsAdapter)  # no socket: only the numbering
    adapter._next_seq = 0xFFFFFFFF - 3
    assert adapter._take(3) == 0xFFFFFFFC  # ...FC, FD, FE: still u32
    assert adapter._take(2) == _FIRST_SEQ  # would pass 0xFFFFFFFF: starts over
    assert adapter._take(1) == _FIRST_SEQ + 2
    encode(Write(ADD, V4), FAMILY, 0xFFFFFFFE, 0)  # the largest one used still packs


def test_an_sctp_service_is_ipprotos_132_and_a_servers_thresholds_are_u32s():
    server = RealServer(
        ip_address("10.9.0.4"), 3868, 1, Forward.TUN, upper_threshold=300, lower_threshold=200
    )
    msg = decoded(encode(Write(ADD, SCTP, server), FAMILY, 7, 0))
    assert msg.get_attr("IPVS_CMD_ATTR_SERVICE").get_attr("IPVS_SVC_ATTR_PROTOCOL") == 132
    dest = msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert (dest.get_attr("IPVS_DEST_ATTR_U_THRESH"), dest.get_attr("IPVS_DEST_ATTR_L_THRESH")) == (300, 200)


@pytest.mark.parametrize(
    ("service", "flags"),
    # IP_VS_SVC_F_PERSISTENT 0x1, IP_VS_SVC_F_SCHED1 0x8 (sh-fallback / mh-fallback).
    [(V4, 0x0), (V4_PERSISTENT, 0x9), (MH, 0x8), (V6, 0x0)],
    ids=["wlc", "sh-persistent", "mh", "rr"],
)
def test_sh_and_mh_services_ask_the_kernel_to_send_a_drained_servers_clients_to_the_next_one(service, flags):
    for verb in (ADD, EDIT):
        sent = decoded(encode(Write(verb, service), FAMILY, 7, 0)).get_attr("IPVS_CMD_ATTR_SERVICE")
        assert sent.get_attr("IPVS_SVC_ATTR_FLAGS") == {"flags": flags, "mask": 0xFFFF}
