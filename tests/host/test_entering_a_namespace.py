"""Host tier: the one way into a network namespace (``dockerlb.adapters.netns``), on
namespaces made with ``ip netns`` and addresses set in them here, so every
expected value below is one this file put there."""

import contextlib
import gc
import os
import subprocess
import threading
import warnings
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from dockerlb.adapters import netns
from dockerlb.adapters.netns import entered, open_in
from dockerlb.errors import NetnsError, NetnsStuck

pytestmark = pytest.mark.host
LINK, PEER, ADDR = "dlbt0", "dlbt1", "10.231.7.9"
LINKS = {"lo", LINK, PEER}


def here() -> tuple[int, int]:
    """The calling thread's network namespace (device, inode)."""
    st = os.stat(netns.THREAD_NETNS)
    return (st.st_dev, st.st_ino)


def where(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@pytest.fixture
def make_netns() -> Iterator:
    """Named namespaces, each with a veth pair LINK-PEER (this kernel has no
    dummy links), LINK carrying ADDR/24; deleted after."""
    made: list[str] = []

    def make(name: str) -> str:
        name = f"dlbt-{name}-{os.getpid()}"
        ip("netns", "add", name)
        made.append(name)
        ip("-n", name, "link", "add", LINK, "type", "veth", "peer", "name", PEER)
        ip("-n", name, "addr", "add", f"{ADDR}/24", "dev", LINK)
        return f"/run/netns/{name}"

    yield make
    for name in made:
        ip("netns", "del", name)


class Forked(AssertionError):
    pass


@contextlib.contextmanager
def no_forks() -> Iterator[None]:
    """Inside, any fork, or any child process started, raises ``Forked``."""

    def refuse(*args, **kwargs):
        raise Forked("a child process was started")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fork", refuse)
        mp.setattr(subprocess.Popen, "__init__", refuse)
        yield


def test_a_socket_opened_inside_sees_that_namespace_after_the_thread_has_left(make_netns):
    path = make_netns("sees")
    before = here()
    with open_in(path, IPRoute) as ipr:
        assert here() == before
        links = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(label=LINK)}
    assert links == LINKS
    assert addrs == {ADDR}
    with IPRoute() as own:  # the host has no such link: the socket above was not opened here
        assert own.link_lookup(ifname=LINK) == []


def test_opening_a_socket_inside_forks_no_process(make_netns):
    path = make_netns("nofork")
    with no_forks(), open_in(path, IPRoute) as ipr:
        assert ipr.link_lookup(ifname=LINK) != []


def test_pyroute2s_own_netns_argument_would_have_forked(make_netns):
    # What the test above rules out: the detector does catch pyroute2's way.
    path = make_netns("pyrfork")
    with no_forks(), pytest.raises(Forked) as refused:
        IPRoute(netns=path, flags=0)
    # The half-made IPRoute leaves an event loop and socket pairs to the
    # collector: closed here, quietly, not in whichever test runs next.
    del refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_inside_the_block_the_thread_is_in_the_namespace_and_after_it_is_back(make_netns):
    path = make_netns("block")
    before = here()
    with entered(path):
        assert here() == where(path)
    assert here() == before


def test_a_failure_inside_the_factory_still_brings_the_thread_back(make_netns):
    path = make_netns("fails")
    before = here()
    seen = []

    def factory():
        seen.append(here())
        raise ValueError("the factory failed")

    with pytest.raises(ValueError, match="the factory failed"):
        open_in(path, factory)
    assert seen == [where(path)]
    assert here() == before


def test_a_thread_comes_back_to_its_own_namespace_not_the_main_threads(make_netns):
    # The main thread sits in one namespace while a worker enters another and
    # leaves: the worker must come back to where it was (the host's), not to
    # where the main thread is (/proc/self/ns/net would say the main thread's).
    mains, workers = make_netns("main"), make_netns("worker")
    host = here()
    main_inside, worker_done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def worker() -> None:
        try:
            main_inside.wait(10)
            seen["start"] = here()
            with open_in(workers, IPRoute) as ipr:
                seen["links"] = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
                seen["addrs"] = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(label=LINK)}
            seen["end"] = here()
        except BaseException as e:
            seen["error"] = e
        finally:
            worker_done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with entered(mains):
        main_inside.set()
        assert worker_done.wait(10)
        assert here() == where(mains)
    thread.join(10)
    assert "error" not in seen, seen.get("error")
    assert seen["start"] == seen["end"] == host
    assert seen["links"] == LINKS and seen["addrs"] == {ADDR}
    assert here() == host


def test_none_means_the_controllers_own_namespace():
    before = here()
    with no_forks(), open_in(None, IPRoute) as ipr:
        assert here() == before
        assert ipr.link_lookup(ifname=LINK) == []


def test_a_missing_namespace_is_a_netns_error_and_the_thread_stays():
    before = here()
    missing = "/run/netns/dlbt-none"
    with no_forks(), pytest.raises(NetnsError, match=f"cannot open the network namespace {missing}"):
        open_in(missing, IPRoute)
    assert here() == before


def test_a_namespace_of_another_kind_is_refused():
    before = here()
    with no_forks(), pytest.raises(NetnsError, match="cannot enter the network namespace /proc/self/ns/uts"):
        open_in("/proc/self/ns/uts", IPRoute)
    assert here() == before


def test_a_thread_that_cannot_come_back_raises_netns_stuck(make_netns, monkeypatch):
    path = make_netns("stuck")
    real, calls = netns._setns, []

    def refuse_the_way_back(fd: int, why: str) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the first setns enters, the second would come back
            raise NetnsError(f"{why}: refused by this test")
        real(fd, why)

    home = os.open(netns.THREAD_NETNS, os.O_RDONLY)
    monkeypatch.setattr(netns, "_setns", refuse_the_way_back)
    try:
        with pytest.raises(NetnsStuck, match=f"cannot leave {path}: refused by this test; anything"):
            open_in(path, lambda: None)
        assert here() == where(path)  # stuck indeed: raising was right
        assert not isinstance(NetnsStuck("x"), Exception)  # no `except Exception` keeps the thread going
    finally:
        real(home, "the test going home")
        os.close(home)
