"""Issue 29's findings, each replayed over the in-memory ports
(harness/memory_ports.py) and held to what dockerlb promises on a bad day:
literal expectations, one test per finding (the kernel tier replays those
a real kernel and dockerd can show: tests/kernel/test_trust.py).

Faults a real kernel cannot give on demand are FAKES, named as such."""

from __future__ import annotations

import os
import subprocess
from ipaddress import ip_address

import pytest
from loguru import logger

from dockerlb.app.controller import Controller
from dockerlb.core.model import Container, Proto, ServiceKey
from dockerlb.core.plan import REMOVE
from dockerlb.core.ports import Trigger
from dockerlb.errors import IpvsRejected
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, Clock, container

pytestmark = pytest.mark.unit
LAB = Settings(vip_cidr=TEST_VIP_CIDRS)
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 80)


def member(name: str, group: str, addr: str, created: str, **labels: str) -> Container:
    """A compose service's container claiming 1.2.3.4:80."""
    return container(
        name,
        {"dockerlb.vip": "1.2.3.4:80", "com.docker.compose.project": group, **labels},
        created=created,
        nets={"lab": (addr, None)},
    )


def servers(ipvs: MemoryIpvs) -> list[str]:
    """The kernel's real servers, as "VIP:port -> address:port weight"."""
    table = ipvs.read(counters=False).table
    return sorted(
        f"{k.vip}:{k.port} -> {s} w{s.weight}" for k, vs in table.items() for s in vs.servers.values()
    )


class Said:
    """Every line logged at WARNING or above while in the block."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self._sink = logger.add(lambda m: self.lines.append(m.strip()), level="WARNING", format="{message}")
        return self.lines

    def __exit__(self, *exc) -> None:
        logger.remove(self._sink)


# The squatter: another project, created before the owner's containers were
# recreated, asking for the owner's VIP:port at the highest weight.
SQUAT = member("squat", "other", "10.0.0.9", "2026-01-01T00:00:00Z", **{"dockerlb.weight": "65535"})


def recreate(docker: MemoryDocker, ctl: Controller, old: Container, new: Container) -> None:
    docker.destroy(old.id)
    ctl.reconcile([Trigger(old.id, "destroy", down=True, gone=True)])
    docker.start(new)
    ctl.reconcile([Trigger(new.id, "start", started=True)])


def test_finding_1_the_owner_keeps_its_vip_across_a_recreate_and_a_controller_restart():
    a, b = (member(n, "team", f"10.0.0.{i}", "2026-01-02T00:00:00Z") for i, n in ((2, "a"), (3, "b")))
    docker, ipvs, director = MemoryDocker([a, b]), MemoryIpvs(), MemoryDirector()
    ctl = Controller(LAB, docker, ipvs, director)
    ctl.reconcile(None)
    docker.start(SQUAT)
    ctl.reconcile([Trigger(SQUAT.id, "start", started=True)])
    # The owner's containers recreated one at a time (new ids, new addresses, younger than the squatter).
    a2 = member("a2", "team", "10.0.0.12", "2026-01-05T00:00:00Z")
    b2 = member("b2", "team", "10.0.0.13", "2026-01-05T00:00:00Z")
    recreate(docker, ctl, a, a2)
    recreate(docker, ctl, b, b2)
    # dockerlb restarted (an upgrade): nothing in memory, the kernel as it was.
    with Said() as lines:
        Controller(LAB, docker, ipvs, director).reconcile(None)
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.12:80 w1", "1.2.3.4:80 -> 10.0.0.13:80 w1"]
    assert lines == [
        "container 'squat': label 'dockerlb.vip': TCP 1.2.3.4:80 belongs to group 'team' (container "
        "'a2'), and this container is in group 'other'; sharing a VIP across groups needs --share-vips; "
        "container skipped"
    ]


def test_finding_1_the_owner_keeps_its_vip_while_all_its_containers_restart_at_once():
    a, b = (member(n, "team", f"10.0.0.{i}", "2026-01-02T00:00:00Z") for i, n in ((2, "a"), (3, "b")))
    docker, ipvs = MemoryDocker([a, b]), MemoryIpvs()
    ctl = Controller(LAB, docker, ipvs, MemoryDirector())
    ctl.reconcile(None)
    docker.start(SQUAT)
    ctl.reconcile([Trigger(SQUAT.id, "start", started=True)])
    for c in (a, b):
        docker.die(c.id)
    ctl.reconcile([Trigger(a.id, "die", down=True), Trigger(b.id, "die", down=True)])
    ctl.reconcile(None)  # a full pass in between: no claimant runs, both still exist
    assert servers(ipvs) == []
    for c in (a, b):
        docker.start(c)
    ctl.reconcile([Trigger(a.id, "start", started=True), Trigger(b.id, "start", started=True)])
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.2:80 w1", "1.2.3.4:80 -> 10.0.0.3:80 w1"]


def test_finding_1_a_removed_owner_keeps_its_vip_for_the_grace_period_and_no_longer():
    a = member("a", "team", "10.0.0.2", "2026-01-02T00:00:00Z")
    docker, ipvs, clock = MemoryDocker([a]), MemoryIpvs(), Clock()
    settings = Settings(vip_cidr=TEST_VIP_CIDRS, owner_grace=60.0)
    ctl = Controller(settings, docker, ipvs, MemoryDirector(), clock=clock)
    ctl.reconcile(None)
    docker.start(SQUAT)
    ctl.reconcile([Trigger(SQUAT.id, "start", started=True)])
    docker.destroy(a.id)
    ctl.reconcile([Trigger(a.id, "destroy", down=True, gone=True)])
    clock.now += 59.0
    ctl.reconcile(None)
    assert servers(ipvs) == []
    clock.now += 1.0
    ctl.reconcile(None)
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.9:80 w65535"]


def test_finding_1_an_owner_whose_containers_went_while_no_controller_ran_keeps_its_vip_for_the_grace():
    """The model test's finds: the record in the kernel, not the old
    controller, says who owns; the grace runs from the new one's start."""
    a = member("a", "team", "10.0.0.2", "2026-01-02T00:00:00Z")
    docker, ipvs, director, clock = MemoryDocker([a]), MemoryIpvs(), MemoryDirector(), Clock()
    settings = Settings(vip_cidr=TEST_VIP_CIDRS, owner_grace=60.0)
    Controller(settings, docker, ipvs, director, clock=clock).reconcile(None)
    docker.destroy(a.id)  # the controller is down: nobody sees the owner go
    clock.now += 1000.0
    ctl = Controller(settings, docker, ipvs, director, clock=clock)
    ctl.reconcile(None)
    assert servers(ipvs) == []
    clock.now += 30.0
    docker.start(SQUAT)
    ctl.reconcile([Trigger(SQUAT.id, "start", started=True)])
    assert servers(ipvs) == []
    clock.now += 29.0
    ctl.reconcile(None)
    assert servers(ipvs) == []
    clock.now += 1.0  # 60 s after the restart
    ctl.reconcile([Trigger(SQUAT.id, "start", started=True)])
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.9:80 w65535"]


