"""Host tier: the CLI on this kernel. Without IPVS (this machine's own
kernel) it says so clearly and exits 1; with IPVS (the same tests run in the
UML guest) status and doctor answer. Which kernel this is comes from the
kernel itself (tests/kernel_facts.py)."""

import json
import subprocess
import sys

import pytest

from tests.kernel_facts import has_ipvs

pytestmark = pytest.mark.host


def dockerlb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dockerlb.app.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_status_is_a_clear_error_without_ipvs_and_the_table_with_it():
    done = dockerlb("status", "--json")
    assert "Traceback" not in done.stderr
    if not has_ipvs():
        assert done.returncode == 1
        assert "no IPVS in this kernel" in done.stderr and "CONFIG_IP_VS is not set" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert isinstance(json.loads(done.stdout), dict | list)


def test_doctor_says_whether_the_kernel_has_ipvs_and_how_to_get_it():
    done = dockerlb("doctor")
    lines = done.stdout.splitlines()
    if not has_ipvs():
        assert done.returncode == 1, done.stdout + done.stderr
        failed = lines.index("FAIL  IPVS in the kernel: the kernel's IPVS does not answer (no ip_vs loaded)")
        assert "CONFIG_IP_VS is not set" in lines[failed + 1] and lines[failed + 1].startswith("      fix: ")
    else:
        ipvs = [
            line for line in lines if line.startswith("PASS  IPVS in the kernel: IP Virtual Server version")
        ]
        assert len(ipvs) == 1, done.stdout
    # What does work here is said to work.
    assert any(line.startswith("PASS  Docker engine: answers; API version 1.") for line in lines)
    assert "PASS  CAP_NET_ADMIN: the controller has CAP_NET_ADMIN" in lines
    assert "PASS  masquerade (nftables): nft answers in the director namespace" in lines


def test_doctor_checks_the_real_server_side_once_a_label_asks_for_direct_routing(lab):
    before = {c["name"]: c for c in json.loads(dockerlb("doctor", "--json").stdout)}
    assert before["forward=dr: real-server namespaces"]["required"] is False
    lab.run("dr", labels={"dockerlb.vip": "10.9.9.9:80", "dockerlb.forward": "dr"})
    after = {c["name"]: c for c in json.loads(dockerlb("doctor", "--json").stdout)}
    dr = after["forward=dr: real-server namespaces"]
    # Run on the host, the controller can enter the container's namespace.
    assert dr["required"] is True and dr["ok"] is True
    assert lab.name("dr") in dr["detail"] and "dockerlb sets the VIP on lo, arp_ignore=1" in dr["detail"]
    assert after["forward=tun: real-server namespaces"]["required"] is False


def test_doctor_names_a_director_namespace_that_does_not_exist():
    done = dockerlb("doctor", "--netns", "no-such-netns")
    assert done.returncode == 1
    assert "FAIL  director namespace: --netns no-such-netns: no such network namespace" in done.stdout


def test_run_refuses_the_docker_hosts_own_namespace_unless_allowed():
    # This namespace holds docker0's address: the Docker host's own.
    done = dockerlb("run", "--retry-attempts", "1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    if not has_ipvs():
        assert "no IPVS in this kernel" in done.stderr
    else:
        assert (
            "the director namespace holds 172.17.0.1, the gateway of Docker network 'bridge': it is the "
            "Docker host's own namespace"
        ) in done.stderr, done.stderr
        assert "dockerlb0" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
