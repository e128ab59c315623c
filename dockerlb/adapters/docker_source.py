"""The Docker adapter: the only door to the Docker engine.

Lists and inspects containers into ``model.Container`` records and turns the
event stream into triggers. The SDK negotiates the API version; it is never
pinned. docker/requests errors are translated into the project's own.
"""

from __future__ import annotations

import codecs
import contextlib
import http.client
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network
from typing import Any
from urllib.parse import quote

import docker
import requests
from docker.errors import APIError, DockerException, NotFound

from dockerlb.core.desired import kept_labels
from dockerlb.core.labels import has_prefix
from dockerlb.core.model import Container, DockerNetwork, IPAddress, NetworkAddress, parse_ip
from dockerlb.core.ports import Stopping, Trigger
from dockerlb.errors import ContainerGone, DockerRefused, DockerUnavailable
from dockerlb.settings import Settings

# Container actions after which a container may have joined or left a service.
# ("health_status" arrives as "health_status: healthy" and so on.)
CONTAINER_ACTIONS = frozenset(
    {"start", "restart", "die", "stop", "kill", "pause", "unpause", "destroy", "health_status"}
)
NETWORK_ACTIONS = frozenset({"connect", "disconnect"})
DOWN_ACTIONS = frozenset({"die", "pause"})
SIGKILL = frozenset({"9", "KILL", "SIGKILL"})
# Signals that ask a process to finish (docker stop sends SIGTERM or the
# image's STOPSIGNAL, commonly SIGQUIT or SIGINT); a kill with one of them is
# the start of a stop. Others (HUP, USR1, ...) are reloads and such.
STOP_SIGNALS = frozenset({"15", "TERM", "SIGTERM", "2", "INT", "SIGINT", "3", "QUIT", "SIGQUIT"})
START_ACTIONS = frozenset({"start", "restart", "unpause"})


class EngineConnection:
    """One Docker engine's client and event stream: what both sources hold.
    ``base_url`` names the engine (unix://..., tcp://...); None: the
    environment's (DOCKER_HOST, DOCKER_TLS_VERIFY, ...). The API version is
    negotiated with the engine, never pinned."""

    def __init__(self, base_url: str | None, what: str) -> None:
        try:
            self._client = docker.from_env() if base_url is None else docker.DockerClient(base_url=base_url)
        except DockerException as e:
            raise DockerUnavailable(f"cannot reach {what}: {e}") from e
        self._stream: Any = None
        api = self._client.api
        # An engine on a unix socket (the usual one) is asked for one
        # container over a connection of our own, kept open (``get_json``).
        socket_path = getattr(api.get_adapter(api.base_url), "socket_path", None)
        self._direct = UnixHttp(socket_path, api.timeout) if isinstance(socket_path, str) else None

    @property
    def api_version(self) -> str:
        return str(self._client.api.api_version)

    def get_json(self, path: str) -> Any:
        """GET ``path`` of the (negotiated) API, decoded. Over the engine's
        unix socket, on a connection kept open: through the SDK, each
        container's URL got a connection pool of its own, so every inspect
        opened and closed a connection, and requests' own layers were most
        of an event pass (issue 31). Elsewhere (tcp, TLS, ssh), the SDK."""
        if self._direct is None:
            api = self._client.api
            return api._result(api._get(api._url(path)), json=True)  # type: ignore[attr-defined]
        target = f"/v{self.api_version}{path}"
        try:
            status, body = self._direct.get(target)
        except (OSError, http.client.HTTPException) as e:
            raise DockerUnavailable(f"Docker engine unavailable: {e}") from e
        if status == 404:
            raise ContainerGone(_message(body) or f"{path}: not found")
        if 400 <= status < 500:
            raise DockerRefused(f"Docker refused: {status} {_message(body)}")
        if status >= 300:
            raise DockerUnavailable(f"Docker engine unavailable: {status} {_message(body)}")
        return json.loads(body)

    def close(self) -> None:
        self.stop_events()
        if self._direct is not None:
            self._direct.close()
        self._client.close()

    def networks(self) -> list[DockerNetwork]:
        """Every network's subnets and gateways (from IPAM): a manager's
        are every swarm-scoped one and its own local ones."""
        with translated():
            found = self._client.api.networks()
        return [network_from_summary(n) for n in found]

    def network(self, name: str) -> DockerNetwork | None:
        """One network, by name or ID, with its containers' addresses (the
        listing has none of them); None when the engine has no such network."""
        try:
            with translated():
                info = self._client.api.inspect_network(name)
        except ContainerGone:  # a 404, whatever is missing
            return None
        return network_from_summary(info)

    def stop_events(self) -> None:
        stream = self._stream
        if stream is not None:
            # Closing a half-dead HTTP stream may raise anything.
            with contextlib.suppress(Exception):
                stream.close()


