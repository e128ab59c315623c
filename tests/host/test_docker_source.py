"""Host tier: the Docker adapter against a real dockerd."""

import dataclasses
import threading
import time

import pytest

from dockerlb.adapters.docker_source import DockerSource, container_from_inspect
from dockerlb.app import passes
from dockerlb.settings import Settings
from harness.dockerlab import http_server_cmd, wait_for

pytestmark = pytest.mark.host
VIP = {"dockerlb.vip": "1.2.3.4:8000"}


@pytest.fixture
def source():
    s = DockerSource(Settings())
    yield s
    s.close()


def test_the_api_version_is_negotiated_with_the_engine(source, client):
    assert source.api_version == client.version()["ApiVersion"]


def test_listing_finds_labelled_containers_with_their_network_address(source, lab):
    net = lab.network("net")
    web = lab.run("web", http_server_cmd(), labels=VIP, network=net)
    lab.run("plain", network=net)
    found = {c.name: c for c in source.list_containers()}
    assert lab.name("plain") not in found
    c = found[lab.name("web")]
    assert c.labels["dockerlb.vip"] == "1.2.3.4:8000"
    assert str(c.networks[net.name].ipv4) == lab.ip(web, net)
    assert c.running and c.health is None
    # The listing has no PID; it is asked for only where it is needed.
    assert c.pid == 0


def test_listing_inspects_the_containers_it_is_told_need_their_pid(source, lab):
    dr = lab.run("dr", labels=VIP)
    nat = lab.run("nat", labels=VIP)
    found = {c.name: c for c in source.list_containers(detailed=lambda c: c.name == lab.name("dr"))}
    assert found[lab.name("dr")].pid == dr.attrs["State"]["Pid"] > 0
    assert found[lab.name("nat")].pid == 0
    assert nat.attrs["State"]["Pid"] > 0


def test_the_listing_and_inspect_say_the_same_of_a_container(source, lab):
    net = lab.network("net")
    c = lab.run("same", labels=VIP, network=net)
    (listed,) = [x for x in source.list_containers() if x.id == c.id]
    inspected = source.inspect(c.id)
    assert dataclasses.replace(listed, pid=inspected.pid) == inspected
    # Docker's own creation time, to the second (literal form: no fraction).
    assert listed.created == c.attrs["Created"][:19] + "Z"
    assert len(listed.created) == len("2026-12-03T09:00:00Z")


def test_inspect_reports_a_removed_container_as_gone(source, lab):
    c = lab.run("gone", labels=VIP)
    c.remove(force=True)
    assert source.inspect(c.id) is None


def test_a_paused_container_is_listed_as_not_running(source, lab):
    c = lab.run("paused", labels=VIP)
    c.pause()
    (found,) = [x for x in source.list_containers() if x.id == c.id]
    assert not found.running


def test_health_status_comes_from_the_healthcheck(source, lab):
    c = lab.run(
        "healthy",
        labels=VIP,
        healthcheck={"test": ["CMD", "true"], "interval": 200_000_000, "start_period": 0},
    )
    wait_for(lambda: source.inspect(c.id).health == "healthy", 30, what="healthy")


def listed_health(source, container_id):
    return next(c.health for c in source.list_containers() if c.id == container_id)