def test_finding_2_a_swarm_stack_is_a_group_and_another_stack_cannot_join_its_vip():
    def task(name: str, stack: str, addr: str, created: str) -> Container:
        labels = {"dockerlb.vip": "1.2.3.4:80", "com.docker.stack.namespace": stack}
        return container(name, labels, created=created, nets={"net": (addr, None)}, node="node-1")

    shop = task("shop_web.1", "shop", "10.0.0.2", "2026-01-01T00:00:00Z")
    evil = task("evil_web.1", "evil", "10.0.0.3", "2026-01-02T00:00:00Z")
    docker, ipvs = MemoryDocker([shop, evil]), MemoryIpvs()
    with Said() as lines:
        Controller(Settings(vip_cidr=TEST_VIP_CIDRS, swarm=True), docker, ipvs, MemoryDirector()).reconcile(
            None
        )
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.2:80 w1"]
    assert [line.split(":")[0] for line in lines] == ["container 'evil_web.1'"]


def test_finding_3_a_range_bound_by_vip_owner_is_its_groups_alone_older_and_shared_or_not():
    shop = member("shop-web", "shop", "10.0.0.2", "2026-01-02T00:00:00Z")
    older = member("other-web", "other", "10.0.0.3", "2026-01-01T00:00:00Z")
    docker, ipvs = MemoryDocker([shop, older]), MemoryIpvs()
    settings = Settings(vip_cidr=TEST_VIP_CIDRS, vip_owner=("1.2.3.0/24=shop",), share_vips=True)
    with Said() as lines:
        Controller(settings, docker, ipvs, MemoryDirector()).reconcile(None)
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.2:80 w1"]
    assert lines == [
        "container 'other-web': label 'dockerlb.vip': VIP 1.2.3.4 belongs to group 'shop' alone "
        "(--vip-owner 1.2.3.0/24=shop), and this container is in group 'other'; container skipped"
    ]


