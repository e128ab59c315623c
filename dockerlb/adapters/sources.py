"""Which Docker port the settings ask for: the local engine's containers, or
a Swarm's tasks (``--swarm``)."""

from __future__ import annotations

from dockerlb.adapters.docker_source import DockerSource
from dockerlb.adapters.swarm_source import SwarmSource
from dockerlb.settings import Settings

Source = DockerSource | SwarmSource


def open_source(settings: Settings) -> Source:
    """The source for these settings, its engine found from the environment
    (DOCKER_HOST and so on): with ``--swarm``, that engine must be a manager's."""
    return SwarmSource(settings) if settings.swarm else DockerSource(settings)
