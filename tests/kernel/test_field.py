"""Kernel tier: what the field has (issue 32), with real traffic: connection
thresholds, SCTP associations through NAT, DR and TUN, a drain watched and
waited on, and `doctor --probe` naming each step broken on purpose.

    back 172.30.32.0/24: director, client, every real server
    outside 192.168.78.0/24 (a veth): outside ── director   (routed NAT's client)

Every real server is one Python program (in the dockerlb image) that
answers each new TCP connection or SCTP association with its hostname and
then holds it open until the client closes; it ignores SIGTERM (a lame
duck), so a `docker kill --signal TERM` starts a drain and the server keeps
its connections. Who answered is the oracle, with ipvsadm.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest

from harness.dockerlab import Lab, in_netns, outside_client, pid_of, wait_for
from tests.kernel.conftest import ControllerProcess, dockerlb_image, ipvs_table

pytestmark = pytest.mark.kernel
BACK = "172.30.32.0/24"
OUTSIDE, OUTSIDE_GW = "192.168.78.2", "192.168.78.1"
CAPPED, SCTP_NAT, SCTP_DR, SCTP_TUN, DRAIN, ROUTED = (f"10.11.0.{i}" for i in range(1, 7))
METRICS = "127.0.0.1:19479"

SERVER = """
import signal, socket, sys, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a lame duck: serves on after TERM until killed
name = socket.gethostname().encode() + b"\\n"

def hold(c):
    with c:
        try:
            c.sendall(name)
            while c.recv(65536):
                pass
        except OSError:
            pass

def serve(proto, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP if proto == "sctp" else 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=hold, args=(c,), daemon=True).start()

for spec in sys.argv[1:]:
    proto, port = spec.split(":")
    threading.Thread(target=serve, args=(proto, int(port)), daemon=True).start()
threading.Event().wait()
"""
# Run in the client's namespace: reads commands on stdin. "open N": N new
# connections (associations), each held, printing who answered ("-" for
# none); "close I rst|fin": ends connection I (RST: the entry leaves IPVS
# after 10 s in CLOSE); prints "ok" after each command.
HOLDER = """
import socket, struct, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = []
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "open":
        for _ in range(int(args[0])):
            kind = socket.IPPROTO_SCTP if proto == "sctp" else 0
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, kind)
            s.settimeout(5)
            try:
                s.connect((host, port))
                print(s.recv(256).decode().strip() or "-", flush=True)
            except OSError:
                print("-", flush=True)
            held.append(s)
    elif cmd == "close":
        s = held[int(args[0])]
        if args[1] == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    print("ok", flush=True)
