"""The IPVS adapter: the only door to the kernel's IPVS table (generic netlink).

Model records go in and come out; netlink messages and errors never leave
this module. One socket, opened by pyroute2 in the director's namespace
(from this thread: ``netns.open_in``);
services and real servers are read and written with the messages of
ipvs_wire (batched writes), the CONFIG commands through pyroute2.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import gzip
import os
import re
import select
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger
from pyroute2 import IPVS
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.ipvs import GENL_VERSION, IPVS_CMD_GET_CONFIG, IPVS_CMD_SET_CONFIG, ipvsmsg

from dockerlb.adapters.ipvs_text import TextTable, Unreadable, persistent
from dockerlb.adapters.ipvs_wire import (
    DestReader,
    daemon_of,
    daemon_start,
    daemon_stop,
    daemons_request,
    dump_request,
    encode,
    service_of,
)
from dockerlb.adapters.netlink_wire import HEADER, NLM_F_ACK, NLM_F_REQUEST, DumpFailed, dump_parts, errors_in
from dockerlb.adapters.netns import entered, open_in
from dockerlb.core.model import (
    SCHEDULERS,
    IPAddress,
    ServerStats,
    Service,
    ServiceKey,
    Snapshot,
    VirtualService,
)
from dockerlb.core.plan import REMOVE, Write
from dockerlb.core.sync import SyncDaemon
from dockerlb.errors import (
    DockerlbError,
    IpvsBusy,
    IpvsExists,
    IpvsNotFound,
    IpvsRejected,
    IpvsUnavailable,
    NetnsError,
)
from dockerlb.retry import retrying
from dockerlb.settings import Settings

T = TypeVar("T")

_TIMEOUTS = ("TCP", "TCP_FIN", "UDP")
_BUSY = {errno.EAGAIN, errno.ENOBUFS, errno.EINTR, errno.EBUSY}
# Writes per send: their failure answers (each carries its message back)
# must fit the socket's receive buffer, which pyroute2 sets to 1 MiB.
BATCH = 500
ANSWER_WAIT = 30.0  # seconds
_FIRST_SEQ = 1 << 30  # far above pyroute2's own sequence numbers


class IpvsAdapter:
    def __init__(self, netns_path: str | None, settings: Settings) -> None:
        self._settings = settings
        refused = None
        try:
            self._sock = open_in(netns_path, IPVS)
        except NetlinkError as e:
            refused = e.code
        except (NetnsError, OSError) as e:
            raise IpvsUnavailable(f"cannot open IPVS in namespace {netns_path}: {e}") from e
        if refused is not None:
            # Outside the except block, so nothing holds the failed socket:
            # pyroute2 leaves its event loop to the garbage collector, which
            # at interpreter exit found the loop's pipe already closed and
            # printed a traceback after dockerlb's own error. Collect it now.
            gc.collect()
            raise IpvsUnavailable(f"no IPVS in this kernel (netlink errno {refused}): {missing_ipvs_fix()}")
        # Reads and writes share pyroute2's socket (its namespace, its family)
        # through a second handle on it, used only while pyroute2 is not
        # reading (it reads only inside its own calls: the CONFIG commands).
        self._raw = socket.socket(fileno=os.dup(self._sock.fileno()))
        # poll, not select: select cannot watch a descriptor numbered past 1024.
        self._answers = select.poll()
        self._answers.register(self._raw, select.POLLIN)
        self._next_seq = _FIRST_SEQ
        self.servers = DestReader()  # learns the kernel's reply layout on the first read
        # The whole table is read from /proc/net/ip_vs (ipvs_text.py), opened
        # here, in the namespace: the open file stays its namespace's.
        self._text: TextTable | None = TextTable()
        self._hz: int | None = None  # the kernel's HZ, learned when a persistent service shows it
        try:
            with entered(netns_path):
                self._text_fd = os.open("/proc/thread-self/net/ip_vs", os.O_RDONLY | os.O_CLOEXEC)
        except (NetnsError, OSError):
            self._text, self._text_fd = None, -1
        self.text_reads = self.netlink_reads = 0  # whole reads each way (the benchmarks say)
        # The text writes no connection thresholds (issue 32): the services
        # whose servers may have some are read by netlink after it. Known
        # from a first whole read by netlink, from every netlink read since,
        # and from the writes this adapter sends.
        self._whole_by_netlink = False
        self._thresholded: set[ServiceKey] = set()

    def close(self) -> None:
        if self._text_fd >= 0:
            os.close(self._text_fd)
            self._text_fd = -1
        self._raw.close()
        self._sock.close()

    # -- reading -----------------------------------------------------------
    def read(self, counters: bool = True, keys: Iterable[ServiceKey] | None = None) -> Snapshot:
        """Every service with its real servers: one dump of the services, then
        one of each service's servers (a socket runs one dump at a time).
        With ``keys``, only those services (those the kernel has), after the
        same dump of the services: a drain looks at its own services' servers
        alone, not at 10,000. The connection gauges always; the counters (for
        status and metrics) only if ``counters``: a reconcile needs none, and
        they are most of the reading. One retry for the whole read (a busy
        kernel reads it all again), not one per dump (1,001 retry objects per
        read at 1,000 services). A whole read without counters, after the
        adapter's first, is /proc/net/ip_vs instead (``_read_text``)."""
        wanted = None if keys is None else set(keys)
        if wanted is None and not counters and self._text is not None and self._whole_by_netlink:
            try:
                return self._read_text()
            except (OSError, Unreadable) as e:
                # Never seen; netlink can read anything the kernel has.
                logger.debug("reading /proc/net/ip_vs failed ({}); reading by netlink", e)
        self.netlink_reads += wanted is None
        snapshot = self._call(lambda: self._read(counters, wanted))
        self._note_thresholds(snapshot.table, snapshot.table.keys() if wanted is None else wanted)
        self._whole_by_netlink |= wanted is None
        return snapshot

    def _read_text(self) -> Snapshot:
        """The whole table from /proc/net/ip_vs: a few hundred reads, not
        1 + 1,000 dumps (ipvs_text.py). Its connection gauges; no counters.
        The services whose servers may have connection thresholds, which
        the text does not write, are read again by netlink."""
        assert self._text is not None
        text = self._text_of()
        if self._hz is None and b" persistent " in text:
            self._hz = self._learn_hz(text)
        table, stats = self._text.parse(text, self._hz)
        self.text_reads += 1
        again = self._thresholded & table.keys()
        if again:
            exact = self._call(lambda: self._read(False, again))
            for key in again:
                table.pop(key, None)  # gone since the text was read, if netlink has none
            table.update(exact.table)
            stats = {k: v for k, v in stats.items() if k[0] not in again} | exact.stats
            self._note_thresholds(exact.table, again)
        return Snapshot(table, stats)

    def _note_thresholds(
        self, table: Mapping[ServiceKey, VirtualService], read: Iterable[ServiceKey]
    ) -> None:
        """Which of the services just read by netlink have a server with thresholds."""
        for key in read:
            vs = table.get(key)
            if vs is not None and any(s.upper_threshold or s.lower_threshold for s in vs.servers.values()):
                self._thresholded.add(key)
            else:
                self._thresholded.discard(key)

    def _text_of(self) -> bytes:
        chunks, offset = [], 0
        while data := os.pread(self._text_fd, 1 << 20, offset):  # one record or more a read
            chunks.append(data)
            offset += len(data)
        return b"".join(chunks)

    def _learn_hz(self, text: bytes) -> int | None:
        """The kernel's HZ: a persistent service's timeout as the text writes
        it (jiffies) over what netlink says (seconds)."""
        seconds = {s.key: s.persistence for s in self._call(self._service_list) if s.persistence}
        for shown in persistent(text):
            secs = seconds.get(shown.key)
            if secs and shown.jiffies % secs == 0:
                return shown.jiffies // secs
        return None

    def _service_list(self) -> list[Service]:
        found = (service_of(payload, False) for payload in self._dump(None))
        return [f[0] for f in found if f is not None]

    def services(self) -> frozenset[ServiceKey]:
        """The services in the namespace, without their servers (one dump)."""

        def read() -> frozenset[ServiceKey]:
            found = (service_of(payload, False) for payload in self._dump(None))
            return frozenset(f[0].key for f in found if f is not None)

        return self._call(read)

    def _read(self, counters: bool, wanted: set[ServiceKey] | None) -> Snapshot:
        table: dict[ServiceKey, VirtualService] = {}
        stats: dict[tuple[ServiceKey, tuple[IPAddress, int]], ServerStats] = {}
        service_stats: dict[ServiceKey, ServerStats] = {}
        for payload in self._dump(None):
            found = service_of(payload, counters)
            if found is None:
                continue  # fwmark services have no VIP; never ours, nothing to show
            if wanted is not None and found[0].key not in wanted:
                continue
            service, service_stats[service.key] = found
            key = service.key
            servers = []
            # A service removed since the first dump answers with no server.
            for dpayload in self._dump(key):
                server, stats[(key, server.ident)] = self.servers.read(dpayload, key.vip.version, counters)
                servers.append(server)
            table[key] = VirtualService.of(service, servers)
        return Snapshot(table, stats, service_stats)

    def _dump(self, key: ServiceKey | None) -> list[bytes]:
        return self._dump_parts(lambda seq: dump_request(self._sock.prid, seq, key))

    def _dump_parts(self, request: Callable[[int], bytes]) -> list[bytes]:
        seq = self._take(1)
        self._send(request(seq))
        try:
            return dump_parts(self._receive, seq)
        except DumpFailed as e:
            raise NetlinkError(e.code) from e

    # -- connection-sync daemons (a director pair, issue 17) -----------------
    def daemons(self) -> frozenset[SyncDaemon]:
        """The sync daemons running in the namespace."""

        def read() -> frozenset[SyncDaemon]:
            parts = self._dump_parts(lambda seq: daemons_request(self._sock.prid, seq))
            return frozenset(d for p in parts if (d := daemon_of(p)) is not None)

        return self._call(read)

    def start_daemon(self, daemon: SyncDaemon) -> None:
        self._call(lambda: self._acked(daemon_start(self._sock.prid, self._take(1), daemon)))

    def stop_daemon(self, state: str) -> None:
        self._call(lambda: self._acked(daemon_stop(self._sock.prid, self._take(1), state)))

    def _acked(self, message: bytes) -> None:
        """Send one acknowledged request; its error raised."""
        seq = HEADER.unpack_from(message)[3]
        self._send(message)
        while True:
            for s, code in errors_in(self._receive()):
                if s == seq:
                    if code:
                        raise NetlinkError(code)
                    return

    # -- connection timeouts (ipvsadm --set) ---------------------------------
    def timeouts(self) -> tuple[int, int, int]:
        """The namespace's (tcp, tcpfin, udp) connection timeouts, seconds."""
        (reply,) = self._call(lambda: self._config(IPVS_CMD_GET_CONFIG, NLM_F_REQUEST))
        return tuple(_u32_of(reply.get_attr(f"IPVS_CMD_ATTR_TIMEOUT_{n}")) for n in _TIMEOUTS)  # type: ignore[return-value]

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        """Set them (0 leaves one as it is, as with ipvsadm --set)."""
        self._call(lambda: self._config(IPVS_CMD_SET_CONFIG, NLM_F_REQUEST | NLM_F_ACK, (tcp, tcpfin, udp)))

    def _config(self, cmd: int, flags: int, values: tuple[int, int, int] | None = None) -> list[Any]:
        # pyroute2's IPVS class has no call for the CONFIG commands: send the
        # message through its socket the way its own service() does. It types
        # the timeout attributes as raw bytes; the kernel reads u32s.
        msg = ipvsmsg()
        msg["cmd"] = cmd
        msg["version"] = GENL_VERSION
        if values is not None:
            msg["attrs"] = [
                (f"IPVS_CMD_ATTR_TIMEOUT_{n}", struct.pack("=I", v))
                for n, v in zip(_TIMEOUTS, values, strict=True)
            ]
        sock = self._sock
        return list(sock._run_with_cleanup(sock.asyncore._do_request, msg, flags))

    # -- writing -----------------------------------------------------------
    def write(self, write: Write) -> None:
        """One write alone, its failure raised; a busy kernel is retried."""
        # A service made or changed with an unknown scheduler comes back as
        # ENOENT: say which (a removal's ENOENT means it is already gone).
        service_set = write.server is None and write.verb != REMOVE
        named = _scheduler_named(write.service) if service_set else contextlib.nullcontext()

        def once() -> None:
            (error,) = self._write([write], self._send)  # the send not retried here: once() is
            if error is not None:
                raise error

        with named:
            self._call(once)  # one retry layer for the whole write (issue 16: no nested retries)

    def write_all(self, writes: Sequence[Write]) -> list[DockerlbError | None]:
        """Apply writes in order, BATCH messages per send; one result per
        write: None when done, else the project's error for it.

        The kernel handles every message of a send, in order, before the
        send returns, and a failed one does not stop the next (the caller
        decides what a failure means: EEXIST on an add may be fine). Only
        failures answer, and the last message of each batch, whose ack
        says the batch is through. A busy send is retried (the only retry)."""
        return self._write(writes, lambda data: self._call(lambda: self._send(data)))

    def _write(self, writes: Sequence[Write], send: Callable[[bytes], None]) -> list[DockerlbError | None]:
        results: list[DockerlbError | None] = [None] * len(writes)
        for w in writes:
            if (
                w.server is not None
                and w.verb != REMOVE
                and (w.server.upper_threshold or w.server.lower_threshold)
            ):
                self._thresholded.add(w.service.key)  # whole reads read it by netlink (see read)
        for start in range(0, len(writes), BATCH):
            chunk = writes[start : start + BATCH]
            first = self._take(len(chunk))
            last = first + len(chunk) - 1
            data = b"".join(
                encode(
                    w, self._sock.prid, first + i, 0, NLM_F_REQUEST | (NLM_F_ACK if first + i == last else 0)
                )
                for i, w in enumerate(chunk)
            )
            send(data)
            for seq, code in self._answers_to(first, last):
                if code:
                    results[start + seq - first] = _translate(NetlinkError(code))
        return results

    def _answers_to(self, first: int, last: int) -> list[tuple[int, int]]:
        answers = []
        while True:
            for seq, code in errors_in(self._receive()):
                if first <= seq <= last:  # anything else is left over from an earlier request
                    answers.append((seq, code))
                    if seq == last:
                        return answers

    def _take(self, n: int) -> int:
        """The first of n consecutive sequence numbers (a u32), starting
        over before they would wrap: a controller runs for years."""
        if self._next_seq + n > 0xFFFFFFFF:
            self._next_seq = _FIRST_SEQ
        first, self._next_seq = self._next_seq, self._next_seq + n
        return first

    def _send(self, data: bytes) -> None:
        try:
            self._raw.send(data)
        except OSError as e:
            raise NetlinkError(e.errno or errno.EIO) from e

    def _receive(self) -> bytes:
        # The kernel has answered before send returned (or, for a dump's next
        # part, during the last receive): taken at once, one system call; the
        # wait is a safeguard (a poll before every receive was a third of a
        # read's system calls, and they are what a read costs in UML).
        with contextlib.suppress(BlockingIOError):
            return self._raw.recv(1 << 16, socket.MSG_DONTWAIT)
        if not self._answers.poll(ANSWER_WAIT * 1000):
            raise IpvsRejected(f"IPVS did not answer within {ANSWER_WAIT:.0f} s")
        # A dump part is sized to what the reader asks for, up to 32 KiB.
        return self._raw.recv(1 << 16)

    def _call(self, fn: Callable[[], T]) -> T:
        for attempt in retrying(self._settings):
            with attempt:
                try:
                    return fn()
                except NetlinkError as e:
                    raise _translate(e) from e
        raise AssertionError("unreachable: tenacity reraises")


