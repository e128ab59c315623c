"""What the running kernel has, asked of the kernel itself (/proc, /sys),
never of dockerlb: tests that behave differently on a kernel with or without
a feature branch on these, so each branch runs where its kernel is."""

from __future__ import annotations

import subprocess
from pathlib import Path


def has_ipvs() -> bool:
    """IPVS built in, or a module that loads: then /proc/net/ip_vs exists."""
    subprocess.run(["modprobe", "-q", "ip_vs"], check=False, capture_output=True)
    return Path("/proc/net/ip_vs").exists()


def has_ipip() -> bool:
    """The ipip driver is present: then every network namespace has a tunl0."""
    subprocess.run(["modprobe", "-q", "ipip"], check=False, capture_output=True)
    return Path("/sys/class/net/tunl0").exists()
