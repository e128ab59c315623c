"""Host tier: namespace resolution and the director adapter in a real
container's namespace (everything the director does except IPVS, which the
host kernel lacks)."""

import subprocess
from ipaddress import ip_address
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from dockerlb.adapters.director import Director
from dockerlb.adapters.docker_source import DockerSource
from dockerlb.adapters.netns import netns_identity, resolve_netns
from dockerlb.adapters.nft_wire import SetElements
from dockerlb.core.model import Proto, ServiceKey
from dockerlb.errors import DirectorError, NetnsError
from dockerlb.settings import Settings
from harness.dockerlab import in_netns, pid_of

pytestmark = pytest.mark.host


@pytest.fixture
def source():
    s = DockerSource(Settings())
    yield s
    s.close()


def test_container_name_resolves_to_its_network_namespace(source, lab):
    net = lab.network("ns")
    c = lab.run("director", network=net)
    path = resolve_netns(f"container:{c.name}", source.pid_of)
    assert path == f"/proc/{pid_of(c)}/ns/net"
    with IPRoute(netns=path, flags=0) as ipr:
        addrs = {m.get_attr("IFA_ADDRESS") for m in ipr.addr("dump")}
    assert lab.ip(c, net) in addrs


def test_a_stopped_container_is_a_clear_namespace_error(source, lab):
    c = lab.run("down")
    c.stop(timeout=1)
    with pytest.raises(NetnsError, match="is not running"):
        resolve_netns(f"container:{c.name}", source.pid_of)


def test_named_and_missing_namespaces(source):
    name = "dlbt-named"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert resolve_netns(name, source.pid_of) == f"/run/netns/{name}"
        assert resolve_netns(f"/run/netns/{name}", source.pid_of) == f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    with pytest.raises(NetnsError, match="no such network namespace"):
        resolve_netns("dlbt-does-not-exist", source.pid_of)
    assert resolve_netns("", source.pid_of) is None


def test_sysctls_are_written_inside_the_directors_namespace_not_the_hosts(lab):
    c = lab.run("dir")
    pid = pid_of(c)
    host_before = Path("/proc/sys/net/ipv4/conf/all/accept_redirects").read_text().strip()
    flipped = "0" if host_before == "1" else "1"
    d = Director(f"/proc/{pid}/ns/net", Settings(masquerade=False))
    try:
        d.write_sysctl("net.ipv4.conf.all.accept_redirects", flipped)
        d.write_sysctl("net.ipv4.ip_forward", "1")
        assert d.read_sysctl("net.ipv4.conf.all.accept_redirects") == flipped
        inside = c.exec_run(["cat", "/proc/sys/net/ipv4/conf/all/accept_redirects"]).output.decode()
        assert inside.strip() == flipped
        assert c.exec_run(["cat", "/proc/sys/net/ipv4/ip_forward"]).output.decode().strip() == "1"
        assert Path("/proc/sys/net/ipv4/conf/all/accept_redirects").read_text().strip() == host_before
    finally:
        d.close()


def key(proto: str, vip: str, port: int) -> ServiceKey:
    return ServiceKey(Proto(proto), ip_address(vip), port)


def set_of(ruleset: str, name: str) -> str:
    """The elements of one set in `nft list table` output, as one line."""
    block = ruleset.split(f"set {name} {{", 1)[1].split("}", 1)[0]
    return " ".join(block.split("elements = {", 1)[1].split()) if "elements = {" in block else ""


def test_masquerade_rules_cover_exactly_the_services_by_vip_and_port_in_the_directors_namespace(lab):
    c = lab.run("masq")
    pid = pid_of(c)
    d = Director(f"/proc/{pid}/ns/net", Settings(masquerade=True))
    try:
        d.sync_masquerade(
            {
                key("tcp", "1.2.3.4", 80),
                key("udp", "1.2.3.4", 53),
                key("tcp", "fd00::100", 80),
                key("sctp", "1.2.3.4", 3868),
            }
        )
        ruleset = in_netns(pid, "nft", "list", "table", "inet", "dockerlb")
        assert "meta l4proto tcp ct original ip daddr . ct original proto-dst @tcp4 masquerade" in ruleset
        assert "meta l4proto udp ct original ip daddr . ct original proto-dst @udp4 masquerade" in ruleset
        assert "meta l4proto sctp ct original ip daddr . ct original proto-dst @sctp4 masquerade" in ruleset
        assert set_of(ruleset, "sctp4") == "1.2.3.4 . 3868"
        assert (set_of(ruleset, "tcp4"), set_of(ruleset, "udp4")) == ("1.2.3.4 . 80", "1.2.3.4 . 53")
        assert set_of(ruleset, "tcp6") == "fd00::100 . 80"
        # Another port on the same VIP is another service: not SNATed unless asked.
        d.sync_masquerade({key("tcp", "5.6.7.8", 443)})
        ruleset = in_netns(pid, "nft", "list", "table", "inet", "dockerlb")
        assert (set_of(ruleset, "tcp4"), set_of(ruleset, "udp4")) == ("5.6.7.8 . 443", "")
        # Drift: a hand-deleted table comes back on a forced (full-resync) pass.
        in_netns(pid, "nft", "delete", "table", "inet", "dockerlb")
        d.sync_masquerade({key("tcp", "5.6.7.8", 443)})  # same set, not forced: no work
        assert "dockerlb" not in in_netns(pid, "nft", "list", "tables")
        d.sync_masquerade({key("tcp", "5.6.7.8", 443)}, force=True)
        assert set_of(in_netns(pid, "nft", "list", "table", "inet", "dockerlb"), "tcp4") == "5.6.7.8 . 443"
        # A change (one element, no nft process) the kernel refuses, the table
        # deleted by hand since: nft makes it all again.
        in_netns(pid, "nft", "delete", "table", "inet", "dockerlb")
        d.sync_masquerade({key("tcp", "5.6.7.8", 443), key("udp", "5.6.7.8", 53)})
        ruleset = in_netns(pid, "nft", "list", "table", "inet", "dockerlb")
        assert (set_of(ruleset, "tcp4"), set_of(ruleset, "udp4")) == ("5.6.7.8 . 443", "5.6.7.8 . 53")
        assert "masquerade" in ruleset
        # the host's own ruleset has no such table
        host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert "dockerlb" not in host
    finally:
        d.close()