def test_finding_4_with_no_vip_cidr_a_public_vip_is_one_line_naming_the_fix_and_private_ones_work():
    public = container("dns", {"dockerlb.vip": "8.8.8.8:53", "dockerlb.protocol": "udp"})
    private = container("web", {"dockerlb.vip": "10.99.0.1:80"}, nets={"lab": ("10.0.0.2", None)})
    docker, ipvs = MemoryDocker([public, private]), MemoryIpvs()
    with Said() as lines:
        Controller(Settings(), docker, ipvs, MemoryDirector()).reconcile(None)
    assert servers(ipvs) == ["10.99.0.1:80 -> 10.0.0.2:80 w1"]
    assert lines == [
        "container 'dns': label 'dockerlb.vip': VIP 8.8.8.8 is not a private address (10.0.0.0/8, "
        "172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7), and no --vip-cidr allows it; name the "
        "ranges your VIPs come from with --vip-cidr (DOCKERLB_VIP_CIDR); container skipped"
    ]


def test_finding_4_a_sync_interface_without_vip_cidr_is_refused():
    with pytest.raises(Exception, match="--sync-interface needs --vip-cidr"):
        Controller(Settings(sync_interface="eth1"), MemoryDocker(), MemoryIpvs(), MemoryDirector())


def test_finding_5_another_groups_port_on_the_same_vip_never_turns_snat_on_for_this_one():
    owner = member("kept", "team", "10.0.0.2", "2026-01-01T00:00:00Z", **{"dockerlb.masquerade": "false"})
    other = container(
        "other",
        {"dockerlb.vip": "1.2.3.4:443", "com.docker.compose.project": "other"},
        nets={"lab": ("10.0.0.3", None)},
    )
    docker, director = MemoryDocker([owner]), MemoryDirector()
    ctl = Controller(LAB, docker, MemoryIpvs(), director)
    ctl.reconcile(None)
    docker.start(other)
    ctl.reconcile([Trigger(other.id, "start", started=True)])
    assert director.masquerade == frozenset({ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 443)})


class RemovalRefusingIpvs(MemoryIpvs):
    """A FAKE for a removal the kernel refuses (a real one cannot be made to):
    while ``refusing``, removing a service fails."""

    refusing = True

    def write(self, w) -> None:
        if self.refusing and w.verb == REMOVE and w.server is None:
            raise IpvsRejected("IPVS rejected the request (EPERM), said the test")
        super().write(w)

    def write_all(self, writes):
        results = []
        for w in writes:
            try:
                self.write(w)
            except IpvsRejected as e:
                results.append(e)
            else:
                results.append(None)
        return results


def test_finding_6_a_vip_leaves_only_once_its_services_are_gone_so_a_half_failed_removal_heals():
    web = member("web", "team", "10.0.0.2", "2026-01-01T00:00:00Z")
    docker, ipvs, director = MemoryDocker([web]), RemovalRefusingIpvs(), MemoryDirector()
    ctl = Controller(LAB, docker, ipvs, director)
    ctl.reconcile(None)
    docker.destroy(web.id)
    outcome = ctl.reconcile([Trigger(web.id, "destroy", down=True, gone=True)])
    assert [str(f) for f in outcome.failures] == [
        "could not apply '- service TCP 1.2.3.4:80': IPVS rejected the request (EPERM), said the test",
        "could not apply '- vip 1.2.3.4': VIP 1.2.3.4 still carries TCP 1.2.3.4:80 in the kernel; it stays "
        "on the director until they are gone",
    ]
    assert director.vips() == frozenset({KEY.vip})  # the service is still dockerlb's: mended below
    ipvs.refusing = False
    ctl.reconcile(None)
    assert ipvs.read(counters=False).table == {} and director.vips() == frozenset()


class NoTwosIpvs(MemoryIpvs):
    """A FAKE for a 6.1 kernel, which has no `twos` scheduler (the kernel tier
    shows the real refusal): a service asking for it is refused."""

    def write(self, w) -> None:
        if w.server is None and w.service.scheduler == "twos":
            raise IpvsRejected("scheduler 'twos' is not in this kernel, said the test")
        super().write(w)

    def write_all(self, writes):
        return [self._one(w) for w in writes]

    def _one(self, w):
        try:
            self.write(w)
        except IpvsRejected as e:
            return e
        return None


