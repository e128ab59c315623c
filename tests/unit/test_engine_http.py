"""The Docker adapter's own GETs over a unix socket (``UnixHttp``): one
connection kept open between requests, opened again when the engine closed
it, and the engine's answers as the project's errors. A stand-in engine on
a unix socket in a thread answers; no Docker."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading

import pytest

from dockerlb.adapters.docker_source import DockerSource, UnixHttp
from dockerlb.errors import ContainerGone, DockerRefused, DockerUnavailable

pytestmark = pytest.mark.unit


def answer(status: int, body: dict, close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + data


class Engine:
    """Answers each request with the next of ``answers`` (status, body,
    then close the connection?); counts connections and requests."""

    def __init__(self, answers: list[tuple[int, dict, bool]]) -> None:
        self.answers, self.connections, self.requests = list(answers), 0, []
        self.path = os.path.join(tempfile.mkdtemp(prefix="dlb-http-"), "engine.sock")
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.path)
        self._listener.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self._listener:
            self._answer_all()

    def _answer_all(self) -> None:
        while self.answers:
            conn, _ = self._listener.accept()
            self.connections += 1
            with conn:
                buffer = b""
                while self.answers:
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(4096)
                        if not data:
                            break
                        buffer += data
                    if b"\r\n\r\n" not in buffer:
                        break
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    self.requests.append(head.split(b"\r\n")[0].decode())
                    status, body, close = self.answers.pop(0)
                    conn.sendall(answer(status, body, close))
                    if close:
                        break


def test_requests_share_one_connection_until_the_engine_closes_it():
    engine = Engine([(200, {"n": 1}, False), (200, {"n": 2}, True), (200, {"n": 3}, False)])
    http = UnixHttp(engine.path, 5.0)
    got = [json.loads(http.get(f"/v1.41/x/{i}")[1])["n"] for i in range(3)]
    http.close()
    assert got == [1, 2, 3]
    assert engine.requests == [f"GET /v1.41/x/{i} HTTP/1.1" for i in range(3)]
    assert engine.connections == 2  # the second answer said it closed


class Source(DockerSource):
    """The adapter's error translation over ``get_json``, engine and version given."""

    def __init__(self, path: str) -> None:  # no SDK client: get_json's own path alone
        self._direct = UnixHttp(path, 5.0)

    @property
    def api_version(self) -> str:
        return "1.41"


def test_the_engines_answers_become_the_projects_errors():
    engine = Engine(
        [
            (404, {"message": "No such container: web"}, False),
            (400, {"message": "bad parameter"}, False),
            (500, {"message": "it broke"}, False),
        ]
    )
    source = Source(engine.path)
    with pytest.raises(ContainerGone, match="No such container: web"):
        source.get_json("/containers/web/json")
    with pytest.raises(DockerRefused, match="400 bad parameter"):
        source.get_json("/containers/web/json")
    with pytest.raises(DockerUnavailable, match="500 it broke"):
        source.get_json("/containers/web/json")
    source._direct.close()


def test_no_engine_at_the_socket_is_docker_unavailable():
    source = Source(os.path.join(tempfile.mkdtemp(prefix="dlb-http-"), "none.sock"))
    with pytest.raises(DockerUnavailable):
        source.get_json("/containers/web/json")
