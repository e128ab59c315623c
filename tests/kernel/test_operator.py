"""Kernel tier: what an operator sees (status, metrics, plan, doctor) is what
the kernel holds, checked against ipvsadm after real traffic."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.dockerlab import wait_for
from tests.kernel.conftest import PORT, VIP, ipvsadm_stats

pytestmark = pytest.mark.kernel
METRICS = "127.0.0.1:19469"
FIELDS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")


def dockerlb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dockerlb.app.cli", *args], capture_output=True, text=True, timeout=300
    )


def under_pty(*args: str, columns: int = 200) -> str:
    """The CLI's output on a pseudo-terminal of the given width, ANSI codes removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dockerlb.app.cli", *args], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    os.close(master)
    return ANSI.sub("", b"".join(chunks).decode(errors="replace")).replace("\r", "")


def scrape(path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{METRICS}{path}", timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def test_status_and_metrics_show_what_ipvsadm_shows_after_real_traffic(seed_lab, controllers):
    lab = seed_lab
    netns = ("--netns", f"container:{lab.director.name}")
    lab.ipvsadm("-A", "-t", "5.5.5.5:80", "-s", "rr")  # someone else's: shown apart
    ctl = controllers(*netns, "--metrics-listen", METRICS, "--log-format", "json")
    ctl.wait_ready()
    code, body = scrape("/healthz")
    assert code == 200 and body.startswith("ready"), body
    # Each change applied: one JSON line naming the service, server and container.
    applied = [r for r in map(json.loads, ctl.log().splitlines()) if r["text"].find("applied:") >= 0]
    servers = [r["record"]["extra"] for r in applied if r["record"]["extra"]["op"] == "add_server"]
    assert sorted(e["container"] for e in servers) == sorted(c.name for c in lab.webs.values()), applied
    assert {e["service"] for e in servers} == {f"TCP {VIP}:{PORT}"}

    answers = lab.requests(20)
    assert None not in answers and set(answers) == {"web1", "web2"}, answers
    service = f"{VIP}:{PORT}"
    # container name -> real server
    web = {lab.webs[name].name: f"{lab.ip(name)}:{PORT}" for name in ("web1", "web2")}

    def views() -> tuple | None:
        """status --json and /metrics, read between two equal ipvsadm reads
        with all 20 connections counted; else None. Counters only grow, and
        the kernel folds them into its totals every 2 s: equal reads on both
        sides mean that both views read the very totals ipvsadm shows."""
        first = lab.ipvsadm("-Ln", "--stats", "--exact")
        done = dockerlb("status", *netns, "--json")
        scraped = scrape()
        last = lab.ipvsadm("-Ln", "--stats", "--exact")
        kernel = ipvsadm_stats(last)
        if first != last or kernel[f"TCP {service}"][0] != 20:
            return None
        return kernel, done, scraped

    kernel, done, (code, text) = wait_for(views, 60, interval=0.5, what="20 connections counted, no fold")

    # status --json: the same counters, and who each server is.
    assert done.returncode == 0, done.stderr
    services = {
        f"{s['protocol'].upper()} {s['vip']}:{s['port']}": s for s in json.loads(done.stdout)["services"]
    }
    ours = services[f"TCP {service}"]
    assert ours["managed"] is True and services["TCP 5.5.5.5:80"]["managed"] is False
    assert tuple(ours[f] for f in FIELDS) == kernel[f"TCP {service}"]
    for s in ours["servers"]:
        name = s["container"]
        assert tuple(s[f] for f in FIELDS) == kernel[f"{service} -> {web[name]}"], name
        assert (s["network"], s["health"], s["state"], s["weight"]) == (lab.net.name, "-", "serving", 1)
    assert sorted(s["container"] for s in ours["servers"]) == sorted(web)

    # /metrics: the same counters, labelled with the container.
    assert code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for name, addr in web.items():
        base = (("container", name), ("port", str(PORT)), ("protocol", "tcp"), ("server", addr), ("vip", VIP))
        conns, inpkts, outpkts, inbytes, outbytes = kernel[f"{service} -> {addr}"]

        def sample(metric: str, direction: str, base=base) -> float:
            return samples[(metric, tuple(sorted((*base, ("direction", direction)))))]

        assert samples[("dockerlb_server_connections_total", base)] == conns
        assert (
            sample("dockerlb_server_packets_total", "in"),
            sample("dockerlb_server_packets_total", "out"),
        ) == (
            inpkts,
            outpkts,
        )
        assert (
            sample("dockerlb_server_bytes_total", "in"),
            sample("dockerlb_server_bytes_total", "out"),
        ) == (
            inbytes,
            outbytes,
        )
        assert samples[("dockerlb_server_weight", base)] == 1
    svc = (("managed", "true"), ("port", str(PORT)), ("protocol", "tcp"), ("vip", VIP))
    assert samples[("dockerlb_service_connections_total", svc)] == 20
    assert samples[("dockerlb_operations_applied_total", (("kind", "add_server"),))] == 2
    assert samples[("dockerlb_reconcile_duration_seconds_count", (("pass", "full"),))] >= 1

    # On a terminal: a table; the same rows, with the foreign service apart.
    screen = under_pty("status", *netns)
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in screen.splitlines() if "│" in line]
    for name, addr in web.items():
        row = next(r for r in rows if r and r[0] == f"-> {addr}")
        assert row[:3] == [f"-> {addr}", "Masq", "1"], row
        assert row[8:] == [name, lab.net.name, "-", "serving"], row
    assert (
        screen.index("managed by dockerlb")
        < screen.index("Not managed by dockerlb")
        < screen.index("5.5.5.5")
    )
    # In a pipe: plain text, ipvsadm's layout.
    assert dockerlb("status", *netns).stdout.startswith("Prot LocalAddress:Port Scheduler Flags\n")

    # An event applied shows in the latency histogram and the operation counts.
    lab.webs["web2"].pause()
    wait_for(lambda: len(lab.table()[("TCP", service, "wlc")]) == 1, 60, interval=0.5, what="web2 out")
    # Both are counted after the kernel write (the operations once the batch's
    # lines are logged, the histogram once the pass returns): wait on them.
    count = ("dockerlb_event_to_applied_seconds_count", ())
    removed = ("dockerlb_operations_applied_total", (("kind", "remove_server"),))

    def counted() -> dict | None:
        samples = {
            (s.name, tuple(s.labels.items())): s.value
            for f in text_string_to_metric_families(scrape()[1])
            for s in f.samples
        }
        return samples if samples.get(count, 0) >= 1 and samples.get(removed, 0) >= 1 else None

    samples = wait_for(counted, 30, interval=0.5, what="the pause counted in /metrics")
    assert samples[removed] == 1
    lab.webs["web2"].unpause()