def test_finding_7_a_scheduler_the_kernel_lacks_costs_its_service_alone_said_once_and_no_reads():
    twos = container("twos", {"dockerlb.vip": "1.2.3.5:80", "dockerlb.scheduler": "twos"})
    docker, ipvs = MemoryDocker([twos]), NoTwosIpvs()
    ctl = Controller(LAB, docker, ipvs, MemoryDirector())
    with Said() as lines:
        ctl.reconcile(None)
        for i in range(10):
            web = member(f"web{i}", "team", f"10.0.0.{20 + i}", "2026-01-01T00:00:00Z")
            docker.start(web)
            ctl.reconcile([Trigger(web.id, "start", started=True)])
    assert ipvs.reads == 1 and ipvs.slices == 0  # the start-up pass's read alone
    assert lines == [
        "could not apply '+ service TCP 1.2.3.5:80 scheduler=twos persistence=0': scheduler 'twos' is not in "
        "this kernel, said the test"
    ]
    assert len(servers(ipvs)) == 10


class BrokenPreparer:
    """A FAKE for a bug in preparing one namespace (an IndexError from a link
    lookup, as seen): set-up raises for ``broken``, works for the rest."""

    def __init__(self, broken: str) -> None:
        self.broken = broken

    def blocked(self, preps, containers):
        return {}

    def prepare(self, preps, containers, full: bool) -> dict[str, str]:
        from dockerlb.app.server_prep import ServerPreparer

        class Netns:
            def converge(_self, pid, prep, director=None, gateway=None):
                if prep.container == self.broken:
                    raise IndexError("list index out of range")
                return []

            def forget(_self, pid):
                pass

        class Director:
            def address_towards(_self, addr):
                return None

        return ServerPreparer(Netns(), Director(), True, "dockerlb.").prepare(preps, containers, full)  # type: ignore[arg-type]

    def release(self, preps, containers) -> None:
        pass


class TimingOutDirector(MemoryDirector):
    """A FAKE for nft timing out (a real nft cannot be made to hang on
    demand), as an adapter that does not translate it would let it through:
    the pass must survive any exception from its masquerade step, not only
    the project's own errors (the Director adapter translates a timeout
    into a DirectorError; the old code let it end the pass)."""

    def sync_masquerade(self, keys, force: bool = False) -> None:
        raise subprocess.TimeoutExpired(["nft", "-f", "-"], 30)


def test_finding_8_an_exception_preparing_one_container_or_an_nft_timeout_never_ends_the_pass():
    dr = {"dockerlb.vip": "1.2.3.4:80", "dockerlb.forward": "dr"}
    # This process's own PID: a namespace the preparer may enter (the fake never does).
    bad = container("bad", dr, nets={"lab": ("10.0.0.2", None)}, pid=os.getpid())
    good = container("good", dr, nets={"lab": ("10.0.0.3", None)}, pid=os.getpid())
    nat = container("nat", {"dockerlb.vip": "1.2.3.5:80"}, nets={"lab": ("10.0.0.4", None)})
    docker, ipvs = MemoryDocker([bad, good, nat]), MemoryIpvs()
    ctl = Controller(LAB, docker, ipvs, TimingOutDirector(), preparer=BrokenPreparer("bad"))  # type: ignore[arg-type]
    with Said() as lines:
        ctl.reconcile(None)
        ctl.reconcile(None)
    assert servers(ipvs) == ["1.2.3.4:80 -> 10.0.0.3:80 w1", "1.2.3.5:80 -> 10.0.0.4:80 w1"]
    assert lines == [
        "container 'bad': not a real server: unexpected IndexError: list index out of range",
        "masquerade: unexpected TimeoutExpired: Command '['nft', '-f', '-']' timed out after 30 seconds",
    ]


def test_finding_9_forty_thousand_unknown_labels_are_one_line_and_that_container_alone_is_skipped():
    noisy = container(
        "noisy", {"dockerlb.vip": "1.2.3.4:80", **{f"dockerlb.x{i}": "y" for i in range(40_000)}}
    )
    web = container("web", {"dockerlb.vip": "1.2.3.5:80"}, nets={"lab": ("10.0.0.3", None)})
    docker, ipvs = MemoryDocker([noisy, web]), MemoryIpvs()
    with Said() as lines:
        Controller(LAB, docker, ipvs, MemoryDirector()).reconcile(None)
    assert lines == [
        "container 'noisy': label 'dockerlb.*': 40001 labels under the prefix; at most 256 (--max-labels); "
        "container skipped"
    ]
    assert servers(ipvs) == ["1.2.3.5:80 -> 10.0.0.3:80 w1"]
