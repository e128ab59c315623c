"""Kernel tier: every forwarding method end to end, with real traffic.

The topology follows the kernel's own IPVS selftest
(tools/testing/selftests/netfilter/ipvs.sh): a client, a director and real
servers, with NAT, DR and TUN cases. Here the real servers are Docker
containers found by their labels, and one controller serves every case, each
on its own VIP:

    outside 192.168.77.0/24 (a veth, as in the selftest):  outside ── director
    back    172.30.1.0/24 + fd00:30:1::/64:  director, client, every real server

The clients route the VIPs via the director. DR and TUN servers answer the
client directly, so their client sits on their network, as in the selftest.
The client of routed NAT is outside Docker, as a user's LAN client is: a
client on another Docker network would be masqueraded by Docker's own rule
(`-s <its subnet> ! -o <its bridge> -j MASQUERADE`), which br_netfilter
applies to bridged packets too, before the real server ever sees it.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import pytest

from harness.dockerlab import http_server_cmd, in_netns, outside_client, pid_of, wait_for
from tests.kernel.conftest import (
    DR_SYSCTLS,
    TUN_SYSCTLS,
    ControllerProcess,
    dockerlb_image,
    ipvs_table,
    peer,
    server_netns,
)

pytestmark = pytest.mark.kernel
BACK4, BACK6 = "172.30.1.0/24", "fd00:30:1::/64"
OUTSIDE, OUTSIDE_GW = "192.168.77.2", "192.168.77.1"
SNAT, ROUTED, DR, TUN, UDP, WEIGHTS, STICKY, UDP_STICKY = (f"10.10.0.{i}" for i in range(1, 9))
V6 = "fd00:30:ff::5"
SCHED_VIP = "10.10.1.{}"
# Written out, not asked of dockerlb: the scheduler names IPVS knows, and the
# ones Linux 6.1 has (both the UML kernel and Debian's build all of them;
# twos came in 6.2).
SCHEDULERS = ["dh", "fo", "lblc", "lblcr", "lc", "mh", "nq", "ovf", "rr", "sed", "sh", "twos", "wlc", "wrr"]
IN_6_1 = [s for s in SCHEDULERS if s != "twos"]

# Answers GET /cgi-bin/peer with the address the connection came from.
PEER_SERVER = [
    "sh",
    "-c",
    "mkdir -p /www/cgi-bin && hostname > /www/index.html && "
    "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' > /www/cgi-bin/peer && "
    "chmod +x /www/cgi-bin/peer && exec httpd -f -p 8000 -h /www",
]
UDP_SERVER = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 5353))\n"
    "while True:\n"
    "    data, peer = s.recvfrom(512)\n"
    "    s.sendto(socket.gethostname().encode(), peer)\n"
)
# Run inside a client's namespace: n new connections (TCP) or n datagrams
# from n new sockets (UDP); prints each answer's last line, "-" for none.
# A UDP socket sends from source port first + i if ``first`` is given, else
# from one the kernel picks.
CLIENT = """
import socket, sys
proto, host, port, n, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
first = int(sys.argv[6])
for i in range(n):
    try:
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            if first:
                s.bind(("", first + i))
            s.sendto(b"who", (host, port))
            answer = s.recv(512)
        else:
            s = socket.create_connection((host, port), timeout=3)
            s.sendall(f"GET {path} HTTP/1.0\\r\\n\\r\\n".encode())
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        s.close()
        print(answer.decode().strip().splitlines()[-1])
    except OSError:
        print("-")
