"""What the controller does around its loop, once: refuse the host's own
namespace, set IPVS's timeouts, and at the end put back what it changed of
the host (dockerlb/app/controller.py sequences them)."""

from __future__ import annotations

import threading

from loguru import logger

from dockerlb.core.model import DockerNetwork
from dockerlb.core.ports import DirectorPort, DockerPort, IpvsPort
from dockerlb.errors import ConfigError, DockerlbError
from dockerlb.retry import retrying
from dockerlb.settings import Settings


def refuse_host_namespace(
    settings: Settings, docker: DockerPort, director: DirectorPort, stopping: threading.Event
) -> None:
    """Refuse a director that is the Docker host's own namespace (it holds
    a Docker network's gateway: Docker puts its bridges there) unless
    --allow-host-netns says that is meant."""
    if settings.allow_host_netns:
        return
    # Its interfaces' addresses only: every container's default route
    # points at a Docker gateway, so gateways prove nothing.
    own = director.local_addresses()
    networks: list[DockerNetwork] = []
    # Docker may be restarting: wait for it (until stopped), never skip the check.
    for attempt in retrying(settings, until=stopping):
        with attempt:
            networks = docker.networks()
    for network in networks:
        for gateway in network.gateways:
            if gateway in own:
                raise ConfigError(
                    f"the director namespace holds {gateway}, the gateway of Docker network "
                    f"{network.name!r}: it is the Docker host's own namespace, where VIPs, ARP and "
                    "sysctls would change the host itself; run dockerlb in its own namespace "
                    "(see compose/), or pass --allow-host-netns if this is meant"
                )


def set_timeouts(settings: Settings, ipvs: IpvsPort) -> None:
    """IPVS's connection timeouts, when a setting asks for any (said, never fatal)."""
    s = settings
    if s.tcp_timeout or s.tcpfin_timeout or s.udp_timeout:
        try:
            ipvs.set_timeouts(s.tcp_timeout, s.tcpfin_timeout, s.udp_timeout)
        except DockerlbError as e:
            logger.error("IPVS timeouts: {}", e)


def restore_host(settings: Settings, director: DirectorPort) -> None:
    """The loop has ended: what dockerlb changed of the host's own namespace
    put back (only there is IPv6 forwarding the host's setting)."""
    if settings.allow_host_netns:
        try:
            director.restore_forwarding()
        except DockerlbError as e:
            logger.error("IPv6 forwarding: {}", e)