"""


class FieldLab:
    def __init__(self, lab, client) -> None:
        self.lab = lab
        self.back = lab.network("back", subnet=BACK)
        self.director = lab.run("director", network=self.back)
        self.python = dockerlb_image(client)
        self.c: dict = {}
        self.serve("cap", ["tcp:7000"], {"vip": f"{CAPPED}:7000", "scheduler": "rr",
                                          "upper_threshold": "2", "lower_threshold": "1"})  # fmt: skip
        self.serve("free", ["tcp:7000"], {"vip": f"{CAPPED}:7000", "scheduler": "rr"})
        for forward, vip, port, names in (
            ("nat", SCTP_NAT, 7001, ("n1", "n2")),
            ("dr", SCTP_DR, 7002, ("r1", "r2")),
            ("tun", SCTP_TUN, 7003, ("t1", "t2")),
        ):
            for n in names:
                # The same servers behind a TCP service on the same VIP:port (doctor probes it).
                labels = {"vip": f"{vip}:{port}", "protocol": "sctp", "forward": forward,
                          "scheduler": "rr", "tcp.vip": f"{vip}:{port}", "tcp.forward": forward,
                          "tcp.scheduler": "rr"}  # fmt: skip
                self.serve(n, [f"sctp:{port}", f"tcp:{port}"], labels)
        for n in ("d1", "d2"):
            self.serve(n, ["tcp:7004"], {"vip": f"{DRAIN}:7004", "scheduler": "rr"})
        self.serve("kc", ["tcp:7005"], {"vip": f"{ROUTED}:7005", "masquerade": "false"})
        self.client = lab.run("client", network=self.back, cap_add=["NET_ADMIN"])
        r = self.client.exec_run(["ip", "route", "add", "10.11.0.0/16", "via", self.addr(self.director)])
        assert r.exit_code == 0, r.output
        self.outside = outside_client(pid_of(self.director), lab.suffix, OUTSIDE, OUTSIDE_GW, "10.11.0.0/16")

    def serve(self, name: str, listens: list[str], labels: dict) -> None:
        self.c[name] = self.lab.run(
            name,
            ["-c", SERVER, *listens],
            labels={f"dockerlb.{k}": v for k, v in labels.items()},
            network=self.back,
            image=self.python,
            entrypoint=["python3"],
            healthcheck={"Test": ["NONE"]},
        )

    def addr(self, c) -> str:
        c.reload()
        return c.attrs["NetworkSettings"]["Networks"][self.back.name]["IPAddress"]

    def names(self) -> dict[str, str]:
        return {c.id[:12]: name for name, c in self.c.items()}

    def ipvsadm(self, *args: str) -> str:
        return in_netns(pid_of(self.director), "ipvsadm", *args)

    def table(self) -> dict:
        return ipvs_table(self.ipvsadm("-Ln"))

    def row(self, name: str, vip: str, port: int, *flags: str) -> list[str]:
        """The real server's row of `ipvsadm -Ln [flags] -t VIP:PORT`, split."""
        rows = [line.split() for line in self.ipvsadm("-Ln", *flags, "-t", f"{vip}:{port}").splitlines()]
        mine = f"{self.addr(self.c[name])}:{port}"
        return next(r for r in rows if len(r) > 1 and r[1] == mine)

    def held(self, proto: str, vip: str, port: int, pid: int = 0) -> Holder:
        return Holder(pid or pid_of(self.client), proto, vip, port, self.names())


