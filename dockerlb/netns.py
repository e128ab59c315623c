"""Resolve ``--netns`` to a namespace path (None = the controller's own).

Accepted forms: "" (own; the sidecar case), an ``ip netns`` name, a path
(/proc/PID/ns/net, /run/netns/NAME, /var/run/docker/netns/...), or
``container:NAME`` (that container's namespace, through its PID: the
controller must see the host's PIDs, e.g. ``pid: host``, to open it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from dockerlb.errors import NetnsError

NETNS_RUN_DIR = "/run/netns"


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