class UnixHttp:
    """HTTP/1.1 GETs over one connection to a unix socket, kept open between
    them (one thread at a time). A connection the engine closed while idle
    is opened again once (a GET can be sent twice)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self._path, self._timeout = path, timeout
        self._conn: _UnixConnection | None = None
        self._lock = threading.Lock()

    def get(self, target: str) -> tuple[int, bytes]:
        with self._lock:
            for attempt in range(2):
                fresh = self._conn is None
                conn = self._conn or _UnixConnection(self._path, self._timeout)
                self._conn = conn
                try:
                    conn.request("GET", target, headers={"Host": "docker"})
                    response = conn.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException):
                    self._drop()
                    if fresh or attempt:
                        raise
                    continue
                if response.will_close:
                    self._drop()
                return response.status, body
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("docker", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _message(body: bytes) -> str:
    """The engine's error message in an answer's body, or the body as text."""
    try:
        return str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:200]


class DockerSource(EngineConnection):
    def __init__(self, settings: Settings) -> None:
        super().__init__(None, "the Docker engine")
        self._prefix = settings.label_prefix
        # Container id -> (what its last listing entry said, the record made from it).
        self._seen: dict[str, tuple[tuple, Container]] = {}

    def ping(self) -> None:
        with translated():
            self._client.api.ping()

    # -- containers ------------------------------------------------------------
    def list_containers(self, detailed: Callable[[Container], bool] | None = None) -> list[Container]:
        """Every container that carries a label under the prefix, in any state.

        Built from the listing itself, one request (it carries labels,
        state, health and addresses): inspecting 10,000 containers one by one
        was 38 of a 40 s start-up (bench/results/cold_sync-20261203T173510.json).
        The listing has no PID: a container for which ``detailed`` says one is
        needed (its namespace is set up) is inspected."""
        found: list[Container] = []
        seen: dict[str, tuple[tuple, Container]] = {}
        wanted: list[str] = []  # running ones to inspect, once the listing is read
        with translated():
            api = self._client.api
            # Every state: a stopped or restarting container keeps its group's
            # claim on its VIPs (core/ownership.py). Read as it arrives, one
            # entry decoded at a time: 10,000 entries decoded at once (14.6
            # MB of JSON) were the controller's peak memory (issue 31).
            # The SDK's own helpers, as its containers() calls them (its
            # headers, timeout and errors), but streamed: not in its stubs.
            url = api._url("/containers/json")  # type: ignore[attr-defined]
            response = api._get(url, params={"all": 1}, stream=True)  # type: ignore[attr-defined]
            try:
                api._raise_for_status(response)  # type: ignore[attr-defined]
                for s in json_items(response.iter_content(_CHUNK)):
                    if not self._has_prefix(s.get("Labels") or {}):
                        continue
                    c = self._listed(s, seen)
                    if c.running and detailed is not None and detailed(c):
                        wanted.append(c.id)
                    found.append(c)
            finally:
                response.close()
        if wanted:
            # The listing has no PID: those whose namespace is set up are
            # inspected (None: gone since the listing).
            inspected = {cid: self.inspect(cid) for cid in wanted}
            found = [now for c in found if (now := inspected.get(c.id, c)) is not None]
        self._seen = seen
        return found

    def _listed(self, summary: dict[str, Any], seen: dict[str, tuple[tuple, Container]]) -> Container:
        """The container a listing entry describes: the record made from the
        last listing when the entry says the same (Docker fixes labels at
        creation, so the rest says it all). Parsing 20,000 addresses again
        was most of a listing, and records made anew on every resync, among
        the listing's short-lived objects, kept the process's memory from
        being given back (its RSS grew with every resync)."""
        key = _summary_key(summary)
        last = self._seen.get(summary["Id"])
        if last is not None and last[0] == key:
            seen[summary["Id"]] = last  # the old key too: the new one's strings are let go
            return last[1]
        c = container_from_summary(summary, self._prefix)
        seen[c.id] = ((c.name, *key[1:]), c)  # the record's own name string, not a copy
        return c

    def inspect(self, container_id: str) -> Container | None:
        """The container as it is now, or None when it no longer exists."""
        try:
            with translated():
                info = self.get_json(f"/containers/{quote(container_id, safe='')}/json")
        except ContainerGone:
            return None
        return container_from_inspect(info, self._prefix)

    def pid_of(self, name: str) -> int:
        """PID of a running container's first process (0 when not running)."""
        with translated():
            info = self.get_json(f"/containers/{quote(name, safe='')}/json")
        return int(info["State"].get("Pid") or 0)

    def _has_prefix(self, labels: dict[str, str]) -> bool:
        return has_prefix(labels, self._prefix)

    # -- events ----------------------------------------------------------------
    def events(self, since: float, stop: Stopping) -> Iterator[Trigger]:
        """Triggers from the event stream, starting at ``since`` (epoch seconds).

        Ends (raising DockerUnavailable) when the stream breaks; ``stop_events``
        from another thread ends it quietly, and so does ``stop`` set before the
        subscription was in place (a stop is never lost between the two).
        """
        with translated():
            # The engine takes fractional seconds as text; the stubs say int.
            self._stream = self._client.api.events(
                since=f"{since:.9f}",  # type: ignore[call-overload]
                decode=True,
                filters={"type": ["container", "network"]},
            )
        if stop.is_set():  # set (then stop_events found no stream) before the line above
            self.stop_events()
        try:
            with translated():
                for ev in self._stream:
                    trigger = self._trigger(ev)
                    if trigger is not None:
                        yield trigger
        finally:
            self._stream = None

    def _trigger(self, ev: dict[str, Any]) -> Trigger | None:
        action = str(ev.get("Action") or ev.get("status") or "").split(":")[0]
        actor = ev.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        when = int(ev.get("timeNano") or time.time_ns())
        if ev.get("Type") == "container" and action in CONTAINER_ACTIONS:
            # Labels never change, and events carry them: skip the unlabelled.
            if self._has_prefix(attrs):
                down = action in DOWN_ACTIONS or (action == "kill" and attrs.get("signal") in SIGKILL)
                gone = action == "destroy"
                stopping = action == "kill" and attrs.get("signal") in STOP_SIGNALS
                return Trigger(
                    actor.get("ID") or ev.get("id"),
                    action,
                    when,
                    down=down or gone,
                    gone=gone,
                    stopping=stopping,
                    started=action in START_ACTIONS,
                    signal=str(attrs.get("signal") or "") if action == "kill" else "",
                )
        elif ev.get("Type") == "network" and action in NETWORK_ACTIONS and attrs.get("container"):
            return Trigger(attrs["container"], f"network {action}", when, network=True)
        return None


