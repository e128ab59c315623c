import errno
import threading
from ipaddress import ip_address

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from dockerlb.adapters.ipvs import _FIRST_SEQ, IpvsAdapter
from dockerlb.core.model import Proto, Service, ServiceKey
from dockerlb.core.plan import ADD, Write
from dockerlb.errors import DockerUnavailable, IpvsBusy, IpvsRejected
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


class _BusyKernelIpvs:
    """A FAKE for a fault the kernel tier cannot cause on demand: every send
    to IPVS fails with EAGAIN. Only the adapter's sending is replaced."""

    @staticmethod
    def adapter(attempts: int) -> IpvsAdapter:
        adapter = IpvsAdapter.__new__(IpvsAdapter)  # no socket: sending is replaced below
        adapter._settings = Settings(retry_initial=0, retry_max=0, retry_attempts=attempts)
        adapter._next_seq = _FIRST_SEQ
        adapter._sock = type("Sock", (), {"prid": 0x1C})()
        adapter.sends = 0

        def send(data: bytes) -> None:
            adapter.sends += 1
            raise NetlinkError(errno.EAGAIN)

        adapter._send = send
        return adapter


SERVICE = Service(ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 80))


def test_a_single_ipvs_write_to_a_busy_kernel_is_tried_as_often_as_set_not_that_squared():
    adapter = _BusyKernelIpvs.adapter(attempts=3)
    with pytest.raises(IpvsBusy):
        adapter.write(Write(ADD, SERVICE))
    assert adapter.sends == 3  # one retry layer (a nested one made it 9)


def test_a_batch_to_a_busy_kernel_is_sent_as_often_as_set():
    adapter = _BusyKernelIpvs.adapter(attempts=3)
    with pytest.raises(IpvsBusy):
        adapter.write_all([Write(ADD, SERVICE)])
    assert adapter.sends == 3