def test_the_listing_shows_each_health_state_as_inspect_does(source, lab):
    second = 1_000_000_000
    healthy = lab.run("up", labels=VIP, healthcheck={"test": ["CMD", "true"], "interval": second // 5})
    failing = {"test": ["CMD", "false"], "interval": second // 5, "retries": 1}
    sick = lab.run("sick", labels=VIP, healthcheck=failing)
    # The first check an hour away: starting until then.
    waiting = lab.run("waiting", labels=VIP, healthcheck={"test": ["CMD", "true"], "interval": 3600 * second})
    wait_for(lambda: listed_health(source, healthy.id) == "healthy", 30, what="listed healthy")
    wait_for(lambda: listed_health(source, sick.id) == "unhealthy", 30, what="listed unhealthy")
    assert listed_health(source, waiting.id) == "starting"
    assert source.inspect(waiting.id).health == "starting"


class Collector:
    """Reads the event stream in a thread, as the controller does."""

    def __init__(self, source, since):
        self.triggers = []
        self._source = source
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(since,), daemon=True)
        self._thread.start()

    def _run(self, since):
        for t in self._source.events(since, self._stop):
            self.triggers.append(t)

    def reasons_for(self, cid):
        return [t.reason for t in self.triggers if t.container_id == cid]

    def stop(self):
        self._stop.set()
        self._source.stop_events()
        self._thread.join(timeout=10)


def test_lifecycle_events_of_labelled_containers_become_triggers(source, lab):
    since = time.time()
    c = lab.run("ev", labels=VIP)  # started before subscribing: must not be lost
    events = Collector(source, since)
    try:
        wait_for(lambda: "start" in events.reasons_for(c.id), 20, what="start event")
        c.pause()
        c.unpause()
        c.stop(timeout=1)
        wait_for(lambda: "die" in events.reasons_for(c.id), 20, what="die event")
        c.remove()
        wait_for(lambda: "destroy" in events.reasons_for(c.id), 20, what="destroy event")
        reasons = events.reasons_for(c.id)
        for reason in ("pause", "unpause", "kill", "stop"):
            assert reason in reasons
        mine = [t for t in events.triggers if t.container_id == c.id]
        # The event alone proves these: no inspect needed (or possible, for destroy).
        assert {t.reason for t in mine if t.down} >= {"pause", "die", "destroy"}
        assert {t.reason for t in mine if t.gone} == {"destroy"}
        assert not any(t.down for t in mine if t.reason in ("start", "unpause", "stop"))
        assert all(t.time_nano > since * 1e9 for t in events.triggers)
    finally:
        events.stop()


def test_a_sigkill_is_known_to_bring_the_container_down_a_sigterm_is_not(source, lab):
    c = lab.run("kill", labels=VIP)
    events = Collector(source, time.time())
    try:
        c.kill(signal="SIGTERM")  # sleep as PID 1 ignores it
        c.kill(signal="SIGKILL")
        wait_for(lambda: "die" in events.reasons_for(c.id), 20, what="die event")
        kills = [t for t in events.triggers if t.container_id == c.id and t.reason == "kill"]
        assert [t.down for t in kills] == [False, True]
    finally:
        events.stop()


def test_unlabelled_containers_make_no_lifecycle_triggers(source, lab):
    events = Collector(source, time.time())
    try:
        plain = lab.run("plain")
        marker = lab.run("marker", labels=VIP)
        wait_for(lambda: "start" in events.reasons_for(marker.id), 20, what="marker event")
        # Network events carry no labels, so they pass; the controller's
        # inspect drops them. Container events are filtered at the source.
        assert [r for r in events.reasons_for(plain.id) if not r.startswith("network")] == []
    finally:
        events.stop()


def test_network_connect_and_disconnect_become_triggers(source, lab):
    c = lab.run("nets", labels=VIP)
    net = lab.network("extra")
    events = Collector(source, time.time())
    try:
        net.connect(c)
        net.disconnect(c)
        wait_for(
            lambda: {"network connect", "network disconnect"} <= set(events.reasons_for(c.id)),
            20,
            what="network events",
        )
    finally:
        events.stop()


def test_a_label_named_signal_hides_the_kill_signal_and_the_controller_distrusts_it(source, lab):
    c = lab.run("sig", labels={**VIP, "signal": "9"})
    events = Collector(source, time.time())
    try:
        c.kill(signal="SIGTERM")  # sleep as PID 1 ignores it: it keeps running
        wait_for(lambda: "kill" in events.reasons_for(c.id), 20, what="kill event")
        (kill,) = [t for t in events.triggers if t.container_id == c.id and t.reason == "kill"]
        assert (kill.signal, kill.down) == ("9", True)  # the label's value, not the signal sent
        trusted = passes.trusted({c.id: container_from_inspect(c.attrs)}, kill)
        assert (trusted.down, trusted.stopping) == (False, True)  # a drain starts; "die" decides
    finally:
        events.stop()


def test_networks_come_with_their_subnets_and_gateways(source, lab):
    lab.network("ipam", subnet="172.29.77.0/24")
    found = {n.name: n for n in source.networks()}
    mine = found[lab.name("ipam")]
    assert [str(s) for s in mine.subnets] == ["172.29.77.0/24"]
    assert [str(g) for g in mine.gateways] == ["172.29.77.1"]
    assert "bridge" in found  # Docker's default network, labelled or not


def test_a_listing_reuses_an_unchanged_record_and_sees_every_change(source, lab):
    net = lab.network("net")
    c = lab.run("cached", labels=VIP, network=net)
    (first,) = [x for x in source.list_containers() if x.id == c.id]
    (again,) = [x for x in source.list_containers() if x.id == c.id]
    assert again is first
    c.pause()
    (paused,) = [x for x in source.list_containers() if x.id == c.id]
    assert not paused.running
    c.unpause()
    net.disconnect(c)
    (moved,) = [x for x in source.list_containers() if x.id == c.id]
    assert moved.running and net.name not in moved.networks


def test_a_container_keeps_only_the_labels_dockerlb_reads(source, lab):
    labels = {
        **VIP,
        "com.docker.compose.project": "shop",
        "com.docker.compose.service": "web",
        "com.docker.compose.config-hash": "0f" * 32,
        "signal": "banana",
        "maintainer": "someone",
    }
    c = lab.run("kept", labels=labels)
    kept = {"dockerlb.vip": "1.2.3.4:8000", "com.docker.compose.project": "shop", "signal": "banana"}
    (listed,) = [x for x in source.list_containers() if x.id == c.id]
    assert listed.labels == kept
    assert source.inspect(c.id).labels == kept
