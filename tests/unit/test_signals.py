"""The first SIGINT/SIGTERM stops the controller gracefully, a second one forces.

No process but the controller's own ever runs the handler: dockerlb enters
other namespaces from the calling thread (``dockerlb.adapters.netns``), so nothing
forks a Python child that would inherit it (tests/host/test_entering_a_namespace.py)."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from dockerlb.app.controller import Controller
from dockerlb.app.loop import ForcedStop, Loop
from dockerlb.settings import Settings
from harness.dockerlab import wait_for

pytestmark = pytest.mark.unit


class EventStream:
    stopped = 0

    def stop_events(self) -> None:
        self.stopped += 1


@pytest.fixture
def loop():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    # Only the stop flag, the event stream and the handlers are used.
    docker = EventStream()
    ctl = Controller(Settings(), docker=docker, ipvs=None, director=None)  # type: ignore[arg-type]
    loop = Loop(ctl, docker, Settings())  # type: ignore[arg-type]
    loop.install_signal_handlers()
    yield loop
    for s, handler in saved.items():
        signal.signal(s, handler)
    signal.set_wakeup_fd(-1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_stops_gracefully_and_the_second_forces(loop, signum):
    signal.raise_signal(signum)
    # The handler only counts; the signal thread stops the loop (it may take locks).
    wait_for(lambda: loop._docker.stopped == 1, 10, interval=0.01, what="the event stream closed")
    assert loop.stopping.is_set()
    with pytest.raises(ForcedStop, match=f"second signal {signum.name}"):
        signal.raise_signal(signum)


def test_a_signal_whose_number_reaches_the_pipe_before_its_handler_runs_still_stops_the_loop():
    # The wakeup pipe gets the number at once; the handler runs later in the
    # main thread. The signal thread once waited for the handler's count and,
    # looking first, let the stop go by.
    docker = EventStream()
    loop = Loop(Controller(Settings(), docker=docker, ipvs=None, director=None), docker, Settings())  # type: ignore[arg-type]
    read, write = os.pipe()
    thread = threading.Thread(target=loop._on_signals, args=(read,), daemon=True)
    thread.start()
    os.write(write, bytes([signal.SIGTERM]))
    wait_for(lambda: docker.stopped == 1, 10, interval=0.01, what="the event stream closed")
    assert loop.stopping.is_set() and loop._signals == 0  # no handler ran: the pipe alone said it
    os.close(write)
    thread.join(timeout=10)
    os.close(read)


# The main thread inside a queue operation when the signal comes: the
# handler runs right there, between two bytecodes. One that put a trigger
# on the queue (it did, before issue 29) waited forever for the lock its
# own thread held. In a process of its own, so a hang fails the test
# instead of hanging the suite.
HOLDING_THE_QUEUE = """
import os
import signal
import subprocess
import sys
import threading
from dockerlb.app.controller import Controller
from dockerlb.app.loop import Loop
from dockerlb.settings import Settings

class Stream:
    def stop_events(self):
        pass

docker = Stream()
loop = Loop(Controller(Settings(), docker, None, None), docker, Settings())
loop.install_signal_handlers()
with loop.triggers.mutex:
    signal.raise_signal(signal.SIGTERM)
print("stopped" if loop.stopping.wait(10) else "not stopped")
"""


def test_the_handler_takes_no_lock_so_a_signal_inside_a_queue_operation_still_stops_the_loop():
    done = subprocess.run(
        [sys.executable, "-c", HOLDING_THE_QUEUE], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "stopped", done.stderr


def test_a_stop_signal_read_from_the_pipe_before_its_handler_has_counted_it_still_stops():
    """Python writes the signal's byte from its C handler at once; the
    Python handler that counts runs later, in the main thread. The signal
    thread reading the byte first must stop all the same (seen in the
    kernel tier: a SIGTERM ignored, the controller stopping only when forced)."""
    docker = EventStream()
    loop = Loop(Controller(Settings(), docker=docker, ipvs=None, director=None), docker, Settings())  # type: ignore[arg-type]
    read, write = os.pipe()
    thread = threading.Thread(target=loop._on_signals, args=(read,), daemon=True)
    thread.start()
    os.write(write, bytes([signal.SIGTERM]))  # no handler has run: the count is 0
    wait_for(lambda: docker.stopped == 1, 10, interval=0.01, what="the event stream closed")
    assert loop.stopping.is_set() and loop._signals == 0
    os.close(write)
    thread.join(timeout=10)
    os.close(read)
