"""Kernel tier: the keepalived pair across two hosts of a real Swarm, each
with its own dockerd (compose/vrrp; issue 30: "the keepalived pair must also
work across two hosts").

The same site as tests/kernel/test_swarm_bgp.py (three managers, the stack of
examples/bgp-two-directors, a router namespace on the Swarm's switch, a
client behind it), without BGP: compose/vrrp brought up on two nodes as its
header says, keepalived moving the VIP to the master on the shared link,
the router reaching the VIP on that link. Then the master's host is lost
(unplugged, then every process of it killed): the other takes the VIP when
the master's adverts stop, and new connections keep working. Tasks get NAT:
a connection through the lost master is reset (docs/several-hosts.md).
The failover figures of one run are written to OUT/swarm-vrrp-failover.json.
"""

from __future__ import annotations

import pytest

from harness.dockerlab import in_netns, wait_for
from tests.kernel.test_swarm_bgp import DIRECTORS, VIP, Pair, ask, lose_a_host, site_fixture, write_figures
from tests.swarm_lab import swarm_fixture

pytestmark = pytest.mark.kernel
swarm = swarm_fixture(size=3, managers=3)
PEERS = {"a": DIRECTORS["b"], "b": DIRECTORS["a"]}
VRRP_PAIR = Pair(
    "compose/vrrp",
    ("dockerlb.tar", "keepalived.tar"),
    {key: {"DIRECTOR_ADDRESS": DIRECTORS[key], "PEER_ADDRESS": PEERS[key]} for key in DIRECTORS},
    bgp=False,
)
site = site_fixture(VRRP_PAIR)
# keepalived's adverts every second: a backup takes over after three missed
# and its skew (about 3.6 s); and a little for the poll.
TAKEOVER = 6.0


def holds_vip(site, key: str) -> bool:
    """keepalived's copy of the VIP is on this director's uplink (dockerlb's own is on dockerlb0)."""
    lines = in_netns(site.director_pid(key), "ip", "-o", "-4", "addr").splitlines()
    return any(line.split()[3] == f"{VIP}/32" and line.split()[1] != "dockerlb0" for line in lines)


def test_the_keepalived_pair_on_two_swarm_hosts_keeps_new_connections_when_the_masters_host_is_lost(
    swarm, site
):
    serving = site.serving()
    for key in DIRECTORS:
        try:
            wait_for(lambda k=key: site.table(k) == dict.fromkeys(serving, "1"), 300, what=f"{key}'s table")
        except AssertionError as e:
            raise AssertionError(f"{e}: {site.table(key)} for {serving}\n{site.logs(key)}") from None
    master = wait_for(
        lambda: [k for k in DIRECTORS if holds_vip(site, k)] or None, 60, interval=0.5, what="a master"
    )
    assert len(master) == 1, master  # one holds the VIP, never both
    (lost_key,) = master
    survivor = next(k for k in DIRECTORS if k != lost_key)
    got = [ask(site)[1] for _ in range(10)]
    assert all(who in serving.values() for who in got), got

    # The master's host lost; the client asks from an address that mh sends
    # to a task on that host.
    figures, after = lose_a_host(swarm, site, lost_key, ("took_over_s", lambda: holds_vip(site, survivor)))
    assert figures["took_over_s"] < TAKEOVER, figures
    assert after and all(after), after  # every one answered once the VIP moved and the tasks quiesced
    write_figures("swarm-vrrp-failover.json", figures)
