import threading

import pytest

from dockerlb.errors import DockerUnavailable, IpvsRejected
from dockerlb.retry import retrying
from dockerlb.settings import Settings

pytestmark = pytest.mark.unit
FAST = Settings(retry_initial=0.001, retry_max=0.005, retry_attempts=3)


def run(policy, fn):
    for attempt in policy:
        with attempt:
            return fn()
    return None


def failing(times, error):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return len(calls)

    return fn, calls


def test_a_retryable_error_is_tried_again_until_it_succeeds():
    fn, _ = failing(2, DockerUnavailable("down"))
    assert run(retrying(FAST), fn) == 3


def test_retries_stop_after_the_configured_attempts_with_the_last_error():
    fn, calls = failing(10, DockerUnavailable("down"))
    with pytest.raises(DockerUnavailable):
        run(retrying(FAST), fn)
    assert len(calls) == 3


def test_a_permanent_error_is_never_retried():
    fn, calls = failing(10, IpvsRejected("EINVAL"))
    with pytest.raises(IpvsRejected):
        run(retrying(FAST), fn)
    assert len(calls) == 1


def test_until_an_event_it_retries_past_the_attempt_count_and_stops_when_set():
    fn, _ = failing(5, DockerUnavailable("down"))
    assert run(retrying(FAST, until=threading.Event()), fn) == 6
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    fn, _ = failing(10**9, DockerUnavailable("still down"))
    with pytest.raises(DockerUnavailable):
        run(retrying(FAST, until=stop), fn)
