"""Resolve ``--netns`` to a namespace path (None = the controller's own).

Accepted forms: "" (own; the sidecar case), an ``ip netns`` name, a path
(/proc/PID/ns/net, /run/netns/NAME, /var/run/docker/netns/...), or
``container:NAME`` (that container's namespace, through its PID: the
controller must see the host's PIDs, e.g. ``pid: host``, to open it).

And the one way into another namespace (``entered``, ``open_in``): setns(2)
in the calling thread, and back. A socket belongs for good to the namespace
its thread was in when it was created, so a netlink socket opened inside
keeps working there after the thread has left; pyroute2's own ``netns=``
forks a child per socket for the same thing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from dockerlb.errors import NetnsError, NetnsStuck

T = TypeVar("T")

NETNS_RUN_DIR = "/run/netns"
# This thread's namespace. /proc/self/ns/net is the main thread's, which is
# not this one's while either of them is inside another namespace.
THREAD_NETNS = "/proc/thread-self/ns/net"
CLONE_NEWNET = 0x40000000  # <sched.h>; as setns's nstype, refuses anything but a network namespace
# The libc this process already has loaded (ctypes.util.find_library would run ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def netns_identity(path: str | None) -> tuple[str, int, int]:
    """What tells two namespaces apart: the path and the namespace file's
    (device, inode). The inode alone is not enough: a freed namespace's
    inode number is reused by the next one."""
    path = path or "/proc/self/ns/net"
    st = os.stat(path)
    return (path, st.st_dev, st.st_ino)


def resolve_netns(spec: str, pid_of: Callable[[str], int]) -> str | None:
    spec = spec.strip()
    if spec in ("", "self", "own"):
        return None
    if spec.startswith("container:"):
        name = spec.removeprefix("container:")
        pid = pid_of(name)
        if pid <= 0:
            raise NetnsError(f"--netns {spec}: container {name!r} is not running")
        path = f"/proc/{pid}/ns/net"
        if not os.path.exists(path):
            raise NetnsError(
                f"--netns {spec}: {path} is not visible; the controller needs the host's PID "
                "namespace (pid: host) to enter another container's network namespace"
            )
        return path
    path = spec if "/" in spec else os.path.join(NETNS_RUN_DIR, spec)
    if not os.path.exists(path):
        raise NetnsError(f"--netns {spec}: no such network namespace ({path})")
    return path


def open_in(path: str | None, factory: Callable[[], T]) -> T:
    """What ``factory`` opens (e.g. ``IPRoute``) in the network namespace at
    ``path`` (None: the controller's own), opened from this thread, no fork.

    pyroute2 opens a socket per thread, lazily: an object opened here must be
    used by this thread only, or another thread gets a socket in its own
    namespace. And what pyroute2 does itself instead of asking the kernel
    (creating tuntap links, RTM_NEWPROBE) runs where the calling thread is:
    dockerlb asks for neither."""
    with entered(path):
        return factory()


@contextlib.contextmanager
def entered(path: str | None) -> Iterator[None]:
    """Run the block in the network namespace at ``path`` (None: stay), in
    this thread only, and come back to where the thread was, whatever the
    block raised.

    No lock: setns(CLONE_NEWNET) moves the calling thread alone, and each
    thread keeps its own way back, so threads entering different namespaces
    at once do not meet."""
    if path is None:
        yield
        return
    back = _open(THREAD_NETNS, "cannot keep the way back to this thread's network namespace")
    try:
        there = _open(path, f"cannot open the network namespace {path}")
        try:
            _setns(there, f"cannot enter the network namespace {path}")
        finally:
            os.close(there)
        try:
            yield
        finally:
            try:
                _setns(back, f"thread {threading.current_thread().name!r} cannot leave {path}")
            except NetnsError as e:
                raise NetnsStuck(f"{e}; anything it ran next would run there") from e
    finally:
        os.close(back)


def _open(path: str, why: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError as e:
        # ptrace's access rule: a process holding a capability we lack is
        # ours to open only with CAP_SYS_PTRACE (docs/trust.md).
        raise NetnsError(
            f"{why}: {e} (its process holds capabilities the controller lacks: drop the container's "
            "(cap_drop: [ALL]), or give the controller SYS_PTRACE)"
        ) from e
    except OSError as e:  # gone (its container stopped), or not ours to open
        raise NetnsError(f"{why}: {e}") from e


def _setns(fd: int, why: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) == -1:
        err = ctypes.get_errno()
        raise NetnsError(f"{why}: {os.strerror(err)}") from OSError(err, os.strerror(err))