def test_plan_doctor_and_watch_tell_the_operator_the_truth(seed_lab, controllers):
    lab = seed_lab
    netns = ("--netns", f"container:{lab.director.name}")
    ctl = controllers(*netns)
    ctl.wait_ready()

    done = dockerlb("plan", *netns)
    assert (done.returncode, done.stdout.strip()) == (0, "nothing to change"), done.stderr

    doctor = dockerlb("doctor", *netns)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert re.search(r"^PASS  IPVS in the kernel: IP Virtual Server version", doctor.stdout, re.M)
    assert "PASS  sysctl net.ipv4.vs.conntrack: net.ipv4.vs.conntrack=1" in doctor.stdout
    for name in ("expire_nodest_conn", "expire_quiescent_template", "conn_reuse_mode"):
        assert f"PASS  sysctl net.ipv4.vs.{name}: net.ipv4.vs.{name}=1" in doctor.stdout  # set by `run`
    assert re.search(
        r"^PASS  IPVS connection table: 4,096 buckets \(ip_vs conn_tab_bits=12\); \d+ conn",
        doctor.stdout,
        re.M,
    )

    # --watch in a pipe: a block per refresh until interrupted, then exit 0.
    watch = subprocess.Popen(
        [sys.executable, "-m", "dockerlb.app.cli", "status", *netns, "--watch", "--interval", "0.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    headers = 0
    for line in watch.stdout:
        headers += line.startswith("--- ")
        if headers == 3:
            break
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=60) == 0
    watch.stdout.close()

    # With the controller stopped, a paused server is a change `plan` shows.
    assert ctl.stop() == 0
    lab.webs["web2"].pause()
    try:
        done = dockerlb("plan", *netns)
        assert done.returncode == 2, done.stderr
        web2 = lab.webs["web2"].name
        assert done.stdout.strip() == f"- server TCP {VIP}:{PORT} -> {lab.ip('web2')}:{PORT} ({web2})"
        assert len(lab.table()[("TCP", f"{VIP}:{PORT}", "wlc")]) == 2  # plan changed nothing
    finally:
        lab.webs["web2"].unpause()
