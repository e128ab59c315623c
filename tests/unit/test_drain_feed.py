"""The drain feed: the running controller's drains, read by another process
over an abstract unix socket (here in the test's own network namespace)."""

import socket
import uuid

import pytest

from dockerlb.adapters.drain_feed import DrainFeed, drains_in, feed_name, read_feed

pytestmark = pytest.mark.unit


def test_a_reader_gets_the_controllers_drains_and_nothing_once_it_is_gone():
    interface = f"t{uuid.uuid4().hex[:8]}"
    report = {"drain_timeout": 30.0, "drains": {"web2": 12.5}}
    feed = DrainFeed(None, interface, lambda: report)
    try:
        assert read_feed(None, interface) == report
        report["drains"] = {}
        assert drains_in(read_feed(None, interface)) == {}
    finally:
        feed.close()
    assert read_feed(None, interface) is None
    assert drains_in(None) is None


def test_a_second_controller_on_the_same_interface_serves_no_feed_and_the_first_keeps_its_own():
    interface = f"t{uuid.uuid4().hex[:8]}"
    first = DrainFeed(None, interface, lambda: {"drains": {"a": 1}})
    second = DrainFeed(None, interface, lambda: {"drains": {"b": 2}})
    try:
        assert drains_in(read_feed(None, interface)) == {"a": 1.0}
    finally:
        second.close()
        first.close()


def test_a_document_that_is_not_the_feeds_reads_as_none():
    interface = f"t{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(feed_name(interface))
        server.listen(1)
        server.settimeout(5)
        # Not JSON: nothing readable.
        import threading

        def answer(text: bytes) -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(text)

        t = threading.Thread(target=answer, args=(b"not json",))
        t.start()
        assert read_feed(None, interface) is None
        t.join()
        assert drains_in({"drains": {"a": "soon", "b": True, "c": 2}}) == {"c": 2.0}