"""


class ForwardingLab:
    def __init__(self, lab, client) -> None:
        self.lab = lab
        self.back = lab.network("back", subnet=BACK4, ipv6_subnet=BACK6)
        self.director = lab.run("director", network=self.back)
        self.c: dict = {}
        web = http_server_cmd(8000)
        self.serve("snat1", PEER_SERVER, {"vip": f"{SNAT}:8000"})
        self.serve("kc1", PEER_SERVER, {"vip": f"{ROUTED}:8000", "masquerade": "false"})
        for n in ("dr1", "dr2"):
            self.serve(n, web, {"vip": f"{DR}:8000", "forward": "dr", "scheduler": "rr"})
        for n in ("tun1", "tun2"):
            self.serve(n, web, {"vip": f"{TUN}:8000", "forward": "tun", "scheduler": "rr"})
        python = dockerlb_image(client)
        for n in ("udp1", "udp2"):
            self.serve(
                n,
                ["-c", UDP_SERVER],
                {
                    "vip": f"{UDP}:5353",
                    "protocol": "udp",
                    "scheduler": "rr",
                    # The same servers behind a second, persistent UDP VIP.
                    "sticky.vip": f"{UDP_STICKY}:5353",
                    "sticky.protocol": "udp",
                    "sticky.scheduler": "rr",
                    "sticky.persistence": "300",
                },
                image=python,
                entrypoint=["python3"],
                healthcheck={"Test": ["NONE"]},  # the image's own asks dockerlb's /healthz
            )
        for n in ("v6a", "v6b"):
            self.serve(n, web, {"vip": f"[{V6}]:8000", "scheduler": "rr"})
        for n, w in (("w3", "3"), ("w1", "1"), ("w0", "0")):
            self.serve(n, web, {"vip": f"{WEIGHTS}:8000", "scheduler": "wrr", "weight": w})
        for n in ("p1", "p2"):
            self.serve(n, web, {"vip": f"{STICKY}:8000", "scheduler": "rr", "persistence": "300"})
        every = {}
        for i, sched in enumerate(SCHEDULERS, start=1):
            every |= {
                f"dockerlb.{sched}.vip": f"{SCHED_VIP.format(i)}:8000",
                f"dockerlb.{sched}.scheduler": sched,
            }
        self.c["sched"] = lab.run("sched", web, labels=every, network=self.back)

        d4, d6 = self.addr(self.director), self.addr(self.director, 6)
        self.client = lab.run("client", network=self.back, cap_add=["NET_ADMIN"])
        for argv in (
            ["ip", "route", "add", "10.10.0.0/16", "via", d4],
            ["ip", "-6", "route", "add", "fd00:30:ff::/64", "via", d6],
        ):
            r = self.client.exec_run(argv)
            assert r.exit_code == 0, (argv, r.output)
        self.outside = outside_client(pid_of(self.director), lab.suffix, OUTSIDE, OUTSIDE_GW, "10.10.0.0/16")

    def serve(self, name: str, command, labels: dict, **kwargs) -> None:
        full = {f"dockerlb.{k}": v for k, v in labels.items()}
        self.c[name] = self.lab.run(name, command, labels=full, network=self.back, **kwargs)

    def addr(self, c, family: int = 4, net=None) -> str:
        c.reload()
        settings = c.attrs["NetworkSettings"]["Networks"][(net or self.back).name]
        return settings["IPAddress"] if family == 4 else settings["GlobalIPv6Address"]

    def pid(self, name: str) -> int:
        return pid_of(self.c[name])

    def table(self) -> dict:
        return ipvs_table(in_netns(pid_of(self.director), "ipvsadm", "-Ln"))

    def ask(
        self,
        vip: str,
        n: int,
        *,
        port: int = 8000,
        proto: str = "tcp",
        path: str = "/",
        pid: int = 0,
        first_port: int = 0,
    ) -> list:
        """n requests from the client (or the namespace of ``pid``); who answered.
        UDP with ``first_port``: from source ports first_port, first_port + 1..."""
        argv = [CLIENT, proto, vip, str(port), str(n), path, str(first_port)]
        out = in_netns(pid or pid_of(self.client), sys.executable, "-c", *argv)
        names = {c.id[:12]: name for name, c in self.c.items()}
        return [names.get(line.strip(), line.strip()) for line in out.splitlines()]

    def netns_state(self, name: str) -> dict:
        return server_netns(self.pid(name))


@pytest.fixture(scope="module")
def fwd(client):
    from harness.dockerlab import Lab

    lab = Lab(client)
    f = None
    try:
        f = ForwardingLab(lab, client)
        f.before = {n: f.netns_state(n) for n in ("dr1", "tun1", "kc1")}
        ctl = ControllerProcess("--netns", f"container:{f.director.name}", name="forwarding")
        try:
            ctl.wait_ready()
            f.ctl = ctl
            expected = 9 + len(IN_6_1)  # the nine VIPs above, and one per scheduler the kernel has
            wait_for(lambda: len(f.table()) == expected, 180, interval=2, what=f"{expected} services")
            yield f
        finally:
            ctl.stop()
    finally:
        if f is not None:
            f.outside.kill()
            f.outside.wait()
        lab.close()


def test_nat_with_snat_shows_the_director_and_routed_nat_shows_the_client(fwd):
    director_back = fwd.addr(fwd.director)
    assert {peer(a) for a in fwd.ask(SNAT, 3, path="/cgi-bin/peer")} == {director_back}
    got = fwd.ask(ROUTED, 3, path="/cgi-bin/peer", pid=fwd.outside.pid)
    assert [peer(a) for a in got] == [OUTSIDE] * 3, (
        got,
        fwd.netns_state("kc1")["default"],
        in_netns(pid_of(fwd.director), "cat", "/proc/net/ip_vs_conn"),
        in_netns(pid_of(fwd.director), "ip", "-s", "-o", "link"),
        in_netns(pid_of(fwd.director), "nft", "list", "ruleset"),
    )
    # The server's replies go back through the director: dockerlb's route.
    assert fwd.netns_state("kc1")["default"].startswith(f"default via {director_back} dev eth0 proto 76")
    assert fwd.table()[("TCP", f"{ROUTED}:8000", "wlc")] == {(f"{fwd.addr(fwd.c['kc1'])}:8000", "Masq", "1")}


def test_direct_routing_puts_the_vip_on_the_servers_loopback_and_both_answer(fwd):
    got = Counter(fwd.ask(DR, 10))
    assert got == Counter({"dr1": 5, "dr2": 5}), got
    state = fwd.netns_state("dr1")
    assert state["lo"].count("inet ") == 2  # 127.0.0.1 and the VIP
    assert f"inet {DR}/32" in state["lo"]
    assert [state[k] for k in DR_SYSCTLS] == ["1", "2", "1"]
    rows = fwd.table()[("TCP", f"{DR}:8000", "rr")]
    assert {r[1] for r in rows} == {"Route"} and len(rows) == 2


def test_tunnelling_gives_the_servers_a_tunl0_with_the_vip_and_both_answer(fwd):
    got = Counter(fwd.ask(TUN, 10))
    assert got == Counter({"tun1": 5, "tun2": 5}), got
    state = fwd.netns_state("tun1")
    assert f"inet {TUN}/32" in state["tunl0"] and state["tunl0 up"]
    assert [state[k] for k in TUN_SYSCTLS] == ["1", "2", "1", "0", "0"]
    rows = fwd.table()[("TCP", f"{TUN}:8000", "rr")]
    assert {r[1] for r in rows} == {"Tunnel"} and len(rows) == 2


def test_udp_datagrams_from_new_sockets_are_balanced_over_both_servers(fwd):
    # rr sends each new flow to the next server; a datagram from a source
    # port that a flow IPVS still holds (300 s) used is that flow's, and goes
    # where it went. So the exact split holds only for new flows: the 10
    # sockets send from 10 ports below the client's ephemeral range, which no
    # socket the kernel bound (every earlier datagram to this VIP) can have
    # used, and the director (a new namespace for this module) holds no older flow.
    first = 20000
    low, _ = in_netns(pid_of(fwd.client), "cat", "/proc/sys/net/ipv4/ip_local_port_range").split()
    assert first + 10 <= int(low), low
    for name in ("udp1", "udp2"):  # each listens (asked directly: no IPVS flow)
        addr = fwd.addr(fwd.c[name])
        wait_for(lambda a=addr, n=name: fwd.ask(a, 1, port=5353, proto="udp") == [n], 60, what=f"{name}")
    got = Counter(fwd.ask(UDP, 10, port=5353, proto="udp", first_port=first))
    assert got == Counter({"udp1": 5, "udp2": 5}), got
    assert ("UDP", f"{UDP}:5353", "rr") in fwd.table()


def test_persistent_udp_sends_every_datagram_of_one_client_to_one_server(fwd):
    got = Counter(fwd.ask(UDP_STICKY, 10, port=5353, proto="udp"))
    assert len(got) == 1 and set(got) <= {"udp1", "udp2"}, got
    assert "persistent 300" in in_netns(pid_of(fwd.director), "ipvsadm", "-Ln", "-u", f"{UDP_STICKY}:5353")


def test_an_ipv6_vip_balances_over_ipv6_real_servers(fwd):
    got = Counter(fwd.ask(V6, 10))
    assert got == Counter({"v6a": 5, "v6b": 5}), got
    rows = fwd.table()[("TCP", f"[{V6}]:8000", "rr")]
    assert {r[0] for r in rows} == {f"[{fwd.addr(fwd.c[n], 6)}]:8000" for n in ("v6a", "v6b")}


def test_weights_3_and_1_split_400_connections_3_to_1_and_weight_0_gets_none(fwd):
    got = Counter(fwd.ask(WEIGHTS, 400))
    assert got["-"] == 0 and got["w0"] == 0, got
    assert abs(got["w3"] - 300) <= 30 and abs(got["w1"] - 100) <= 10, got
    rows = fwd.table()[("TCP", f"{WEIGHTS}:8000", "wrr")]
    assert (f"{fwd.addr(fwd.c['w0'])}:8000", "Masq", "0") in rows  # listed, with weight 0


def test_persistence_sends_one_client_to_one_server_across_new_connections(fwd):
    got = Counter(fwd.ask(STICKY, 12))
    assert len(got) == 1 and set(got) <= {"p1", "p2"}, got
    assert "persistent 300" in in_netns(pid_of(fwd.director), "ipvsadm", "-Ln", "-t", f"{STICKY}:8000")


def test_every_scheduler_the_kernel_has_can_be_chosen_and_a_missing_one_is_named(fwd):
    table = fwd.table()
    for i, sched in enumerate(SCHEDULERS, start=1):
        key = ("TCP", f"{SCHED_VIP.format(i)}:8000", sched)
        assert (key in table) == (sched in IN_6_1), (sched, sorted(table))
    expected = (
        "scheduler 'twos' is not in this kernel "
        "(it has: dh, fo, lblc, lblcr, lc, mh, nq, ovf, rr, sed, sh, wlc, wrr)"
    )
    assert expected in fwd.ctl.log(), fwd.ctl.log()[-3000:]


def test_servers_that_stop_serving_keep_nothing_dockerlb_added(fwd):
    assert fwd.before["kc1"]["default"].startswith("default via 172.30.1.1 ")  # Docker's gateway
    for name in ("dr1", "tun1", "kc1"):
        fwd.c[name].pause()  # running, but no longer a real server
    try:
        for name in ("dr1", "tun1", "kc1"):
            with contextlib.suppress(AssertionError):  # the comparison below says what differs
                wait_for(lambda n=name: fwd.netns_state(n) == fwd.before[n], 90, interval=2, what=name)
            assert fwd.netns_state(name) == fwd.before[name], fwd.ctl.log()[-3000:]
    finally:
        for name in ("dr1", "tun1", "kc1"):
            fwd.c[name].unpause()
