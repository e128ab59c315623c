"""dockerlb's own health checks, the parts with no socket (issue 15): the
request an http check sends, how its answer's status line is read, and
which paths are refused (raised, so the checker logs them and counts a
failure). Checks against real stalling servers are in the host tier
(tests/host/test_health_checks.py)."""

from ipaddress import ip_address

import pytest

from dockerlb.adapters.health import ProbeFailed, http_request, status_of, verdict
from dockerlb.core.model import CheckTarget, HealthCheck

pytestmark = pytest.mark.unit


def _target(path: str, addr: str = "10.0.0.5", port: int = 8080) -> CheckTarget:
    return CheckTarget("c1", "web", ip_address(addr), port, HealthCheck("http", path))


def test_the_request_is_one_ascii_get_that_asks_the_server_to_close():
    assert http_request(_target("/health?x=1")) == (
        b"GET /health?x=1 HTTP/1.1\r\nHost: 10.0.0.5:8080\r\nUser-Agent: dockerlb-check\r\n"
        b"Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
    )


def test_an_ipv6_host_header_is_bracketed():
    assert b"\r\nHost: [fd00::5]:80\r\n" in http_request(_target("/", "fd00::5", 80))


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/caf\u00e9", UnicodeEncodeError),  # not ASCII
        ("/a b", ValueError),  # would end the request line early
        ("/a\r\nX-Injected: 1", ValueError),  # would add a header
        ("/\x7f", ValueError),
    ],
)
def test_a_path_the_label_parser_refuses_raises(path, error):
    with pytest.raises(error):
        http_request(_target(path))


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 404 Not Found\r\n", 404),
        (b"HTTP/1.1 503\r\n", 503),  # no reason phrase
        (b"HTTP/1.1 302 Found\n", 302),  # a bare newline
        (b"HTTP/2 204 No Content\r\n", 204),
    ],
)
def test_the_status_of_a_status_line(line, status):
    assert status_of(line) == status


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"   ",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 OK\r\n",
        b"HTTP/1.1 20 OK\r\n",
        b"HTTP/1.1 099 x\r\n",
    ],
)
def test_a_line_that_is_no_status_line_is_a_failure_not_a_crash(line):
    with pytest.raises(ProbeFailed):
        status_of(line)


@pytest.mark.parametrize(
    ("expected", "status", "why"),
    [
        (None, 200, ""),
        (None, 301, ""),
        (None, 399, ""),
        (None, 404, "HTTP status 404"),
        (None, 101, "HTTP status 101"),
        (204, 204, ""),
        (204, 200, "HTTP status 200"),
        (503, 503, ""),
    ],
)
def test_the_verdict_on_a_status(expected, status, why):
    assert verdict(HealthCheck("http", "/", status=expected), status) == why
