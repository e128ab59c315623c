"""Signals reach the controller that installed its handlers, and no one else."""

import os
import signal

import pytest

from dockerlb.controller import Controller
from dockerlb.settings import Settings

pytestmark = pytest.mark.unit


@pytest.fixture
def controller():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    # The ports are never called: only the stop flag and the handlers are used.
    ctl = Controller(Settings(), docker=None, ipvs=None, director=None)  # type: ignore[arg-type]
    ctl.install_signal_handlers()
    yield ctl
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_forked_child_killed_with_sigterm_dies_and_leaves_the_parent_running(controller):
    # pyroute2 forks to open a socket in another namespace, then SIGTERMs the
    # child: the inherited handler must not stop the loop or touch shared sockets.
    child = os.fork()
    if child == 0:
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(0)  # reached only if SIGTERM did not kill the child
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not controller.stopping.is_set()