def missing_ipvs_fix() -> str:
    """What to do when the kernel's IPVS netlink family does not answer."""
    release = os.uname().release
    if "# CONFIG_IP_VS is not set" in _kernel_config(release):
        return (
            f"kernel {release} is built without IPVS (CONFIG_IP_VS is not set); boot a kernel that has "
            "it, e.g. Debian's linux-image-amd64, or run dockerlb on a host that does"
        )
    return "load the module on the host: modprobe ip_vs (a container cannot load kernel modules)"


@contextlib.contextmanager
def _scheduler_named(service: Service):
    """ENOENT on a service's creation or change means its scheduler is not in
    this kernel: say which ones it has."""
    try:
        yield
    except IpvsNotFound as e:
        have = available_schedulers()
        listed = ", ".join(sorted(have)) if have else "none found in /lib/modules or /proc/modules"
        raise IpvsRejected(
            f"scheduler {service.scheduler!r} is not in this kernel (it has: {listed}); "
            "pick one of those in dockerlb.scheduler"
        ) from e


def available_schedulers(release: str | None = None) -> frozenset[str]:
    """The IPVS schedulers this kernel has: built in, as modules, or loaded.

    A container sees no /lib/modules, only /proc/modules (the loaded ones); a
    kernel with everything built in and no modules tree (a User-Mode Linux
    kernel, say) tells through its config."""
    release = release or os.uname().release
    text = ""
    for path in (
        f"/lib/modules/{release}/modules.dep",
        f"/lib/modules/{release}/modules.builtin",
        "/proc/modules",
    ):
        with contextlib.suppress(OSError):
            text += Path(path).read_text() + "\n"
    return schedulers_in(text) | schedulers_configured(_kernel_config(release))


