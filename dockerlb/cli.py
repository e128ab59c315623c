"""Command line: ``dockerlb run | status | plan``. The only place that exits.

Every option is also an environment variable ``DOCKERLB_<OPTION>``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from loguru import logger

from dockerlb import __version__
from dockerlb.controller import Controller, ForcedStop
from dockerlb.director import Director
from dockerlb.docker_source import DockerSource
from dockerlb.errors import DirectorMoved, DockerlbError
from dockerlb.ipvs import IpvsAdapter
from dockerlb.netns import netns_identity, resolve_netns
from dockerlb.render import plan_json, plan_text, status_data, status_text
from dockerlb.settings import Settings

EXIT_FAILURE = 1
EXIT_CHANGES = 2  # `plan`: something would change
EXIT_FORCED = 130

_DEFAULTS = Settings()
_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    (
        "--netns",
        dict(default=_DEFAULTS.netns, help="Director netns: '' (own), NAME, PATH or container:NAME."),
    ),
    ("--label-prefix", dict(default=_DEFAULTS.label_prefix, help="Label prefix.")),
    ("--interface", dict(default=_DEFAULTS.interface, help="Dummy interface carrying the VIPs.")),
    (
        "--masquerade/--no-masquerade",
        dict(
            default=_DEFAULTS.masquerade,
            help="SNAT NAT traffic to the director (clients on the servers' network).",
        ),
    ),
    (
        "--resync-interval",
        dict(default=_DEFAULTS.resync_interval, type=float, help="Seconds between full resyncs."),
    ),
    (
        "--debounce",
        dict(default=_DEFAULTS.debounce, type=float, help="Seconds to gather an event burst."),
    ),
    (
        "--retry-initial",
        dict(default=_DEFAULTS.retry_initial, type=float, help="First retry delay, seconds."),
    ),
    (
        "--retry-max",
        dict(default=_DEFAULTS.retry_max, type=float, help="Longest retry delay, seconds."),
    ),
    (
        "--retry-attempts",
        dict(default=_DEFAULTS.retry_attempts, type=int, help="Attempts per call."),
    ),
    ("--log-level", dict(default=_DEFAULTS.log_level, help="DEBUG, INFO, WARNING, ERROR.")),
    ("--log-format", dict(default=_DEFAULTS.log_format, type=click.Choice(["human", "json"]))),
]


def settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add every Settings option, each with its DOCKERLB_* env var."""
    for flag, kw in reversed(_OPTIONS):
        name = flag.split("/")[0].removeprefix("--").replace("-", "_")
        fn = click.option(flag, name, envvar=f"DOCKERLB_{name.upper()}", show_envvar=True, **kw)(fn)
    return fn


def _settings(opts: dict[str, Any]) -> Settings:
    settings = Settings(**opts)
    logger.remove()
    if settings.log_format == "json":
        logger.add(sys.stderr, level=settings.log_level.upper(), serialize=True)
    else:
        logger.add(
            sys.stderr,
            level=settings.log_level.upper(),
            format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
        )
    return settings


def _open(settings: Settings, docker: DockerSource) -> tuple[Controller, Callable[[], None]]:
    """A controller on the director namespace as it resolves now, and a closer."""
    path = resolve_netns(settings.netns, docker.pid_of)
    opened = netns_identity(path)
    logger.debug("Docker API {}; director namespace {}", docker.api_version, path or "(own)")
    ipvs = IpvsAdapter(path, settings)
    director = Director(path, settings)

    def moved() -> bool:
        try:
            return netns_identity(resolve_netns(settings.netns, docker.pid_of)) != opened
        except (DockerlbError, OSError):
            return False  # e.g. the director is down right now: look again next resync

    def close() -> None:
        ipvs.close()
        director.close()

    return Controller(settings, docker, ipvs, director, director_moved=moved), close


@click.group()
@click.version_option(__version__, prog_name="dockerlb")
def cli() -> None:
    """Docker labels in, Linux IPVS services out."""


@cli.command()
@settings_options
def run(**opts: Any) -> None:
    """Run the controller until SIGINT/SIGTERM (a second signal forces)."""
    settings = _settings(opts)
    try:
        docker = DockerSource(settings)
        while True:
            ctl, close = _open(settings, docker)
            ctl.install_signal_handlers()
            try:
                ctl.run()
                return
            except DirectorMoved as e:
                logger.warning("{}: reopening on the new namespace", e)
            finally:
                close()
    except ForcedStop as e:
        logger.warning("forced stop: {}", e)
        sys.exit(EXIT_FORCED)
    except DockerlbError as e:
        logger.error("{}", e)
        sys.exit(EXIT_FAILURE)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@settings_options
def status(as_json: bool, **opts: Any) -> None:
    """The director's IPVS table with the container behind each real server."""
    settings = _settings(opts)
    try:
        ctl, _ = _open(settings, DockerSource(settings))
        ctl.refresh()
        state, snapshot = ctl.kernel_state()
        names = {
            addr: c.name
            for c in ctl.containers()
            for net in c.networks.values()
            for addr in (net.ipv4, net.ipv6)
            if addr is not None
        }
    except DockerlbError as e:
        logger.error("{}", e)
        sys.exit(EXIT_FAILURE)
    services = status_data(snapshot, state.vips, names)
    click.echo(json.dumps({"services": services}, indent=2) if as_json else status_text(services))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@settings_options
def plan(as_json: bool, **opts: Any) -> None:
    """What `run` would change now, changing nothing. Exit 0: nothing; 2: changes."""
    settings = _settings(opts)
    try:
        ctl, _ = _open(settings, DockerSource(settings))
        ctl.refresh()
        desired, _, ops = ctl.compute()
    except DockerlbError as e:
        logger.error("{}", e)
        sys.exit(EXIT_FAILURE)
    for problem in desired.problems:
        logger.error("{}", problem)
    for warning in desired.warnings:
        logger.warning("{}", warning)
    click.echo(plan_json(ops) if as_json else plan_text(ops))
    sys.exit(EXIT_CHANGES if ops else 0)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
