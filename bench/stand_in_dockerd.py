"""A STAND-IN for dockerd, for benchmarks only (never for tests): a small
HTTP server on a unix socket answering what dockerlb's Docker adapter asks
at start-up, for SERVICES x SERVERS labelled containers that do not exist.

    python -m bench.stand_in_dockerd SOCKET [SERVICES] [SERVERS]

Why: the cold-sync benchmark (bench/cold_sync.py) needs 10,000 labelled
containers in the controller, and starting 10,000 real ones in the
benchmark guest would take hours. dockerlb still talks to it through the
docker SDK over HTTP exactly as it talks to dockerd, so its listing,
inspects, JSON decoding and parsing are all measured; only the engine's own
work is not (answers are encoded once, at start).

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
- ``GET /events``: a chunked stream that stays open and sends nothing,
  until the client goes away;
- ``GET /_stand_in/calls``: not Docker's: how many times each endpoint was
  asked, for the benchmark's record. Anything else: 404, counted.

Containers: service ``s`` has VIP 10.0.0.1+s port 80, server ``k`` of it is
container ``s * SERVERS + k`` at 10.128.0.1 + that number, port 8080
(``dockerlb.port``), on ``dlb-bench``, NAT (the default), all in compose
project ``dlb-bench``: the table bench/control_plane.py builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socketserver
import sys
import threading
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


def container(serial: int, servers: int, base: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """Container ``serial``: (its inspect JSON, its /containers/json summary)."""
    service, index = divmod(serial, servers)
    cid = _id(f"container {serial}")
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
        "Status": "Up 2 hours",
        "HostConfig": {"NetworkMode": NETWORK},
        "NetworkSettings": {"Networks": {NETWORK: network}},
        "Mounts": [],
    }
    return inspect, summary


class Engine:
    """The stand-in's state: answers encoded once, and what was asked."""

    def __init__(self, services: int, servers: int) -> None:
        base = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
        made = [container(i, servers, base) for i in range(services * servers)]
        self.summaries = [summary for _, summary in made]
        self.inspects: dict[str, bytes] = {}
        for inspect, _ in made:
            body = json.dumps(inspect).encode()
            self.inspects[inspect["Id"]] = body
            self.inspects[inspect["Name"].lstrip("/")] = body
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._lists: dict[str, bytes] = {}  # the listing, by its query, encoded once

    def count(self, endpoint: str) -> None:
        with self._lock:
            self.calls[endpoint] += 1

    def listing(self, query: str) -> bytes:
        with self._lock:
            body = self._lists.get(query)
        if body is None:
            body = json.dumps(_filtered(self.summaries, parse_qs(query))).encode()
            with self._lock:
                self._lists[query] = body
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


class Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 with keep-alive, parsed by hand: http.server's handler costs
    several times more per request, and in the one-CPU guest every
    microsecond the stand-in spends is taken from the controller it serves."""

    server: Server

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(65537)
            if not line:
                return
            method, target = line.decode("latin-1").split()[:2]
            length = 0
            while True:
                header = self.rfile.readline(65537)
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length:
                self.rfile.read(length)
            url = urlsplit(target)
            if not self.answer(method, _strip_version(url.path), url.query):
                return

    def answer(self, method: str, path: str, query: str) -> bool:
        """Answer one request; False when the connection is done."""
        engine = self.server.engine
        if method != "GET":
            engine.count(f"{method} {path}")
            return self.send(405, b'{"message":"the stand-in dockerd only answers GET"}')
        if path == "/events":
            engine.count("GET /events")
            self.stream_nothing()
            return False
        if path.startswith("/containers/") and path.endswith("/json") and path != "/containers/json":
            engine.count("GET /containers/{id}/json")
            body = engine.inspects.get(path[len("/containers/") : -len("/json")])
            if body is None:
                return self.send(404, b'{"message":"No such container"}')
            return self.send(200, body)
        engine.count(f"GET {path}")
        if path == "/containers/json":
            return self.send(200, engine.listing(query))
        if path == "/_ping":
            return self.send(200, b"OK", "text/plain; charset=utf-8")
        if path == "/version":
            return self.send(200, json.dumps(VERSION).encode())
        if path == "/info":
            return self.send(200, json.dumps(self.info()).encode())
        if path == "/networks":
            return self.send(200, json.dumps(NETWORKS).encode())
        if path == "/_stand_in/calls":
            return self.send(200, json.dumps(engine.calls).encode())
        return self.send(404, b'{"message":"page not found"}')

    def send(self, status: int, body: bytes, kind: str = "application/json") -> bool:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
        self.wfile.write(
            f"HTTP/1.1 {status} {reason}\r\nApi-Version: {API_VERSION}\r\nContent-Type: {kind}\r\n"
            f"Docker-Experimental: false\r\nOstype: linux\r\nServer: Docker/{ENGINE_VERSION} (linux)\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return True

    def stream_nothing(self) -> None:
        """Docker's event stream with no event: headers, then silence until
        the client hangs up (recv returns nothing) or the server stops."""
        self.wfile.write(
            f"HTTP/1.1 200 OK\r\nApi-Version: {API_VERSION}\r\nContent-Type: application/json\r\n"
            f"Server: Docker/{ENGINE_VERSION} (linux)\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        self.wfile.flush()
        try:
            while self.connection.recv(4096):
                pass
        except OSError:
            pass

    def info(self) -> dict[str, Any]:
        count = len(self.server.engine.summaries)
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


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # an open event stream must not hold the process at exit

    def __init__(self, path: str, engine: Engine) -> None:
        self.engine = engine
        super().__init__(path, Handler)


def main() -> None:
    path = sys.argv[1]
    services = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    servers = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    engine = Engine(services, servers)
    if os.path.exists(path):
        os.unlink(path)
    with Server(path, engine) as server:
        # The benchmark waits for this line: the answers are all encoded.
        print(f"stand-in dockerd: {len(engine.summaries)} containers on {path}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