_CHUNK = 1 << 16  # bytes read from the engine at a time


def json_items(chunks: Iterable[bytes]) -> Iterator[Any]:
    """The items of a JSON array that arrives in pieces (UTF-8), each
    decoded as soon as it is whole: never the whole array at once. An item
    counts as whole once something follows it (a number cut short would
    otherwise pass for a shorter one). Malformed text raises ValueError."""
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")()
    buf, pos, opened, closed = "", 0, False, False
    for chunk in itertools.chain(chunks, [None]):
        last = chunk is None
        buf = buf[pos:] + text.decode(chunk or b"", final=last)
        pos = 0
        while not closed:
            pos = _skip(buf, pos)
            if pos == len(buf):
                break
            if not opened:
                if buf[pos] != "[":
                    raise ValueError("the engine's answer is not a JSON array")
                opened, pos = True, pos + 1
                continue
            if buf[pos] == "]":
                closed = True
                break
            if buf[pos] == ",":
                pos = _skip(buf, pos + 1)
                if pos == len(buf):
                    break
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if last:
                    raise
                break  # the rest of this item is still to come
            if end == len(buf) and not last:
                break
            yield item
            pos = end
    if not closed or buf[pos + 1 :].strip():
        raise ValueError("the engine's answer ended inside its JSON array")


