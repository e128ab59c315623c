"""How the loop gathers events into a pass: a lone event goes at once, a
burst becomes one pass. The queue is a stand-in that records how it was
asked (no clock, no sleeping)."""

import queue

import pytest

from dockerlb.app.controller import Controller
from dockerlb.app.loop import Loop
from dockerlb.core.ports import Trigger
from dockerlb.settings import Settings
from harness.memory_ports import MemoryDirector, MemoryDocker, MemoryIpvs
from tests.unit.builders import TEST_VIP_CIDRS

pytestmark = pytest.mark.unit


class RecordingQueue(queue.Queue):
    """A queue that notes every ``get``; a blocking one never waits: it
    answers Empty at once, as if its whole timeout had passed with nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []  # the timeout of each blocking get

    def get(self, block=True, timeout=None):
        if block and self.empty():
            self.waits.append(timeout)
            raise queue.Empty
        return super().get(block, timeout)


def loop_with(triggers: RecordingQueue, debounce: float) -> Loop:
    settings, docker = Settings(vip_cidr=TEST_VIP_CIDRS, debounce=debounce), MemoryDocker()
    loop = Loop(Controller(settings, docker, MemoryIpvs(), MemoryDirector()), docker, settings)
    loop.triggers = triggers
    return loop


def test_a_lone_event_is_not_held_back_for_the_debounce_window():
    triggers = RecordingQueue()
    loop = loop_with(triggers, debounce=3600.0)
    # The loop has taken the lone event; nothing else is queued.
    assert loop._gather(3600.0) == []
    assert triggers.waits == []


def test_a_burst_is_gathered_and_waits_the_window_for_more():
    triggers = RecordingQueue()
    burst = [Trigger(f"c{i}", "die", down=True) for i in range(3)]
    for t in burst:
        triggers.put(t)
    loop = loop_with(triggers, debounce=0.5)
    assert loop._gather(0.5) == burst
    assert len(triggers.waits) == 1
    assert 0.0 < triggers.waits[0] <= 0.5


def test_a_trigger_soon_after_the_last_one_waits_the_window_for_more():
    triggers = RecordingQueue()
    loop = loop_with(triggers, debounce=0.5)
    # Nothing queued, but the last trigger came less than a window ago: a
    # stream of events, each pass quick enough to empty the queue.
    assert loop._gather(0.5, streaming=True) == []
    assert len(triggers.waits) == 1
    assert 0.0 < triggers.waits[0] <= 0.5


def test_one_containers_triggers_together_are_a_lone_event_and_go_at_once():
    triggers = RecordingQueue()
    start = Trigger("c1", "start", started=True)
    triggers.put(start)  # queued behind its network connect, which the loop took first
    loop = loop_with(triggers, debounce=3600.0)
    assert loop._gather(3600.0, first=Trigger("c1", "network connect", network=True)) == [start]
    assert triggers.waits == []


def test_triggers_about_two_containers_are_a_burst():
    triggers = RecordingQueue()
    other = Trigger("c2", "start", started=True)
    triggers.put(other)
    loop = loop_with(triggers, debounce=0.5)
    assert loop._gather(0.5, first=Trigger("c1", "start", started=True)) == [other]
    assert len(triggers.waits) == 1


def test_a_stop_queued_behind_a_burst_ends_the_gathering_at_once():
    triggers = RecordingQueue()
    loop = loop_with(triggers, debounce=3600.0)
    other = Trigger("c2", "start", started=True)
    triggers.put(other)
    loop.stop()
    got = loop._gather(3600.0, streaming=True, first=Trigger("c1", "start", started=True))
    assert got[0] == other and got[-1].reason == "stop" and len(got) == 2
    assert triggers.waits == []  # no window waited for a batch the loop will not pass


def test_a_stop_arriving_while_a_burst_is_gathered_ends_the_gathering():
    class StopOnWait(RecordingQueue):
        """The stop comes while the loop waits the window for more."""

        def get(self, block=True, timeout=None):
            if block and self.empty() and not self.waits:
                self.waits.append(timeout)
                loop.stop()
            return super().get(block, timeout)

    triggers = StopOnWait()
    loop = loop_with(triggers, debounce=3600.0)
    got = loop._gather(3600.0, streaming=True, first=Trigger("c1", "start", started=True))
    assert [t.reason for t in got] == ["stop"]
    assert len(triggers.waits) == 1  # the one wait the stop cut short; no further window
