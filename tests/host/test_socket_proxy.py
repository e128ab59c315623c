"""Host tier: compose/socket-proxy, HAProxy as a read-only Docker API
(issue 29, finding 13). dockerlb reads everything it needs through it, the
dockerlb image's doctor included; anything else (a POST, a DELETE, a GET of
logs, archives or images) is refused with 403 before it reaches dockerd."""

import http.client
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dockerlb.adapters.docker_source import DockerSource
from dockerlb.settings import Settings
from harness.dockerlab import wait_for

pytestmark = pytest.mark.host
ROOT = Path(__file__).resolve().parents[2]
PROXY_IMAGE = "dockerlb-socket-proxy:test"
DOCKERLB_IMAGE = "dockerlb:test"
VIP = {"dockerlb.vip": "1.2.3.4:8000"}


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def proxy(tmp_path, lab):
    """The proxy as compose/socket-proxy runs it; its socket's path on the host."""
    done = docker("image", "inspect", PROXY_IMAGE)
    assert done.returncode == 0, f"{PROXY_IMAGE} is missing: run scripts/build-image.sh first"
    name = lab.name("socket-proxy")
    done = docker(
        "run", "-d", "--name", name, "--network", "none", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges:true", "--read-only",
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{tmp_path}:/run/docker-proxy",
        "-v", f"{ROOT}/compose/socket-proxy/haproxy.cfg:/etc/haproxy/haproxy.cfg:ro",
        PROXY_IMAGE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    sock = tmp_path / "docker.sock"
    try:
        # Its socket file comes before it answers: wait on an answer, as dockerlb would get one.
        wait_for(lambda: answers(sock), 30, 0.2, what="the proxy answering /_ping")
        yield sock
    finally:
        docker("rm", "-f", name)


def answers(sock: Path) -> bool:
    try:
        return sock.exists() and status(sock, "GET", "/_ping") == 200
    except (OSError, http.client.HTTPException):
        return False


def status(sock: Path, method: str, path: str) -> int:
    """The status the proxy answers. The request goes in one write: the proxy
    may refuse on the headers and close before a body sent after them would
    arrive (http.client's two writes then meet a closed socket)."""
    body = b"{}" if method == "POST" else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock))
        s.sendall(head.encode() + b"Content-Type: application/json\r\nConnection: close\r\n\r\n" + body)
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status


def test_dockerlb_reads_all_it_needs_through_the_proxy(proxy, lab, monkeypatch):
    net = lab.network("proxied")
    c = lab.run("web", labels=VIP, network=net)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy}")
    source = DockerSource(Settings())
    try:
        source.ping()
        assert source.api_version.startswith("1.")
        assert c.id in {x.id for x in source.list_containers(detailed=lambda x: True)}  # list and inspect
        assert source.inspect(c.id).labels["dockerlb.vip"] == "1.2.3.4:8000"
        assert net.name in {n.name for n in source.networks()}
        assert len(source.network(net.name).members) == 1
        # The event stream, long-lived, through the proxy too.
        since, seen, stop = time.time(), [], threading.Event()

        def follow() -> None:
            for t in source.events(since, stop):
                seen.append(t)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            c.stop(timeout=1)
            wait_for(lambda: any(t.container_id == c.id and t.reason == "die" for t in seen), 30, what="die")
        finally:
            stop.set()
            source.stop_events()
            thread.join(timeout=10)
    finally:
        source.close()


def test_the_dockerlb_image_checks_itself_through_the_proxy(proxy):
    done = docker(
        "run", "--rm", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN",
        "--security-opt", "no-new-privileges:true", "--read-only",
        "-v", f"{proxy.parent}:/run/docker-proxy:ro",
        "-e", "DOCKER_HOST=unix:///run/docker-proxy/docker.sock", DOCKERLB_IMAGE, "doctor",
    )  # fmt: skip
    assert any(line.startswith("PASS  Docker engine: answers") for line in done.stdout.splitlines()), (
        done.stdout + done.stderr
    )


def test_the_proxy_refuses_everything_else_before_dockerd_sees_it(proxy, lab):
    c = lab.run("target")
    before = docker("ps", "-aq").stdout.split()
    refused = [
        ("POST", "/v1.41/containers/create"),
        ("POST", f"/v1.41/containers/{c.id}/stop"),
        ("POST", f"/containers/{c.id}/exec"),
        ("DELETE", f"/v1.41/containers/{c.id}"),
        ("PUT", f"/v1.41/containers/{c.id}/archive?path=/"),
        ("GET", f"/v1.41/containers/{c.id}/archive?path=/etc"),
        ("GET", f"/v1.41/containers/{c.id}/logs?stdout=1"),
        ("GET", f"/v1.41/containers/{c.id}/export"),
        ("GET", "/v1.41/images/json"),
        ("GET", "/v1.41/secrets"),
        ("GET", "/v1.41/info"),
        ("GET", "/v1.41/containers/json/../../images/json"),
        ("GET", "/v1.41/networks/.."),
        ("GET", "/v1.41/containers/../json"),
    ]
    assert [(m, p, status(proxy, m, p)) for m, p in refused] == [(m, p, 403) for m, p in refused]
    assert docker("ps", "-aq").stdout.split() == before
    assert docker("inspect", "-f", "{{.State.Running}}", c.id).stdout.strip() == "true"
    # What dockerlb reads passes (Swarm's too: this engine is no manager, so dockerd itself says 503).
    passed = [
        ("GET", "/_ping"),
        ("HEAD", "/_ping"),
        ("GET", "/version"),
        ("GET", "/v1.41/containers/json?all=1"),
        ("GET", f"/v1.41/containers/{c.id}/json"),
        ("GET", "/v1.41/networks"),
        ("GET", "/v1.41/networks/bridge"),
        ("GET", "/v1.41/services"),
        ("GET", "/v1.41/tasks/x"),
        ("GET", "/v1.41/nodes"),
    ]
    got = {(m, p): status(proxy, m, p) for m, p in passed}
    assert all(code != 403 for code in got.values()), got
    assert got[("GET", "/v1.41/containers/json?all=1")] == 200
    assert got[("GET", "/v1.41/services")] == 503, got  # dockerd: "not a swarm manager"