def _skip(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not JSON whitespace."""
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def network_from_summary(info: dict[str, Any]) -> DockerNetwork:
    subnets: list[IPv4Network | IPv6Network] = []
    gateways: list[IPAddress] = []
    for config in (info.get("IPAM") or {}).get("Config") or []:
        # What Docker's IPAM says is its own; a malformed entry is skipped
        # (it names no address space dockerlb could collide with).
        try:
            subnet = ip_network(config.get("Subnet") or "", strict=False)
        except (ValueError, TypeError):
            continue
        subnets.append(subnet)
        try:
            gateways.append(parse_ip(config.get("Gateway") or ""))
        except (ValueError, TypeError):
            if info.get("Driver") == "bridge" and subnet.num_addresses > 2:
                # Not listed when the network was made with a subnet alone:
                # Docker then gives the bridge the subnet's first address.
                gateways.append(subnet.network_address + 1)
    members: list[IPAddress] = []
    # Only an inspected network lists its containers (the listing's is empty).
    for endpoint in (info.get("Containers") or {}).values():
        for key in ("IPv4Address", "IPv6Address"):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                members.append(parse_ip(str(endpoint.get(key) or "").split("/")[0]))
    return DockerNetwork(
        str(info.get("Name") or info.get("Id") or "?"), tuple(subnets), tuple(gateways), tuple(members)
    )


def container_from_inspect(info: dict[str, Any], prefix: str | None = None) -> Container:
    """A container from its inspect JSON; with ``prefix``, only the labels
    dockerlb reads are kept (``desired.kept_labels``)."""
    state = info.get("State") or {}
    health = (state.get("Health") or {}).get("Status")
    return Container(
        id=info["Id"],
        name=str(info.get("Name") or info["Id"][:12]).lstrip("/"),
        # RFC 3339 in UTC; to the second, as the listing has it (see below).
        created=str(info.get("Created") or "")[:19] + "Z",
        labels=_labels((info.get("Config") or {}).get("Labels") or {}, prefix),
        networks=_networks(info),
        running=bool(state.get("Running")) and not state.get("Paused"),
        health=health or None,
        pid=int(state.get("Pid") or 0),
        started=str(state.get("StartedAt") or ""),
    )


def container_from_summary(info: dict[str, Any], prefix: str | None = None) -> Container:
    """A container from its /containers/json entry (no PID: 0); ``prefix``
    as for ``container_from_inspect``."""
    names = info.get("Names") or []
    created = datetime.fromtimestamp(int(info.get("Created") or 0), UTC)
    return Container(
        id=info["Id"],
        name=_own_name(names, info["Id"]),
        # Seconds since the epoch here, RFC 3339 with nanoseconds in inspect:
        # both are kept to the second, so a container sorts the same way
        # whichever way it was read (ties go by name, see desired.py).
        created=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        labels=_labels(info.get("Labels") or {}, prefix),
        networks=_networks(info),
        running=info.get("State") == "running",
        health=health_from_status(str(info.get("Status") or "")),
    )


def _labels(labels: dict[str, str], prefix: str | None) -> dict[str, str]:
    """All of them, or (``prefix``) only those dockerlb reads: a compose
    service's container carries ~10 more that nothing reads, about half of
    what 10,000 containers hold (bench/rss.py, rss-20261203T201351)."""
    return dict(labels) if prefix is None else kept_labels(labels, prefix)


def _own_name(names: list[str], container_id: str) -> str:
    """The container's own name: legacy links add "/other/alias" names to a
    listing entry, the own one has a single slash."""
    own = next((n for n in names if n.count("/") == 1), names[0] if names else container_id[:12])
    return str(own).lstrip("/")


def _summary_key(info: dict[str, Any]) -> tuple:
    """What of a listing entry a ``Container`` is made from, labels aside.
    Kept for every container between listings: what many containers share
    (states, networks' names, gateways) is interned, and the name is the
    one the record holds (``_listed``), not a second copy."""
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    return (
        _own_name(info.get("Names") or [], info["Id"]),
        info.get("Created"),
        _interned(info.get("State")),
        health_from_status(str(info.get("Status") or "")),
        tuple(
            (
                sys.intern(name),
                n.get("IPAddress"),
                n.get("GlobalIPv6Address"),
                _interned(n.get("Gateway")),
                _interned(n.get("IPv6Gateway")),
            )
            for name, n in networks.items()
        ),
    )


def _interned(text: Any) -> Any:
    return sys.intern(text) if isinstance(text, str) else text


def health_from_status(status: str) -> str | None:
    """The health a listing's status line shows: dockerd writes "Up 2 hours
    (healthy)", "(unhealthy)" or "(health: starting)" for a container with a
    health check, and nothing for one without."""
    if status.endswith("(healthy)"):
        return "healthy"
    if status.endswith("(unhealthy)"):
        return "unhealthy"
    if status.endswith("(health: starting)"):
        return "starting"
    return None


def _networks(info: dict[str, Any]) -> dict[str, NetworkAddress]:
    """Each network's addresses, as inspect and the listing both give them."""
    networks = {}
    for name, net in ((info.get("NetworkSettings") or {}).get("Networks") or {}).items():
        v4, v6 = net.get("IPAddress"), net.get("GlobalIPv6Address")
        gw4, gw6 = net.get("Gateway"), net.get("IPv6Gateway")
        networks[sys.intern(name)] = NetworkAddress(
            _ip4(v4) if v4 else None,
            parse_ip(v6) if v6 else None,  # type: ignore[arg-type]
            _ip4(gw4) if gw4 else None,
            parse_ip(gw6) if gw6 else None,  # type: ignore[arg-type]
        )
    return networks


def _ip4(text: str) -> IPv4Address:
    """An IPv4 address as Docker writes it (dotted quad), parsed in C: the
    ``ipaddress`` module's parser, in Python, was a fifth of a 10,000
    container listing (issue 31). Anything else goes to that parser, which
    says what is wrong with it."""
    try:
        return IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, TypeError):
        return IPv4Address(text)


class translated:
    """Context manager: docker/requests errors -> project errors."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            return
        if isinstance(exc, NotFound):
            raise ContainerGone(str(exc)) from exc
        if isinstance(exc, APIError) and exc.status_code is not None and exc.status_code < 500:
            raise DockerRefused(f"Docker refused: {exc}") from exc
        if isinstance(exc, (APIError, DockerException, requests.RequestException, OSError)):
            raise DockerUnavailable(f"Docker engine unavailable: {exc}") from exc
