"""A full pass rewrites dockerlb's nft tables (the SNAT sets, the owners'
record) only when the director says the ruleset may have changed since its
own last write; an event pass never forces them. The Director adapter's
side (the ruleset's generation, real nft) is in the host tier:
tests/host/test_netns_and_director.py."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import ip_address

import pytest

from dockerlb.app.controller import Controller
from dockerlb.core.model import Proto, ServiceKey
from dockerlb.core.ports import Trigger
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS, container

pytestmark = pytest.mark.unit
LAB = Settings(vip_cidr=TEST_VIP_CIDRS)


class GenerationDirector(MemoryDirector):
    """The in-memory director, told whether the ruleset changed, keeping each forced write."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = True
        self.asked = 0
        self.forced: list[str] = []

    def rules_changed(self) -> bool:
        self.asked += 1
        return self.changed

    def sync_masquerade(self, keys: Iterable[ServiceKey], force: bool = False) -> None:
        super().sync_masquerade(keys, force)
        if force:
            self.forced.append("masquerade")

    def record_owners(self, owners: Mapping[ServiceKey, str], force: bool = False) -> None:
        super().record_owners(owners, force)
        if force:
            self.forced.append("owners")


def test_a_full_pass_forces_the_tables_only_when_the_ruleset_changed_and_an_event_pass_never_asks():
    web = container("web", {"dockerlb.vip": "1.2.3.4:80"}, nets={"lab": ("10.0.0.3", None)})
    director = GenerationDirector()
    ctl = Controller(LAB, MemoryDocker([web]), MemoryIpvs(), director)
    ctl.reconcile(None)  # the start-up pass: nothing known yet
    assert (director.forced, director.asked) == (["masquerade", "owners"], 1)
    director.changed = False
    ctl.reconcile(None)
    assert (director.forced, director.asked) == (["masquerade", "owners"], 2)
    ctl.reconcile([Trigger(web.id, "start")])
    assert director.asked == 2
    director.changed = True  # someone's nft since
    ctl.reconcile(None)
    assert (director.forced, director.asked) == (["masquerade", "owners"] * 2, 3)
    web_key = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 80)
    assert director.masquerade == {web_key} and set(director.owners) == {web_key}


class UnsureDirector(MemoryDirector):
    """A FAKE for a director that cannot tell (its netlink socket gone: not
    something a test can cause on demand in a real namespace)."""

    def rules_changed(self) -> bool:
        raise OSError(9, "Bad file descriptor")


def test_a_director_that_cannot_tell_whether_the_ruleset_changed_has_its_tables_rewritten():
    web = container(
        "web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.masquerade": "true"}, nets={"lab": ("10.0.0.3", None)}
    )
    director = UnsureDirector()
    ctl = Controller(LAB, MemoryDocker([web]), MemoryIpvs(), director)
    ctl.reconcile(None)
    assert director.masquerade == {ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 80)}
