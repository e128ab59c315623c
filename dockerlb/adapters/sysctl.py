"""Sysctls of another network namespace, shared by the adapters that need them.

/proc/sys/net shows the namespace of the thread that opens it, so the thread
enters the namespace (``netns.entered``) for the open: a netns socket is not enough.

In a container /proc/sys is mounted read-only. A procfs of the controller's
own (``OWN_PROC``; mounting it needs CAP_SYS_ADMIN, which entering other
namespaces needs anyway) is writable: the first write refused as read-only
mounts it, and every later read and write goes there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator

from loguru import logger

from dockerlb.adapters import netns
from dockerlb.errors import NetnsError

OWN_PROC = "/run/dockerlb/proc"
_proc = ["/proc"]  # where /proc/sys is read and written now


class SysctlError(OSError):
    """A sysctl could not be read or written; the message says which and where."""


@contextlib.contextmanager
def entered(netns_path: str | None) -> Iterator[None]:
    """Run the block in the namespace at ``netns_path`` (None: stay); this thread only."""
    way_in = contextlib.ExitStack()
    try:
        way_in.enter_context(netns.entered(netns_path))
    except NetnsError as e:  # the namespace is gone (its container stopped)
        raise SysctlError(str(e)) from e
    with way_in:
        yield


def read(netns_path: str | None, name: str) -> str:
    with entered(netns_path), open(sysctl_path(name)) as f:
        return f.read().strip()


def write(netns_path: str | None, name: str, value: str) -> bool:
    """Set ``name`` unless it already has ``value``; True when it was changed.

    Reading first matters: a value already set by `docker run --sysctl` is
    enough, even where no procfs can be written.
    """
    with entered(netns_path):
        if read(None, name) == value:
            return False
        try:
            _write(name, value)
        except OSError as e:
            if e.errno != errno.EROFS or not _mount_own_proc():
                raise
            _write(name, value)
    return True


def _write(name: str, value: str) -> None:
    with open(sysctl_path(name), "w") as f:
        f.write(value)


def _mount_own_proc() -> bool:
    """Switch to a procfs of our own; False when that is not possible here."""
    if _proc[0] == OWN_PROC:
        return False
    try:
        os.makedirs(OWN_PROC, exist_ok=True)
    except OSError as e:
        logger.warning(
            "/proc/sys is read-only and a procfs of our own cannot be mounted: {} (a read-only "
            "container needs a tmpfs on /run: compose tmpfs: [/run])",
            e,
        )
        return False
    done = subprocess.run(["mount", "-t", "proc", "proc", OWN_PROC], capture_output=True, text=True)
    if done.returncode != 0:
        logger.warning(
            "/proc/sys is read-only and a procfs of our own cannot be mounted: {}", done.stderr.strip()
        )
        return False
    logger.info("/proc/sys is read-only here: sysctls go through {} from now on", OWN_PROC)
    _proc[0] = OWN_PROC
    return True


def sysctl_path(name: str) -> str:
    """``net.ipv4.ip_forward`` -> ``/proc/sys/net/ipv4/ip_forward`` (or under OWN_PROC)."""
    return f"{_proc[0]}/sys/" + name.replace(".", "/")
