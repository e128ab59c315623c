"""A STAND-IN for dockerd, for benchmarks only (never for tests): a small
HTTP server on a unix socket answering what dockerlb's Docker adapter asks
at start-up, for SERVICES x SERVERS labelled containers that do not exist.

    python -m bench.stand_in_dockerd SOCKET [SERVICES] [SERVERS] [SPARES] [NEW_SERVICES] [HEALTH]

Why: the cold-sync benchmark (bench/cold_sync.py) needs 10,000 labelled
containers in the controller, and starting 10,000 real ones in the
benchmark guest would take hours. dockerlb still talks to it through the
docker SDK over HTTP exactly as it talks to dockerd, so its listing,
inspects, JSON decoding and parsing are all measured; only the engine's own
work is not (answers are encoded once, at start). It serves in one thread
(see ``serve``), in a process of its own; the benchmark reports its CPU
time, which in a one-CPU guest is time the controller did not get.

What it answers (Docker Engine API 1.41, as dockerd 20.10, the one on this
machine; a path may carry the SDK's /v1.41 prefix):
- ``GET /_ping``: ``OK``; ``GET /version``: the version (the SDK negotiates
  the API version from it); ``GET /info``: a short summary;
- ``GET /containers/json``: every container as a running one, with the
  ``filters`` ``status``, ``label`` (key or key=value) and ``id`` applied;
- ``GET /containers/{id or name}/json``: inspect JSON in dockerd 20.10's
  shape (Id, Name, Created, State, Config.Labels, HostConfig,
  NetworkSettings.Networks, ...), or 404;
- ``GET /networks``: ``bridge``, ``host``, ``none`` and the benchmark's
  network (``dlb-bench``, 10.128.0.0/16, gateway 10.128.255.254);
- ``GET /events``: a chunked stream that stays open until the client goes
  away; it carries the events of the changes below, each stamped
  (``timeNano``) as it is sent, in dockerd's shape and order (a start: the
  network's ``connect``, then ``start``; a death: ``die``, then
  ``disconnect``; a health change: ``health_status: STATUS``), the labels
  among the actor's attributes. No past events (``since`` is ignored);
- ``GET /_stand_in/calls``: not Docker's: how many times each endpoint was
  asked, for the benchmark's record; ``POST /_stand_in/start/{id}``,
  ``/_stand_in/stop/{id}`` and ``/_stand_in/health/{id}/{healthy or
  unhealthy}``: not Docker's either: a container starts, exits or changes
  health, and its events are sent (for bench/passes.py and
  bench/scale.py). Anything else: 404, counted.

Containers: service ``s`` has VIP 10.0.0.1+s port 80, server ``k`` of it is
container ``s * SERVERS + k`` at 10.128.0.1 + that number, port 8080
(``dockerlb.port``), on ``dlb-bench``, NAT (the default), all in compose
project ``dlb-bench``: the table bench/control_plane.py builds. SPARES
(default 0) more containers exist, exited until started: spare ``j`` is
one more server of service ``j % SERVICES``; NEW_SERVICES (default 0)
more, exited too, are each the one server of a service of its own (VIP
10.0.0.1 + SERVICES + j), which its start creates. HEALTH 1: every
container has a HEALTHCHECK and is healthy (the listing's status says
"(healthy)").
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_VERSION = "1.41"
ENGINE_VERSION = "20.10.24+dfsg1"
VIP_FIRST = IPv4Address("10.0.0.1")
VIP_PORT = 80
SERVER_FIRST = IPv4Address("10.128.0.1")
SERVER_PORT = 8080
NETWORK = "dlb-bench"
SUBNET = "10.128.0.0/16"
# Not the subnet's first address, which is a server's: the director's own
# address (also in the subnet) must differ from it, or dockerlb takes the
# director for the Docker host's namespace.
GATEWAY = "10.128.255.254"
PROJECT = "dlb-bench"
IMAGE = "sha256:" + hashlib.sha256(b"dlb-bench-image").hexdigest()


def _id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def container_id(serial: int) -> str:
    """The Id of container ``serial``."""
    return _id(f"container {serial}")


def _time(base: datetime, seconds: float) -> str:
    """Docker's timestamps: RFC 3339 with nanoseconds."""
    return (base + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def _network(name: str, driver: str, subnet: str | None, gateway: str | None) -> dict[str, Any]:
    config = [{"Subnet": subnet, "Gateway": gateway}] if subnet else []
    return {
        "Name": name,
        "Id": _id(f"network {name}"),
        "Created": "2026-12-03T09:00:00.000000000Z",
        "Scope": "local",
        "Driver": driver,
        "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": config},
        "Internal": False,
        "Attachable": False,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {},
        "Options": {"com.docker.network.bridge.name": f"br-{_id(name)[:12]}"} if driver == "bridge" else {},
        "Labels": {"com.docker.compose.network": "default", "com.docker.compose.project": PROJECT}
        if name == NETWORK
        else {},
    }