def test_a_full_pass_rewrites_the_tables_only_after_someone_else_changed_the_ruleset(lab):
    c = lab.run("gen")
    pid = pid_of(c)
    d = Director(f"/proc/{pid}/ns/net", Settings(masquerade=True))
    try:
        assert d.rules_changed()  # nothing written yet: not known
        d.sync_masquerade({key("tcp", "1.2.3.4", 80)}, force=True)
        d.record_owners({key("tcp", "1.2.3.4", 80): "web"}, force=True)
        assert not d.rules_changed()  # only dockerlb's own transactions since
        # An event's element change (a netlink batch, no nft) is dockerlb's own too.
        d.sync_masquerade({key("tcp", "1.2.3.4", 80), key("tcp", "1.2.3.4", 81)})
        assert not d.rules_changed()
        # Anyone else's transaction, even in a table of its own, is seen.
        in_netns(pid, "nft", "add", "table", "inet", "someone")
        assert d.rules_changed()
        # The full pass that asked rewrites dockerlb's tables; then no change again.
        d.sync_masquerade({key("tcp", "1.2.3.4", 80), key("tcp", "1.2.3.4", 81)}, force=True)
        d.record_owners({key("tcp", "1.2.3.4", 80): "web"}, force=True)
        assert not d.rules_changed()
        # A hand change to the owners' record between two of dockerlb's writes.
        d.sync_masquerade({key("tcp", "1.2.3.4", 80)})
        in_netns(pid, "nft", "flush", "set", "inet", "dockerlb_owners", "owners4")
        d.sync_masquerade({key("tcp", "1.2.3.4", 80), key("tcp", "1.2.3.4", 82)})
        assert d.rules_changed()
        # Reads commit nothing: the record read back, the tables listed.
        d.sync_masquerade({key("tcp", "1.2.3.4", 80)}, force=True)
        d.record_owners({key("tcp", "1.2.3.4", 80): "web"}, force=True)
        assert d.recorded_owners() == {key("tcp", "1.2.3.4", 80): "web"}
        d.check_nft()
        assert not d.rules_changed()
    finally:
        d.close()


def test_the_ruleset_generation_moves_by_one_per_transaction_and_not_for_a_read(lab):
    c = lab.run("gen1")
    pid = pid_of(c)
    elements = SetElements(f"/proc/{pid}/ns/net")
    try:
        first = elements.generation()
        in_netns(pid, "nft", "add", "table", "inet", "t1")
        in_netns(pid, "nft", "list", "ruleset")
        assert elements.generation() == (first + 1) % (1 << 32)
        in_netns(
            pid, "sh", "-c", "printf 'add table inet t2\\nadd table inet t3\\n' | nft -f -"
        )  # one transaction
        assert elements.generation() == (first + 2) % (1 << 32)
        host = SetElements(None)
        try:  # another namespace: its own counter, untouched by these
            assert host.generation() == host.generation()
        finally:
            host.close()
    finally:
        elements.close()


def test_with_a_floating_dip_nat_through_its_subnet_is_snat_to_it_and_routed_servers_there_route_via_it(lab):
    net = lab.network("dip", subnet="10.77.0.0/24")
    c = lab.run("snat", network=net)  # eth0 in 10.77.0.0/24, its default route via 10.77.0.1
    pid = pid_of(c)
    d = Director(f"/proc/{pid}/ns/net", Settings(floating_dip="10.77.0.200"))
    try:
        d.sync_masquerade({key("tcp", "1.2.3.4", 80), key("tcp", "fd00::100", 80)})
        ruleset = in_netns(pid, "nft", "list", "table", "inet", "dockerlb")
        tcp4 = "meta l4proto tcp ct original ip daddr . ct original proto-dst @tcp4"
        assert f'{tcp4} oifname "eth0" snat ip to 10.77.0.200' in ruleset
        assert f"{tcp4} masquerade" in ruleset  # servers reached elsewhere
        # No IPv6 DIP given: masquerade alone.
        assert "meta l4proto tcp ct original ip6 daddr . ct original proto-dst @tcp6 masquerade" in ruleset
        assert d.address_towards(ip_address("10.77.0.9")) == ip_address("10.77.0.200")  # on-link
        own = ip_address(lab.ip(c, net))
        assert d.address_towards(ip_address("10.99.0.5")) == own  # through a gateway: not the DIP's
        assert d.addresses()[ip_address("10.77.0.200")] == "the pair's floating DIP (--floating-dip)"
    finally:
        d.close()
    with pytest.raises(DirectorError, match="--floating-dip 'ten': not an IP address"):
        Director(f"/proc/{pid}/ns/net", Settings(floating_dip="ten"))


def test_a_restarted_container_has_a_new_namespace_identity(source, lab):
    c = lab.run("restarts")
    before = netns_identity(resolve_netns(f"container:{c.name}", source.pid_of))
    assert netns_identity(resolve_netns(f"container:{c.name}", source.pid_of)) == before
    c.restart(timeout=1)
    assert netns_identity(resolve_netns(f"container:{c.name}", source.pid_of)) != before
    assert netns_identity(None) == netns_identity("/proc/self/ns/net")
