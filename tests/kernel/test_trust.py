"""Kernel tier: a hostile set of containers beside a normal service.

The normal service (compose project "shop", dockerlb's own tcp check, VIP
1.2.3.4:8000) must keep serving real traffic, follow a start and a stop,
while containers that try what a review found possible are each refused
with exactly one error line naming them and their label: a scoped IPv6 VIP,
a squatter from another project at weight 65535 without masquerade, VIPs
8.8.8.8 / an unlabelled container's address / a Docker gateway, 5,000 named
groups, a 1 MB label; and a container whose eight health-checked groups
accept and never answer (an hour's interval and timeout) must not stall the
normal service's checks. The controller's RSS is printed before and after.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.dockerlab import http_server_cmd, wait_for
from tests.kernel.conftest import PORT, VIP, SeedLab, dockerlb_image

pytestmark = pytest.mark.kernel
SERVICE = ("TCP", f"{VIP}:{PORT}", "wlc")
SHOP = {"dockerlb.vip": f"{VIP}:{PORT}", "dockerlb.check": "tcp", "com.docker.compose.project": "shop"}
# Accepts every connection and never answers (the dockerlb image has Python).
HOLD = (
    "import socket\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('', 9000))\n"
    "s.listen(512)\n"
    "held = []\n"
    "while True:\n"
    "    held.append(s.accept())\n"
)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])


def errors_naming(log: str, name: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line and f"'{name}'" in line]


def test_hostile_containers_cost_only_themselves(lab, controllers):
    net = lab.network("lab")
    director = lab.run("director", network=net)
    webs = {n: lab.run(n, http_server_cmd(PORT), labels=SHOP, network=net) for n in ("web1", "web2")}
    client = lab.run("client", network=net, cap_add=["NET_ADMIN"])
    assert client.exec_run(["ip", "route", "add", f"{VIP}/32", "via", lab.ip(director, net)]).exit_code == 0
    shop = SeedLab(lab, net, director, client, webs)

    ctl = controllers(
        "--netns", f"container:{director.name}", "--vip-cidr", "1.2.3.0/24", "--resync-interval", "2"
    )
    ctl.wait_ready()
    both = {(f"{shop.ip('web1')}:{PORT}", "Masq", "1"), (f"{shop.ip('web2')}:{PORT}", "Masq", "1")}
    wait_for(lambda: shop.table().get(SERVICE) == both, 60, what="both shop servers pass their checks")
    before = rss_kib(ctl.proc.pid)

    bystander = lab.run("bystander", network=net)  # unlabelled: its address is not free
    net.reload()
    gateway = net.attrs["IPAM"]["Config"][0]["Gateway"]
    hostile = {
        "scoped": ({"dockerlb.vip": "[2001:db8::1%eth0]:80"}, "a VIP cannot carry a scope"),
        "squat": (
            {
                "dockerlb.vip": f"{VIP}:{PORT}",
                "dockerlb.weight": "65535",
                "dockerlb.masquerade": "false",
                "com.docker.compose.project": "other",
            },
            "belongs to group 'shop'",
        ),
        "google": ({"dockerlb.vip": "8.8.8.8:80"}, "outside the allowed VIP ranges"),
        "neighbour": ({"dockerlb.vip": f"{lab.ip(bystander, net)}:80"}, "inside Docker network"),
        "gateway": ({"dockerlb.vip": f"{gateway}:80"}, "already in use as the gateway of network"),
        "groups": (
            {f"dockerlb.g{i}.vip": f"1.2.3.{i % 200 + 20}:80" for i in range(5000)},
            "5000 named groups; at most 16",
        ),
        "huge": (
            {"dockerlb.vip": "1.2.3.5:80", "dockerlb.scheduler": "x" * 1_048_576},
            "value is 1048576 characters; at most 1024",
        ),
    }
    made = {name: lab.run(name, labels=labels, network=net) for name, (labels, _) in hostile.items()}
    stall_labels = {}
    for i in range(8):
        stall_labels |= {
            f"dockerlb.s{i}.vip": f"1.2.3.{10 + i}:80",
            f"dockerlb.s{i}.port": "9000",
            f"dockerlb.s{i}.check": f"http:/{i}",
            f"dockerlb.s{i}.check_interval": "3600",
            f"dockerlb.s{i}.check_timeout": "3600",
        }
    lab.run(
        "stall",
        ["-c", HOLD],
        labels=stall_labels,
        network=net,
        image=dockerlb_image(lab.client),
        entrypoint=["python3"],
    )

    # Every hostile container has been seen (one error each), and a few
    # passes more have gone by: any second line would be there by now.
    names = [c.name for c in made.values()]
    wait_for(
        lambda: all(errors_naming(ctl.log(), n) for n in names), 120, what="every hostile container named"
    )
    ctl.wait_passes(ctl.passes() + 3)

    # The normal service: still exactly its two servers, every request answered.
    assert shop.table()[SERVICE] == both
    got = Counter(shop.requests(20))
    assert got[None] == 0 and set(got) == {"web1", "web2"}, got

    # A server started now is checked and added; a stopped one is removed,
    # while eight checks hang on the stalling container.
    webs["web3"] = lab.run("web3", http_server_cmd(PORT), labels=SHOP, network=net)
    three = both | {(f"{shop.ip('web3')}:{PORT}", "Masq", "1")}
    wait_for(lambda: shop.table().get(SERVICE) == three, 60, what="web3 checked and added")
    after_stop = three - {(f"{shop.ip('web2')}:{PORT}", "Masq", "1")}  # its address while it has one
    webs["web2"].stop(timeout=1)
    wait_for(lambda: shop.table().get(SERVICE) == after_stop, 60, what="web2 removed")
    got = Counter(shop.requests(20))
    assert got[None] == 0 and set(got) <= {"web1", "web3"}, got

    # Nothing of the hostile set reached IPVS: the shop's service, and the
    # stalling container's eight services with no server (never passed a check).
    stalled = {("TCP", f"1.2.3.{10 + i}:80", "wlc"): set() for i in range(8)}
    assert shop.table() == {SERVICE: after_stop, **stalled}

    log = ctl.log()
    for name, (_, why) in hostile.items():
        lines = errors_naming(log, made[name].name)
        assert len(lines) == 1, (name, lines)
        assert why in lines[0], (name, lines[0])
        assert len(lines[0]) < 1000, f"{name}: a {len(lines[0])}-character log line"
    after = rss_kib(ctl.proc.pid)
    print(f"controller RSS before the hostile set {before} KiB, after {after} KiB")
    assert after < before + 64 * 1024, f"RSS grew from {before} to {after} KiB"
    assert ctl.proc.poll() is None
