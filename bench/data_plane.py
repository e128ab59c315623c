"""Data-plane benchmark (issue 7), run as root in the IPVS guest:

    bash bench/run-vm.sh bench/data_plane.py [SECONDS]
    .venv/bin/python -m bench.data_plane [SECONDS]   # on a kernel without IPVS:
                                                       # direct, HAProxy, nginx only

One topology, one run, every path side by side. Namespaces wired by veths:

    client 10.77.1.2 ── 10.77.1.1 director 10.77.2.1 ── 10.77.2.2 server 1
                                           10.77.3.1 ── 10.77.3.2 server 2

The servers are nginx answering "ok"; their default route is the director.
From the client, wrk measures (keep-alive, and ``Connection: close``, i.e.
one new connection per request):
- direct: server 1, routed by the director (plain forwarding);
- ipvs: the VIP 10.77.9.1:80, NAT, rr over both servers, set up through
  dockerlb's IPVS adapter (the code path the controller uses);
- haproxy: HAProxy in TCP mode on the director, roundrobin over both;
- nginx: nginx ``stream`` on the director, round robin over both.
Ratios are to direct. Under TCG emulation absolute figures mean little;
the ratios are what to read. Writes data_plane-<time>.json (see run-vm.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

from bench.results_file import save
from dockerlb.adapters.ipvs import IpvsAdapter
from dockerlb.core.model import Proto, RealServer, Service, ServiceKey
from dockerlb.core.plan import ADD, Write
from dockerlb.errors import IpvsUnavailable
from dockerlb.settings import Settings

WORK = Path("/run/dlb-bench")
NS = {"client": "dp-client", "director": "dp-dir", "s1": "dp-s1", "s2": "dp-s2"}
VIP = "10.77.9.1"
TARGETS = {
    "direct": "http://10.77.2.2:80/",
    "ipvs": f"http://{VIP}:80/",
    "haproxy": "http://10.77.1.1:8081/",
    "nginx": "http://10.77.1.1:8082/",
}
SERVER_CONF = """
worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 80 reuseport; location / {{ return 200 "ok\\n"; }} }} }}
"""
STREAM_CONF = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 8192; }}
stream {{ upstream b {{ server 10.77.2.2:80; server 10.77.3.2:80; }}
  server {{ listen 10.77.1.1:8082; proxy_pass b; }} }}
"""
HAPROXY_CONF = """
global
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend f
  bind 10.77.1.1:8081
  default_backend b
backend b
  balance roundrobin
  server s1 10.77.2.2:80
  server s2 10.77.3.2:80
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def topology() -> None:
    for ns in NS.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    d = NS["director"]
    for peer, net in (("client", 1), ("s1", 2), ("s2", 3)):
        ns = NS[peer]
        sh(
            "ip",
            "link",
            "add",
            f"dp{net}a",
            "netns",
            d,
            "type",
            "veth",
            "peer",
            "name",
            f"dp{net}b",
            "netns",
            ns,
        )
        sh("ip", "-n", d, "addr", "add", f"10.77.{net}.1/24", "dev", f"dp{net}a")
        sh("ip", "-n", ns, "addr", "add", f"10.77.{net}.2/24", "dev", f"dp{net}b")
        sh("ip", "-n", d, "link", "set", f"dp{net}a", "up")
        sh("ip", "-n", ns, "link", "set", f"dp{net}b", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"10.77.{net}.1")
    sh(*in_ns(d, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
    sh("ip", "-n", d, "addr", "add", f"{VIP}/32", "dev", "lo")  # the director accepts the VIP


def start(name: str, ns: str, argv: list[str]) -> subprocess.Popen:
    log = (WORK / f"{name}.out").open("w")
    return subprocess.Popen(in_ns(ns, *argv), stdout=log, stderr=subprocess.STDOUT)


def write(name: str, text: str) -> Path:
    d = WORK / name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "conf"
    conf.write_text(text.format(dir=d))
    return conf


def wrk(url: str, seconds: int, close: bool) -> dict:
    argv = ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(in_ns(NS["client"], *argv), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {p: _ms(re.search(rf"^\s+{p}%\s+(\S+)", out, re.M)[1]) for p in ("50", "99")}
    return {
        "rps": round(rps, 1),
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "errors": errors[1] if errors else "",
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 3)


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    topology()
    procs = [
        start("s1", NS["s1"], ["nginx", "-e", "stderr", "-c", str(write("s1", SERVER_CONF))]),
        start("s2", NS["s2"], ["nginx", "-e", "stderr", "-c", str(write("s2", SERVER_CONF))]),
        start("nginx-lb", NS["director"], ["nginx", "-e", "stderr", "-c", str(write("lb", STREAM_CONF))]),
        start("haproxy", NS["director"], ["haproxy", "-f", str(write("haproxy", HAPROXY_CONF)), "-db"]),
    ]
    targets = dict(TARGETS)
    try:
        ipvs = IpvsAdapter(f"/run/netns/{NS['director']}", Settings())
    except IpvsUnavailable as e:  # the host kernel here: the other paths still compare
        print(f"no IPVS ({e}): measuring the other paths only")
        ipvs = None
        del targets["ipvs"]
    if ipvs is not None:
        key = ServiceKey(Proto.TCP, ip_address(VIP), 80)
        ipvs.write(Write(ADD, Service(key, "rr")))
        for addr in ("10.77.2.2", "10.77.3.2"):
            ipvs.write(Write(ADD, Service(key), RealServer(ip_address(addr), 80)))
    time.sleep(2)  # let the servers and proxies listen
    try:
        results: dict = {"kernel": os.uname().release, "seconds": seconds, "cpus": os.cpu_count()}
        for mode in ("keepalive", "close"):
            for name, url in targets.items():
                results[f"{name}_{mode}"] = wrk(url, seconds, close=mode == "close")
        for mode in ("keepalive", "close"):
            direct = results[f"direct_{mode}"]["rps"]
            for name in set(targets) - {"direct"}:
                row = results[f"{name}_{mode}"]
                row["ratio_to_direct"] = round(row["rps"] / direct, 2)
        if ipvs is not None:
            new = {n: results[f"{n}_close"]["rps"] for n in targets}
            results["ipvs_to_haproxy_new_connections"] = round(new["ipvs"] / new["haproxy"], 2)
    finally:
        if ipvs is not None:
            ipvs.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        for ns in NS.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    save("data_plane", results)


if __name__ == "__main__":
    main()