class Holder:
    """Connections held open from a client namespace (HOLDER)."""

    def __init__(self, pid: int, proto: str, vip: str, port: int, names: dict[str, str]) -> None:
        self.names = names
        self.proc = subprocess.Popen(
            ["/usr/bin/nsenter", "-t", str(pid), "-n", sys.executable, "-c", HOLDER, proto, vip, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.who: list[str] = []  # who answered each connection, in order

    def _say(self, line: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = []
        while (got := self.proc.stdout.readline().strip()) != "ok":
            assert got, "the holder ended"
            out.append(self.names.get(got, got))
        return out

    def open(self, n: int) -> list[str]:
        got = self._say(f"open {n}")
        self.who += got
        return got

    def close(self, i: int, how: str = "fin") -> None:
        self._say(f"close {i} {how}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate()  # reaps it and closes both pipes


@pytest.fixture(scope="module")
def field(client):
    with contextlib.ExitStack() as undo:  # in reverse: the controller, the outside client, the lab
        lab = Lab(client)
        undo.callback(lab.close)
        f = FieldLab(lab, client)
        undo.callback(f.outside.wait)
        undo.callback(f.outside.kill)
        director = f"container:{f.director.name}"
        f.ctl = ControllerProcess("--netns", director, "--drain-timeout", "120", "--resync-interval", "5",
                                  "--metrics-listen", METRICS, name="field")  # fmt: skip
        undo.callback(f.ctl.stop)
        f.ctl.wait_ready()
        wait_for(lambda: len(f.table()) == 9, 180, interval=2, what="9 services")
        yield f


def dockerlb(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dockerlb.app.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_a_server_at_its_upper_threshold_gets_no_new_connection_until_it_falls_below_its_lower(field):
    limits = field.row("cap", CAPPED, 7000, "--thresholds")
    assert limits[2:4] == ["2", "1"], limits  # Uthreshold, Lthreshold as ipvsadm reads them
    assert field.row("free", CAPPED, 7000, "--thresholds")[2:4] == ["0", "0"]
    held = field.held("tcp", CAPPED, 7000)
    try:
        # rr alternates until cap holds 2 (its upper threshold), then skips it.
        assert Counter(held.open(4)) == Counter({"cap": 2, "free": 2}), held.who
        assert held.open(4) == ["free"] * 4
        caps = [i for i, who in enumerate(held.who) if who == "cap"]
        # One of cap's two ends (RST: IPVS forgets it 10 s later): 1 is not below 1.
        held.close(caps[0], "rst")
        wait_for(lambda: field.row("cap", CAPPED, 7000)[4:6] == ["1", "0"], 60, interval=1, what="cap at 1")
        time.sleep(1)
        assert held.open(2) == ["free"] * 2
        held.close(caps[1], "rst")
        wait_for(lambda: field.row("cap", CAPPED, 7000)[4:6] == ["0", "0"], 60, interval=1, what="cap at 0")
        assert "cap" in held.open(2), held.who
    finally:
        held.stop()
    # Set by hand, put back by the next full pass: the thresholds are read back and compared.
    addr = field.addr(field.c["cap"])
    field.ipvsadm("-e", "-t", f"{CAPPED}:7000", "-r", f"{addr}:7000", "-m", "-x", "9", "-y", "3")
    wait_for(
        lambda: field.row("cap", CAPPED, 7000, "--thresholds")[2:4] == ["2", "1"],
        60,
        interval=1,
        what="mended",
    )
    # The applier logs after the kernel's ack: wait for the line itself.
    said = f"upper_threshold=9->2 lower_threshold=3->1 ({field.c['cap'].name})"
    wait_for(lambda: said in field.ctl.log(), 30, what="the mending logged")


ASSOCIATE = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    s.settimeout(5)
    try:
        s.connect((host, port))
        print(s.recv(256).decode().strip() or "-")
    except OSError as e:
        print("-", e)
    s.close()
"""


@pytest.mark.parametrize(
    ("vip", "port", "names", "forward"),
    [
        (SCTP_NAT, 7001, ("n1", "n2"), "Masq"),
        (SCTP_DR, 7002, ("r1", "r2"), "Route"),
        (SCTP_TUN, 7003, ("t1", "t2"), "Tunnel"),
    ],
    ids=["nat", "dr", "tun"],
)
def test_sctp_associations_through_the_vip_reach_each_server(field, vip, port, names, forward):
    rows = field.table()[("SCTP", f"{vip}:{port}", "rr")]
    assert {(r[0], r[1]) for r in rows} == {(f"{field.addr(field.c[n])}:{port}", forward) for n in names}
    out = in_netns(pid_of(field.client), sys.executable, "-c", ASSOCIATE, vip, str(port), "10")
    got = Counter(field.names().get(line.split()[0], line) for line in out.splitlines())
    assert got == Counter({names[0]: 5, names[1]: 5}), (
        out,
        field.ipvsadm("-Ln", "--sctp-service", f"{vip}:{port}"),
    )


def metric(name: str, container: str) -> float | None:
    text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'container="{container}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_drain_held_open_by_a_connection_is_watched_and_waited_on_until_it_ends(field):
    d1 = field.c["d1"].name
    netns = f"container:{field.director.name}"
    held = field.held("tcp", DRAIN, 7004)
    try:
        assert sorted(held.open(2)) == ["d1", "d2"]
        field.c["d1"].kill(signal="SIGTERM")  # a lame duck: it serves on, dockerlb drains it
        wait_for(lambda: field.row("d1", DRAIN, 7004)[3] == "0", 30, interval=0.5, what="d1 at weight 0")
        status = json.loads(dockerlb("status", "--netns", netns, "--json").stdout)
        (server,) = [s for svc in status["services"] for s in svc["servers"] if s["container"] == d1]
        assert (server["state"], server["active"], server["weight"]) == ("draining", 1, 0), server
        assert 60 < server["drain_left"] < 120, server
        assert "draining (" in dockerlb("status", "--netns", netns).stdout
        assert metric("dockerlb_server_draining", d1) == 1
        assert 60 < metric("dockerlb_server_drain_seconds_left", d1) < 120
        assert metric("dockerlb_server_draining", field.c["d2"].name) == 0

        short = dockerlb("drain", "wait", d1, "--netns", netns, "--timeout", "2")
        assert short.returncode == 1, short
        assert f"{d1}: not drained after 2 s: TCP {DRAIN}:7004 -> " in short.stderr
        assert "has 1 active connection(s)" in short.stderr, short.stderr
        usage = dockerlb("drain", "wait", "no-such-container", "--netns", netns)
        assert usage.returncode == 2 and "no container 'no-such-container'" in usage.stderr, usage

        waiting = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dockerlb.app.cli",
                "drain",
                "wait",
                d1,
                "--netns",
                netns,
                "--timeout",
                "90",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(5)
        assert waiting.poll() is None, waiting.communicate()  # the connection holds the drain open
        ended = time.monotonic()
        held.close(held.who.index("d1"))
        out, err = waiting.communicate(timeout=60)
        took = time.monotonic() - ended
        assert waiting.returncode == 0, (out, err)
        assert out.startswith(f"{d1}: drained after "), out
        print(f"drain wait returned {took:.1f} s after the last connection ended")
        assert took < 15
        # The controller saw the same: the drained server leaves the table.
        wait_for(
            lambda: field.addr(field.c["d1"]) not in field.ipvsadm("-Ln"), 30, interval=1, what="d1 gone"
        )
    finally:
        held.stop()


# -- doctor --probe ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def quiet(field):
    """The field lab with its controller stopped (the IPVS table stays): what
    the probes break, a running controller would mend at its next pass."""
    field.ctl.stop()
    return field


def probes(field, client: str = "") -> tuple[int, dict[str, dict]]:
    """doctor --probe's probe checks by name, and its exit code (1 when any
    required check fails, a probe's or another's); ``client``:
    "container" (the client on the servers' network) or "outside". From the
    container client, routed NAT's connection through the VIP cannot work
    (its server answers a client on its own network directly: docs/forwarding.md), nor
    DR's and TUN's from the outside client (their servers have no route to
    it): those checks are left out, once seen to fail."""
    extra = []
    if client == "container":
        extra = ["--probe-from", f"container:{field.client.name}"]
    elif client == "outside":
        extra = ["--probe-from", f"/proc/{field.outside.pid}/ns/net"]
    done = dockerlb("doctor", "--json", "--netns", f"container:{field.director.name}", "--probe", *extra)
    checks = json.loads(done.stdout or "[]")
    assert checks, done.stderr
    found = {c["name"]: c for c in checks if c["name"].startswith("probe")}
    # What cannot work from that client (docs/forwarding.md): left out, once seen to fail.
    if client == "container":  # routed NAT's server answers a client on its own network directly
        cannot = of(found, field.c["kc"])
    elif client == "outside":  # DR and TUN servers answer the client directly: no route back to it
        cannot = [c for n in ("r1", "r2", "t1", "t2") for c in of(found, field.c[n])]
    else:
        cannot = []
    for c in cannot:
        assert not c["ok"] and c["detail"].startswith("through the VIP: "), c
        del found[c["name"]]
    return done.returncode, found


def of(found: dict[str, dict], container) -> list[dict]:
    """The probe checks of one container's real servers."""
    return [c for name, c in found.items() if name.endswith(f"({container.name})")]


def broken(field, container, step: str, client: str = "") -> str:
    """Doctor names ``step`` broken for each probe of ``container`` (and
    passes every other container's); its fix, which the test then runs."""
    code, found = probes(field, client)
    mine = of(found, container)
    assert mine and code == 1, found
    for c in mine:
        assert not c["ok"] and c["detail"].startswith(f"{step}: "), c
    others = [c for c in found.values() if c not in mine and not c["ok"]]
    assert others == [], others
    print(mine[0]["detail"], "\n  fix:", mine[0]["fix"])
    return mine[-1]["fix"]


def fixed(field, fix: str, client: str = "") -> None:
    """Run the fix doctor gave, as a shell line on the host; then doctor passes."""
    done = subprocess.run(["sh", "-c", fix], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (fix, done.stderr)
    _, found = probes(field, client)
    assert [c for c in found.values() if not c["ok"]] == [], found


def test_doctor_probes_each_real_server_and_through_each_vip_from_a_client(quiet):
    servers = sum(len(rows) for rows in quiet.table().values())
    _, found = probes(quiet, "container")
    assert len(found) == servers - 1, sorted(found)  # kc's is left out (see probes)
    assert all(c["ok"] for c in found.values()), found
    # cap may still count the threshold test's closing connections (2 minutes in TIME_WAIT).
    others = [c for c in found.values() if not c["name"].endswith(f"({quiet.c['cap'].name})")]
    assert all("a client's connection through the VIP answered" in c["detail"] for c in others), others
    tun = of(found, quiet.c["t1"])
    assert any("8 KiB acknowledged" in c["detail"] for c in tun), tun
    _, found = probes(quiet, "outside")
    (kc,) = of(found, quiet.c["kc"])
    assert kc["ok"] and "a client's connection through the VIP answered" in kc["detail"], kc


def test_doctor_names_a_route_the_director_lacks(quiet):
    n2 = quiet.addr(quiet.c["n2"])
    in_netns(pid_of(quiet.director), "ip", "route", "add", "unreachable", f"{n2}/32")
    fix = broken(quiet, quiet.c["n2"], "route")
    assert fix.endswith(f"ip route del unreachable {n2}/32"), fix
    fixed(quiet, fix)


def test_doctor_names_arp_when_a_server_never_answers_it(quiet):
    n1 = quiet.c["n1"]
    in_netns(pid_of(n1), "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=8")
    in_netns(pid_of(quiet.director), "ip", "neigh", "flush", "all")
    fix = broken(quiet, n1, "ARP")
    assert fix.endswith("sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.eth0.arp_ignore=1"), fix
    fixed(quiet, fix)


def test_doctor_names_a_dr_server_without_the_vip_on_lo(quiet):
    r1 = quiet.c["r1"]
    in_netns(pid_of(r1), "ip", "addr", "del", f"{SCTP_DR}/32", "dev", "lo")
    fixed(quiet, broken(quiet, r1, "VIP missing on lo", "container"), "container")


def test_doctor_names_a_tun_server_without_the_vip_on_tunl0(quiet):
    t2 = quiet.c["t2"]
    in_netns(pid_of(t2), "ip", "addr", "del", f"{SCTP_TUN}/32", "dev", "tunl0")
    fixed(quiet, broken(quiet, t2, "VIP missing on tunl0", "container"), "container")


def test_doctor_names_strict_rp_filter_on_a_tun_server(quiet):
    t1 = quiet.c["t1"]
    in_netns(pid_of(t1), "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    fixed(quiet, broken(quiet, t1, "rp_filter", "container"), "container")


def test_doctor_names_the_return_path_of_routed_nat(quiet):
    kc = quiet.c["kc"]
    in_netns(pid_of(kc), "ip", "route", "replace", "default", "via", "172.30.32.1")  # Docker's gateway
    fix = broken(quiet, kc, "return path of routed NAT", "outside")
    assert f"ip route replace default via {quiet.addr(quiet.director)} dev eth0 proto 76" in fix, fix
    fixed(quiet, fix, "outside")


def test_doctor_names_the_mtu_over_ip_in_ip_when_fragmentation_needed_never_reaches_the_client(quiet):
    director = pid_of(quiet.director)
    rules = (
        "table ip dlbt_mtu {\n  chain out {\n    type filter hook output priority 0;\n"
        "    icmp type destination-unreachable icmp code frag-needed drop\n  }\n}\n"
    )
    # The earlier probes taught the client the tunnel's path MTU (the director's "fragmentation
    # needed" got through then), kept on its route's next hop for 10 minutes: a new route forgets it.
    via = quiet.addr(quiet.director)
    for argv in (["ip", "route", "del", "10.11.0.0/16"], ["ip", "route", "add", "10.11.0.0/16", "via", via]):
        done = quiet.client.exec_run(argv)
        assert done.exit_code == 0, (argv, done.output)
    nft = ["/usr/bin/nsenter", "-t", str(director), "-n", "nft", "-f", "-"]
    subprocess.run(nft, input=rules, text=True, check=True, timeout=60)
    try:
        code, found = probes(quiet, "container")
        stalled = [c for c in found.values() if c["detail"].startswith("MTU over IP-in-IP: ")]
        tcp_tun = [c for c in found.values() if c["name"].startswith(f"probe TCP {SCTP_TUN}:7003 ")]
        assert code == 1 and stalled == tcp_tun and len(stalled) == 2, found
        fix = stalled[0]["fix"]
        assert " sysctl -w net.ipv4.vs.pmtu_disc=0  # " in fix, fix
        print(stalled[0]["detail"], "\n  fix:", fix)
        fixed(quiet, fix, "container")
    finally:
        in_netns(director, "sysctl", "-qw", "net.ipv4.vs.pmtu_disc=1")
        in_netns(director, "nft", "delete", "table", "ip", "dlbt_mtu")