def schedulers_in(text: str) -> frozenset[str]:
    """Scheduler names in modules.dep / modules.builtin / /proc/modules text."""
    found = set(re.findall(r"(?:^|/)ip_vs_([a-z]+)(?:\.ko|\s)", text, re.M))
    return frozenset(found & SCHEDULERS)


def schedulers_configured(config: str) -> frozenset[str]:
    """Scheduler names a kernel config builds in or as modules (CONFIG_IP_VS_RR=y)."""
    found = {name.lower() for name in re.findall(r"^CONFIG_IP_VS_([A-Z]+)=[ym]$", config, re.M)}
    return frozenset(found & SCHEDULERS)


def _kernel_config(release: str) -> str:
    with contextlib.suppress(OSError), gzip.open("/proc/config.gz", "rt") as f:
        return f.read()
    with contextlib.suppress(OSError):
        return Path(f"/boot/config-{release}").read_text()
    return ""


def _translate(e: NetlinkError) -> DockerlbError:
    name = errno.errorcode.get(e.code, str(e.code))
    if e.code == errno.EEXIST:
        return IpvsExists(f"IPVS: already exists ({name})")
    if e.code in (errno.ENOENT, errno.ESRCH):
        return IpvsNotFound(f"IPVS: not found ({name}; for a new service: is the scheduler available?)")
    if e.code in _BUSY:
        return IpvsBusy(f"IPVS busy ({name})")
    if e.code == errno.EPERM:
        return IpvsRejected("IPVS: operation not permitted (the controller needs CAP_NET_ADMIN)")
    return IpvsRejected(f"IPVS rejected the request ({name}: {e})")


def _u32_of(value: Any) -> int:
    """A timeout attribute as pyroute2 decodes it ("84:03:00:00") -> int."""
    if isinstance(value, str):
        value = bytes.fromhex(value.replace(":", ""))
    return struct.unpack("=I", value)[0] if value else 0
