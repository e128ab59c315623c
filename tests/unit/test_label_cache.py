"""The per-container memo of parsed labels (labels.LabelCache): answers what
parsing would, parses a container once, and forgets what no longer exists."""

from dataclasses import replace
from ipaddress import ip_address
from types import FrameType

import pytest

from dockerlb.core.desired import build_desired
from dockerlb.core.labels import LabelCache, Limits, parse_labels
from dockerlb.core.model import Proto, ServiceKey
from tests.unit.builders import LAB, container

pytestmark = pytest.mark.unit
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)
OTHER = ServiceKey(Proto.UDP, ip_address("1.2.3.5"), 53)
WEIGHT = "weight must be a whole number 0..65535, got 'heavy'"


def test_a_container_seen_again_unchanged_is_not_parsed_again():
    cache = LabelCache()
    labels = {"dockerlb.vip": "1.2.3.4:8000"}
    first = cache.parse("id1", "web", labels)
    assert [(s.key, s.target_port) for s in first.specs] == [(KEY, 8000)]
    # The same record, and an equal copy of its labels (a fresh inspect): the memo answers.
    assert cache.parse("id1", "web", labels) is first
    assert cache.parse("id1", "web", dict(labels)) is first


def test_a_renamed_container_is_parsed_again_and_its_problems_name_the_new_name():
    cache = LabelCache()
    bad = {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.weight": "heavy"}
    assert [str(p) for p in cache.parse("id1", "old", bad).problems] == [
        f"container 'old': label 'dockerlb.weight': {WEIGHT}; container skipped"
    ]
    assert [str(p) for p in cache.parse("id1", "new", bad).problems] == [
        f"container 'new': label 'dockerlb.weight': {WEIGHT}; container skipped"
    ]


def test_other_labels_under_a_known_id_are_parsed_not_answered_from_the_memo():
    cache = LabelCache()
    cache.parse("id1", "web", {"dockerlb.vip": "1.2.3.4:8000"})
    again = cache.parse("id1", "web", {"dockerlb.vip": "1.2.3.5:53", "dockerlb.protocol": "udp"})
    assert [s.key for s in again.specs] == [OTHER]


def test_forgotten_containers_leave_the_memo_and_keep_only_keeps_only_those_named():
    cache = LabelCache()
    for i in range(4):
        cache.parse(f"id{i}", f"web{i}", {"dockerlb.vip": "1.2.3.4:8000"})
    cache.forget(["id0", "gone-long-ago"])
    assert len(cache) == 3
    cache.keep_only(["id2", "id9"])
    assert len(cache) == 1
    kept = cache.parse("id2", "web2", {"dockerlb.vip": "1.2.3.4:8000"})
    assert cache.parse("id2", "web2", {"dockerlb.vip": "1.2.3.4:8000"}) is kept


def test_replicas_with_the_same_labels_under_the_prefix_share_one_parse():
    cache = LabelCache()
    labels = {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.weight": "3"}
    first = cache.parse("id1", "web-1", {**labels, "com.docker.compose.container-number": "1"})
    second = cache.parse("id2", "web-2", {**labels, "com.docker.compose.container-number": "2"})
    assert second is first
    assert second == parse_labels("web-2", labels)
    # Other labels under the prefix: a parse of their own.
    assert cache.parse("id3", "web-3", {**labels, "dockerlb.weight": "4"}).specs[0].weight == 4


def test_a_parse_with_problems_is_never_shared_its_problems_name_each_container():
    cache = LabelCache()
    bad = {"dockerlb.vip": "1.2.3.4:8000", "dockerlb.weight": "heavy"}
    for name in ("web-1", "web-2"):
        assert [str(p) for p in cache.parse(f"id-{name}", name, bad).problems] == [
            f"container {name!r}: label 'dockerlb.weight': {WEIGHT}; container skipped"
        ]


def test_keep_only_drops_the_shared_parses_no_kept_container_uses():
    cache = LabelCache()
    labels = {"dockerlb.vip": "1.2.3.4:8000"}
    first = cache.parse("id1", "web-1", labels)
    cache.keep_only(["id1"])
    assert cache.parse("id2", "web-2", dict(labels)) is first
    cache.keep_only([])
    again = cache.parse("id3", "web-3", dict(labels))
    assert again is not first and again == first


def test_passes_sharing_a_memo_follow_a_rename_and_a_container_replaced_under_its_name():
    cache = LabelCache()
    web = container("web", {"dockerlb.vip": "1.2.3.4:8000"}, nets={"lab": ("10.0.0.2", None)})
    d1 = build_desired([web], labels=cache, policy=LAB)
    assert [(str(s.addr), s.container) for s in d1.table[KEY].servers.values()] == [("10.0.0.2", "web")]
    renamed = replace(web, name="web-blue")
    d2 = build_desired([renamed], labels=cache, policy=LAB)
    assert [(str(s.addr), s.container) for s in d2.table[KEY].servers.values()] == [("10.0.0.2", "web-blue")]
    # A new container (new id) under the old name, asking for another VIP.
    other = container("web", {"dockerlb.vip": "1.2.3.5:53", "dockerlb.protocol": "udp"})
    other = replace(other, id="id-web-2", networks=web.networks)
    d3 = build_desired([other], labels=cache, policy=LAB)
    assert list(d3.table) == [OTHER]


def test_a_memo_made_for_other_limits_is_refused():
    with pytest.raises(ValueError, match="another prefix or other limits"):
        build_desired([], labels=LabelCache("dockerlb.", Limits(chars=10)), policy=LAB)
    with pytest.raises(ValueError, match="another prefix or other limits"):
        build_desired([], prefix="lb.", labels=LabelCache("dockerlb."), policy=LAB)


def _three_served():
    """Three containers on one VIP, a controller over them after its first full pass."""
    from dockerlb.app.controller import Controller
    from dockerlb.settings import Settings
    from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs

    web = [
        container(f"web{i}", {"dockerlb.vip": "1.2.3.4:8000"}, nets={"lab": (f"10.0.0.{i + 2}", None)})
        for i in range(3)
    ]
    docker = MemoryDocker(web)
    controller = Controller(Settings(vip_cidr=("1.2.3.4/32",)), docker, MemoryIpvs(), MemoryDirector())
    controller.reconcile(None)
    return web, docker, controller


def test_the_controller_forgets_the_parsed_labels_of_containers_that_went():
    from dockerlb.core.ports import Trigger

    _, docker, controller = _three_served()
    assert len(controller._doors.labels) == 3
    docker.destroy("id-web0")  # an event pass: its "destroy" says it is gone
    controller.reconcile([Trigger("id-web0", "destroy", gone=True)])
    assert len(controller._doors.labels) == 2
    docker.destroy("id-web1")  # missed as an event: the next full pass drops it
    controller.reconcile(None)
    assert len(controller._doors.labels) == 1


def test_a_full_pass_keeps_one_record_of_each_container():
    """A full pass lists every container anew (the Docker adapter may decode
    new records, equal to the old): the controller, its index and its label
    memo must keep one record of each, not the old beside the new (a second
    copy of every container after each resync)."""
    import gc

    old, docker, controller = _three_served()
    new = [replace(c, labels=dict(c.labels)) for c in old]
    for c in new:
        docker.start(c)
    new = [docker.inspect(c.id) for c in new]  # as the stand-in keeps them (it stamps a start time)
    controller.reconcile(None)
    mine = {id(x) for x in [old, new, docker._containers, *old, *new]}  # the test's and the stand-in's

    def held(x) -> bool:
        # Frames (this test's locals) are no holders.
        return any(id(r) not in mine and not isinstance(r, FrameType) for r in gc.get_referrers(x))

    for i in range(len(old)):  # by index: a zip's tuples would hold them too
        assert [held(old[i]), held(new[i])].count(True) == 1, old[i].name
        assert [held(old[i].labels), held(new[i].labels)].count(True) == 1, old[i].name