NETWORKS = [
    _network("bridge", "bridge", "172.17.0.0/16", "172.17.0.1"),
    _network("host", "host", None, None),
    _network("none", "null", None, None),
    _network(NETWORK, "bridge", SUBNET, GATEWAY),
]


def _labels(service: int, index: int) -> dict[str, str]:
    """What a compose service's container carries, and dockerlb's two."""
    name = f"svc{service:04d}"
    return {
        "com.docker.compose.config-hash": _id(name),
        "com.docker.compose.container-number": str(index + 1),
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.project": PROJECT,
        "com.docker.compose.project.config_files": "/srv/dlb-bench/compose.yaml",
        "com.docker.compose.project.working_dir": "/srv/dlb-bench",
        "com.docker.compose.service": name,
        "com.docker.compose.version": "1.29.2",
        "dockerlb.vip": f"{VIP_FIRST + service}:{VIP_PORT}",
        "dockerlb.port": str(SERVER_PORT),
    }


def container(
    serial: int,
    servers: int,
    base: datetime,
    services: int = 0,
    spares: int = 0,
    health: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Container ``serial``: (its inspect JSON, its /containers/json summary).
    Past ``services`` x ``servers``, the next ``spares`` each join service
    ``serial % services`` as one more server; past those, each is the one
    server of a service of its own (the next VIP). ``health``: it has a
    HEALTHCHECK, healthy."""
    service, index = divmod(serial, servers)
    if services and service >= services:
        extra = serial - services * servers
        if extra < spares:
            service, index = serial % services, servers + extra // services
        else:
            service, index = services + extra - spares, 0
    cid = container_id(serial)
    name = f"{PROJECT}_svc{service:04d}_{index + 1}"
    addr = str(SERVER_FIRST + serial)
    mac = "02:42:" + ":".join(f"{b:02x}" for b in (SERVER_FIRST + serial).packed)
    labels = _labels(service, index)
    endpoint = _id(f"endpoint {serial}")
    net_id = NETWORKS[-1]["Id"]
    created = _time(base, serial * 0.05)
    network = {
        "IPAMConfig": None,
        "Links": None,
        "Aliases": [f"svc{service:04d}", cid[:12]],
        "NetworkID": net_id,
        "EndpointID": endpoint,
        "Gateway": GATEWAY,
        "IPAddress": addr,
        "IPPrefixLen": 16,
        "IPv6Gateway": "",
        "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0,
        "MacAddress": mac,
        "DriverOpts": None,
    }
    ports = {f"{SERVER_PORT}/tcp": None}
    inspect = {
        "Id": cid,
        "Created": created,
        "Path": "/docker-entrypoint.sh",
        "Args": ["nginx", "-g", "daemon off;"],
        "State": {
            "Status": "running",
            "Running": True,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": False,
            "Dead": False,
            "Pid": 100000 + serial,
            "ExitCode": 0,
            "Error": "",
            "StartedAt": _time(base, serial * 0.05 + 0.4),
            "FinishedAt": "0001-01-01T00:00:00Z",
            **({"Health": {"Status": "healthy", "FailingStreak": 0, "Log": []}} if health else {}),
        },
        "Image": IMAGE,
        "ResolvConfPath": f"/var/lib/docker/containers/{cid}/resolv.conf",
        "HostnamePath": f"/var/lib/docker/containers/{cid}/hostname",
        "HostsPath": f"/var/lib/docker/containers/{cid}/hosts",
        "LogPath": f"/var/lib/docker/containers/{cid}/{cid}-json.log",
        "Name": f"/{name}",
        "RestartCount": 0,
        "Driver": "overlay2",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "docker-default",
        "ExecIDs": None,
        "HostConfig": {
            "Binds": [],
            "ContainerIDFile": "",
            "LogConfig": {"Type": "json-file", "Config": {}},
            "NetworkMode": NETWORK,
            "PortBindings": {},
            "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
            "AutoRemove": False,
            "VolumeDriver": "",
            "VolumesFrom": [],
            "CapAdd": None,
            "CapDrop": None,
            "CgroupnsMode": "private",
            "Dns": [],
            "DnsOptions": [],
            "DnsSearch": [],
            "ExtraHosts": None,
            "GroupAdd": None,
            "IpcMode": "private",
            "Cgroup": "",
            "Links": None,
            "OomScoreAdj": 0,
            "PidMode": "",
            "Privileged": False,
            "PublishAllPorts": False,
            "ReadonlyRootfs": False,
            "SecurityOpt": None,
            "UTSMode": "",
            "UsernsMode": "",
            "ShmSize": 67108864,
            "Runtime": "runc",
            "ConsoleSize": [0, 0],
            "Isolation": "",
            "CpuShares": 0,
            "Memory": 0,
            "NanoCpus": 0,
            "CgroupParent": "",
            "BlkioWeight": 0,
            "CpuPeriod": 0,
            "CpuQuota": 0,
            "CpusetCpus": "",
            "Devices": None,
            "MemoryReservation": 0,
            "MemorySwap": 0,
            "OomKillDisable": None,
            "PidsLimit": None,
            "Ulimits": None,
            "MaskedPaths": ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/sys/firmware"],
            "ReadonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
        "GraphDriver": {
            "Data": {
                "LowerDir": f"/var/lib/docker/overlay2/{_id(name)}-init/diff",
                "MergedDir": f"/var/lib/docker/overlay2/{_id(name)}/merged",
                "UpperDir": f"/var/lib/docker/overlay2/{_id(name)}/diff",
                "WorkDir": f"/var/lib/docker/overlay2/{_id(name)}/work",
            },
            "Name": "overlay2",
        },
        "Mounts": [],
        "Config": {
            "Hostname": cid[:12],
            "Domainname": "",
            "User": "",
            "AttachStdin": False,
            "AttachStdout": False,
            "AttachStderr": False,
            "ExposedPorts": {f"{SERVER_PORT}/tcp": {}},
            "Tty": False,
            "OpenStdin": False,
            "StdinOnce": False,
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "NGINX_VERSION=1.25.3",
                "NJS_VERSION=0.8.2",
                "PKG_RELEASE=1~bookworm",
            ],
            "Cmd": ["nginx", "-g", "daemon off;"],
            "Image": "nginx:1.25",
            "Volumes": None,
            "WorkingDir": "",
            "Entrypoint": ["/docker-entrypoint.sh"],
            "OnBuild": None,
            "Labels": labels,
            "StopSignal": "SIGQUIT",
            **({"Healthcheck": {"Test": ["CMD-SHELL", "curl -fs localhost:8080/"]}} if health else {}),
        },
        "NetworkSettings": {
            "Bridge": "",
            "SandboxID": _id(f"sandbox {serial}"),
            "HairpinMode": False,
            "LinkLocalIPv6Address": "",
            "LinkLocalIPv6PrefixLen": 0,
            "Ports": ports,
            "SandboxKey": f"/var/run/docker/netns/{_id(f'sandbox {serial}')[:12]}",
            "SecondaryIPAddresses": None,
            "SecondaryIPv6Addresses": None,
            "EndpointID": "",
            "Gateway": "",
            "GlobalIPv6Address": "",
            "GlobalIPv6PrefixLen": 0,
            "IPAddress": "",
            "IPPrefixLen": 0,
            "IPv6Gateway": "",
            "MacAddress": "",
            "Networks": {NETWORK: network},
        },
    }
    summary = {
        "Id": cid,
        "Names": [f"/{name}"],
        "Image": "nginx:1.25",
        "ImageID": IMAGE,
        "Command": '/docker-entrypoint.sh nginx -g "daemon off;"',
        "Created": int(datetime.fromisoformat(created[:26]).replace(tzinfo=UTC).timestamp()),
        "Ports": [{"PrivatePort": SERVER_PORT, "Type": "tcp"}],
        "Labels": labels,
        "State": "running",
        "Status": "Up 2 hours (healthy)" if health else "Up 2 hours",
        "HostConfig": {"NetworkMode": NETWORK},
        "NetworkSettings": {"Networks": {NETWORK: network}},
        "Mounts": [],
    }
    return inspect, summary


def _container_event(action: str, inspect: dict[str, Any], **extra: str) -> dict[str, Any]:
    """A container event as dockerd 20.10 sends it (API 1.41): the labels
    among the actor's attributes."""
    attrs = {**inspect["Config"]["Labels"], "image": inspect["Config"]["Image"], "name": inspect["Name"][1:]}
    return {
        "status": action,
        "id": inspect["Id"],
        "from": inspect["Config"]["Image"],
        "Type": "container",
        "Action": action,
        "Actor": {"ID": inspect["Id"], "Attributes": {**attrs, **extra}},
        "scope": "local",
    }


def _network_event(action: str, inspect: dict[str, Any]) -> dict[str, Any]:
    """A network's connect or disconnect of a container, as dockerd sends it."""
    attrs = {"container": inspect["Id"], "name": NETWORK, "type": "bridge"}
    return {
        "Type": "network",
        "Action": action,
        "Actor": {"ID": NETWORKS[-1]["Id"], "Attributes": attrs},
        "scope": "local",
    }


class Engine:
    """The stand-in's state: answers encoded once, what was asked, and the
    event streams open (each change it is told of is sent down every one)."""

    def __init__(
        self, services: int, servers: int, spares: int = 0, new_services: int = 0, health: bool = False
    ) -> None:
        base = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
        made = [
            container(i, servers, base, services, spares, health)
            for i in range(services * servers + spares + new_services)
        ]
        self.health = health
        self.summaries = [summary for _, summary in made]
        self.inspects: dict[str, bytes] = {}
        self._made = {inspect["Id"]: (inspect, summary) for inspect, summary in made}
        self.ids = [inspect["Id"] for inspect, _ in made]
        self._serial = {cid: serial for serial, cid in enumerate(self.ids)}
        for inspect, _ in made:
            self._encode(inspect)
        self.calls: Counter[str] = Counter()
        self._lists: dict[str, bytes] = {}  # the listing, by its query, encoded once
        self.streams: list[socket.socket] = []  # clients of GET /events
        # Spares exist but are not running until a benchmark starts one.
        for cid in self.ids[services * servers :]:
            self.set_running(cid, False, say=False)

    def _encode(self, inspect: dict[str, Any]) -> None:
        body = json.dumps(inspect).encode()
        self.inspects[inspect["Id"]] = body
        self.inspects[inspect["Name"].lstrip("/")] = body

    def set_running(self, cid: str, running: bool, say: bool = True) -> None:
        """Not Docker's: start or stop (exit) container ``cid``, as a
        benchmark's stand-in for ``docker start`` / a death; then the events
        dockerd sends for it, in its order (a start: the network's connect,
        then the container's start; a death: die, then the disconnect)."""
        inspect, summary = self._made[cid]
        pid = 100000 + self._serial[cid] if running else 0
        state = "running" if running else "exited"
        inspect["State"].update(Status=state, Running=running, Pid=pid)
        status = "Up 2 hours" if running else "Exited (0) 1 second ago"
        if self.health and running:
            # A started container's check starts over; the stand-in says
            # healthy at once (the benchmark times the start, not the check).
            inspect["State"]["Health"]["Status"] = "healthy"
            status += " (healthy)"
        summary.update(State=state, Status=status)
        self._encode(inspect)
        self._lists.clear()
        if not say:
            return
        if running:
            self.say(_network_event("connect", inspect))
            self.say(_container_event("start", inspect))
        else:
            self.say(_container_event("die", inspect, exitCode="0"))
            self.say(_network_event("disconnect", inspect))

    def set_health(self, cid: str, status: str) -> None:
        """Not Docker's: container ``cid``'s HEALTHCHECK now says ``status``
        (healthy or unhealthy); then dockerd's ``health_status`` event."""
        inspect, summary = self._made[cid]
        inspect["State"]["Health"]["Status"] = status
        summary["Status"] = f"Up 2 hours ({status})"
        self._encode(inspect)
        self._lists.clear()
        self.say(_container_event(f"health_status: {status}", inspect))

    def say(self, event: dict[str, Any]) -> None:
        """One event down every open stream (a chunk of its own, as dockerd
        sends them), stamped now."""
        now = time.time_ns()
        event = {**event, "time": now // 1_000_000_000, "timeNano": now}
        data = json.dumps(event).encode() + b"\n"
        chunk = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        for sock in list(self.streams):
            try:
                sock.sendall(chunk)
            except OSError:
                self.streams.remove(sock)

    def count(self, endpoint: str) -> None:
        self.calls[endpoint] += 1

    def listing(self, query: str) -> bytes:
        body = self._lists.get(query)
        if body is None:
            body = self._lists[query] = json.dumps(_filtered(self.summaries, parse_qs(query))).encode()
        return body


def _filtered(summaries: list[dict[str, Any]], query: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The listing's ``filters`` as dockerd applies them (status, label, id);
    every stand-in container is running, so ``all`` changes nothing."""
    filters = json.loads(query.get("filters", ["{}"])[0])
    # The API takes {"key": ["v"]} and the older {"key": {"v": true}}.
    wanted = {k: list(v) for k, v in filters.items()}
    out = []
    for s in summaries:
        if "status" in wanted and s["State"] not in wanted["status"]:
            continue
        if "id" in wanted and not any(s["Id"].startswith(i) for i in wanted["id"]):
            continue
        if "label" in wanted and not all(_has_label(s["Labels"], want) for want in wanted["label"]):
            continue
        out.append(s)
    return out


def _has_label(labels: dict[str, str], want: str) -> bool:
    key, eq, value = want.partition("=")
    return key in labels and (not eq or labels[key] == value)


def _strip_version(path: str) -> str:
    """``/v1.41/containers/json`` -> ``/containers/json``."""
    parts = path.split("/", 2)
    if len(parts) == 3 and parts[1].startswith("v") and parts[1][1:2].isdigit():
        return "/" + parts[2]
    return path


VERSION = {
    "Platform": {"Name": "stand-in dockerd (bench/stand_in_dockerd.py)"},
    "Version": ENGINE_VERSION,
    "ApiVersion": API_VERSION,
    "MinAPIVersion": "1.12",
    "GitCommit": "5d6db84",
    "GoVersion": "go1.19.8",
    "Os": "linux",
    "Arch": "amd64",
    "KernelVersion": os.uname().release,
    "BuildTime": "2023-04-07T00:00:00.000000000+00:00",
}
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}


def response(status: int, body: bytes, kind: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nApi-Version: {API_VERSION}\r\nContent-Type: {kind}\r\n"
        f"Docker-Experimental: false\r\nOstype: linux\r\nServer: Docker/{ENGINE_VERSION} (linux)\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


# Docker's event stream with no event: the headers, then silence.
EVENTS_HEAD = (
    f"HTTP/1.1 200 OK\r\nApi-Version: {API_VERSION}\r\nContent-Type: application/json\r\n"
    f"Server: Docker/{ENGINE_VERSION} (linux)\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
)


def answer(engine: Engine, method: str, path: str, query: str) -> bytes | None:
    """The reply to one request; None for the event stream (headers only,
    then the connection stays open and silent)."""
    for verb, running in (("start", True), ("stop", False)):
        if method == "POST" and path.startswith(f"/_stand_in/{verb}/"):
            engine.set_running(path.rsplit("/", 1)[1], running)
            return response(200, b"{}")
    if method == "POST" and path.startswith("/_stand_in/health/"):
        cid, status = path.split("/")[-2:]
        engine.set_health(cid, status)
        return response(200, b"{}")
    if method != "GET":
        engine.count(f"{method} {path}")
        return response(405, b'{"message":"the stand-in dockerd only answers GET"}')
    if path.startswith("/containers/") and path.endswith("/json") and path != "/containers/json":
        engine.count("GET /containers/{id}/json")
        body = engine.inspects.get(path[len("/containers/") : -len("/json")])
        return response(404, b'{"message":"No such container"}') if body is None else response(200, body)
    engine.count(f"GET {path}")
    if path == "/events":
        return None
    if path == "/containers/json":
        return response(200, engine.listing(query))
    if path == "/_ping":
        return response(200, b"OK", "text/plain; charset=utf-8")
    if path == "/version":
        return response(200, json.dumps(VERSION).encode())
    if path == "/info":
        return response(200, json.dumps(info(engine)).encode())
    if path == "/networks":
        return response(200, json.dumps(NETWORKS).encode())
    if path == "/_stand_in/calls":
        return response(200, json.dumps(engine.calls).encode())
    return response(404, b'{"message":"page not found"}')


def info(engine: Engine) -> dict[str, Any]:
    count = len(engine.summaries)
    return {
        "ID": "DLB0:BENC:HSTA:NDIN",
        "Containers": count,
        "ContainersRunning": count,
        "ContainersPaused": 0,
        "ContainersStopped": 0,
        "Images": 1,
        "Driver": "overlay2",
        "ServerVersion": ENGINE_VERSION,
        "OperatingSystem": "stand-in dockerd (bench/stand_in_dockerd.py)",
        "OSType": "linux",
        "Architecture": "x86_64",
        "Name": "stand-in",
    }


def requests_in(buffer: bytearray) -> list[tuple[str, str, str]]:
    """Take the complete requests (method, path without /vX.Y, query) off
    the front of ``buffer``; a partial one stays for the next read."""
    found = []
    while (end := buffer.find(b"\r\n\r\n")) >= 0:
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for header in head[1:]:
            name, _, value = header.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(buffer) < end + 4 + length:
            break
        del buffer[: end + 4 + length]
        method, target = head[0].split()[:2]
        url = urlsplit(target)
        found.append((method, _strip_version(url.path), url.query))
    return found


def serve(path: str, engine: Engine) -> None:
    """HTTP/1.1 with keep-alive in one thread, one selector. Why not
    http.server: the docker SDK keeps a connection pool per URL, so each
    inspect of another container is a new connection, and a thread per
    connection (plus http.server's parsing) costs the one-CPU guest several
    times more than this; every microsecond the stand-in spends there is
    taken from the controller it serves."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytearray] = {}
    # The benchmark waits for this line: the answers are all encoded.
    print(f"stand-in dockerd: {len(engine.summaries)} containers on {path}", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                conn, _ = listener.accept()
                buffers[conn] = bytearray()
                selector.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # the client hung up (an event stream ends so too)
                selector.unregister(sock)
                del buffers[sock]
                if sock in engine.streams:
                    engine.streams.remove(sock)
                sock.close()
                continue
            buffers[sock] += data
            for method, target, query in requests_in(buffers[sock]):
                reply = answer(engine, method, target, query)
                if reply is None:
                    sock.sendall(EVENTS_HEAD)
                    engine.streams.append(sock)
                else:
                    sock.sendall(reply)


def main() -> None:
    path = sys.argv[1]
    services = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    servers = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    spares = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    new_services = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    health = len(sys.argv) > 6 and sys.argv[6] == "1"
    engine = Engine(services, servers, spares, new_services, health)
    if os.path.exists(path):
        os.unlink(path)
    serve(path, engine)


if __name__ == "__main__":
    main()
