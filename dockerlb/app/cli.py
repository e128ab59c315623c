"""Command line: ``dockerlb run | status | plan | drain wait | doctor | healthz``. The only place that exits.

Every option is also an environment variable ``DOCKERLB_<OPTION>``.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
from loguru import logger

from dockerlb import __version__
from dockerlb.adapters.announce import BirdSpeaker, RouteTable
from dockerlb.adapters.director import Director
from dockerlb.adapters.drain_feed import DrainFeed, drains_in, read_feed
from dockerlb.adapters.health import HealthChecker
from dockerlb.adapters.healthz import ask_healthz
from dockerlb.adapters.ipvs import IpvsAdapter
from dockerlb.adapters.metrics import ControllerMetrics, MetricsServer, TableCollector, TableView
from dockerlb.adapters.netns import netns_identity, resolve_netns
from dockerlb.adapters.realserver import RealServerNetns
from dockerlb.adapters.sources import Source, open_source
from dockerlb.app import pair as director_pair
from dockerlb.app.controller import Controller
from dockerlb.app.doctor import run_checks
from dockerlb.app.loop import ForcedStop, Loop
from dockerlb.app.server_prep import ServerPreparer
from dockerlb.core.lifecycle import holding
from dockerlb.core.model import Container, IPAddress, checks_pass
from dockerlb.core.render import (
    announce_data,
    announce_text,
    backends,
    doctor_json,
    doctor_text,
    minimums,
    pair_data,
    pair_text,
    plan_json,
    plan_text,
    status_data,
    status_table,
    status_text,
)
from dockerlb.errors import DirectorMoved, DockerlbError
from dockerlb.settings import Settings

if TYPE_CHECKING:  # rich is imported by `status` alone: `run` never draws (issue 16's memory)
    from rich.console import Console

EXIT_FAILURE = 1
EXIT_CHANGES = 2  # `plan`: something would change
EXIT_FORCED = 130

_DEFAULTS = Settings()


def _field(flag: str) -> str:
    """``--retry-max`` / ``--masquerade/--no-masquerade`` -> the Settings field."""
    return flag.split("/")[0].removeprefix("--").replace("-", "_")


def _opt(flag: str, help: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    """One Settings field as an option: its default, and its type, come from Settings."""
    default = getattr(_DEFAULTS, _field(flag))
    if isinstance(default, int | float) and not isinstance(default, bool):
        kw.setdefault("type", type(default))
    return flag, dict(default=default, help=help, **kw)


_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    _opt("--netns", "Director netns: '' (own), NAME, PATH or container:NAME."),
    _opt("--label-prefix", "Label prefix."),
    _opt("--interface", "Dummy interface carrying the VIPs."),
    _opt(
        "--masquerade/--no-masquerade",
        "NAT services without a dockerlb.masquerade label: SNAT to the director (on), "
        "or keep the client's address by routing the servers' replies via the director (off).",
    ),
    _opt("--drain-timeout", "Longest a stopping or unhealthy server keeps weight 0 before removal, seconds."),
    _opt(
        "--vip-cidr",
        "Allowed VIP range (CIDR), repeatable; none: the private ranges (10/8, 172.16/12, 192.168/16, "
        "100.64/10, fc00::/7). Never inside Docker's networks. Env: space-separated.",
        multiple=True,
    ),
    _opt(
        "--vip-owner",
        "CIDR=GROUP, repeatable: VIPs in the range belong to that group (compose project, Swarm stack, "
        "dockerlb.owner) alone, shared or not. Env: space-separated.",
        multiple=True,
    ),
    _opt("--owner-grace", "Seconds a VIP:port stays its group's after the group's last claimant is removed."),
    _opt(
        "--share-vips",
        "Let containers of different groups (compose projects, dockerlb.owner) join one VIP:port.",
        is_flag=True,
    ),
    _opt(
        "--allow-host-netns",
        "Allow the director to be the Docker host's own network namespace (VIPs and sysctls on the host).",
        is_flag=True,
    ),
    _opt("--max-labels", "Most labels under the prefix a container may have."),
    _opt("--max-label-chars", "Longest label name or value a container may have."),
    _opt("--max-groups", "Most named label groups per container."),
    _opt("--max-vips", "Most VIPs per container."),
    _opt(
        "--max-probes",
        "Most health-check probes in flight at once (a socket each; at most 4 per container); "
        "more wait for a slot.",
        type=click.IntRange(min=1),
    ),
    _opt("--tcp-timeout", "IPVS TCP timeout, seconds (0: the kernel's)."),
    _opt("--tcpfin-timeout", "IPVS TCP FIN timeout, seconds (0: the kernel's)."),
    _opt("--udp-timeout", "IPVS UDP timeout, seconds (0: the kernel's)."),
    _opt("--conn-reuse-mode", "net.ipv4.vs.conn_reuse_mode (see docs/operating.md)."),
    _opt(
        "--sync-interface",
        "Run the kernel's IPVS connection-sync daemons (master and backup) on this interface of the "
        "director, for a director pair ('' = off).",
    ),
    _opt(
        "--sync-network",
        "Or the Docker network the sync interface is on: the director's interface with an address in "
        "its subnet, found again on every full pass ('' = off; not with --sync-interface).",
    ),
    _opt("--sync-id", "The pair's sync id (0-255), the same in both directors.", type=click.IntRange(0, 255)),
    _opt(
        "--sync-peer",
        "Address the director takes sync packets from (an nft rule), repeatable; none: with "
        "--sync-network, the other containers on it; else anyone. Env: space-separated.",
        multiple=True,
    ),
    _opt(
        "--floating-dip",
        "The pair's floating inside address (moved by keepalived): NAT SNATs to it instead of "
        "masquerading, routed NAT routes via it ('' = none).",
    ),
    _opt(
        "--swarm",
        "Real servers are the running tasks of Swarm services labelled dockerlb.* (the service's "
        "labels), read from the manager DOCKER_HOST names, not local containers.",
        is_flag=True,
    ),
    _opt("--swarm-poll", "Seconds between task listings in Swarm mode (Docker sends no task events)."),
    _opt(
        "--announce",
        "Keep each VIP with enough serving real servers (dockerlb.announce_min) as a route in "
        "--announce-table, for a BGP speaker in the director's namespace to advertise.",
        is_flag=True,
    ),
    _opt(
        "--announce-table",
        "The routing table dockerlb keeps announced VIPs in (not 253-255: default, main, local).",
        type=click.IntRange(1, 252),
    ),
    _opt(
        "--announce-proto",
        "The announced routes' proto (marks them as dockerlb's).",
        type=click.IntRange(5, 254),
    ),
    _opt(
        "--announce-metric",
        "The announced routes' metric (the speaker maps it to MED: lower wins; equal everywhere: ECMP).",
        type=click.IntRange(0, 4294967295),
    ),
    _opt("--announce-settle", "Seconds between withdrawing every VIP and stopping, on a graceful stop."),
    _opt("--speaker-socket", "The BGP speaker's (BIRD's) control socket, for status, doctor and the log."),
    _opt("--resync-interval", "Seconds between full resyncs."),
    _opt(
        "--relist-every",
        "A periodic resync lists Docker's containers every Nth time (1: each time); between, the event "
        "stream keeps them.",
        type=click.IntRange(1),
    ),
    _opt("--debounce", "Seconds to gather an event burst."),
    _opt("--retry-initial", "First retry delay, seconds."),
    _opt("--retry-max", "Longest retry delay, seconds."),
    _opt("--retry-attempts", "Attempts per call."),
    _opt(
        "--metrics-listen",
        "HOST:PORT serving Prometheus /metrics and /healthz, e.g. 127.0.0.1:9469 ('' = off). No auth.",
    ),
    _opt(
        "--metrics-all-services",
        'List every IPVS service in /metrics, not only dockerlb\'s own (managed="false").',
        is_flag=True,
    ),
    _opt("--log-level", "DEBUG, INFO, WARNING, ERROR."),
    _opt("--log-format", "human or json.", type=click.Choice(["human", "json"])),
]


def settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add every Settings option, each with its DOCKERLB_* env var."""
    for flag, kw in reversed(_OPTIONS):
        name = _field(flag)
        fn = click.option(flag, name, envvar=f"DOCKERLB_{name.upper()}", show_envvar=True, **kw)(fn)
    return fn


def _settings(opts: dict[str, Any]) -> Settings:
    settings = Settings(**opts)
    logger.remove()
    if settings.log_format == "json":
        # diagnose=False: a traceback never prints variables' values (a
        # label's value could be anything, of any length).
        logger.add(sys.stderr, level=settings.log_level.upper(), serialize=True, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=settings.log_level.upper(),
            diagnose=False,
            format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
        )
    return settings


@dataclass(frozen=True)
class Opened:
    """A controller on the director namespace as it resolved when opened."""

    ctl: Controller
    path: str | None  # the namespace path; None = the controller's own
    close: Callable[[], None]


def _open(settings: Settings, docker: Source, metrics: ControllerMetrics | None = None) -> Opened:
    """A controller on the director namespace as it resolves now."""
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

    health = HealthChecker(path, settings.max_probes)
    routes = RouteTable(path, settings) if settings.announce else None

    def close() -> None:
        health.close()
        ipvs.close()
        director.close()
        if routes is not None:
            routes.close()

    preparer = ServerPreparer(RealServerNetns(), director, settings.masquerade, settings.label_prefix)
    ctl = Controller(
        settings,
        docker,
        ipvs,
        director,
        director_moved=moved,
        metrics=metrics,
        preparer=preparer,
        health=health,
        announcer=routes,
        speaker=BirdSpeaker(settings.speaker_socket),
    )
    return Opened(ctl, path, close)


@click.group()
@click.version_option(__version__, prog_name="dockerlb")
def cli() -> None:
    """Docker labels in, Linux IPVS services out."""


@cli.command()
@settings_options
def run(**opts: Any) -> None:
    """Run the controller until SIGINT/SIGTERM (a second signal forces)."""
    settings = _settings(opts)
    raise_nofile_limit()
    metrics = ControllerMetrics()
    current: list[Opened] = []  # the controller now running, for the metrics endpoint
    server = None
    try:
        if settings.metrics_listen:
            server = _metrics_server(settings, metrics, current)
        docker = open_source(settings)
        while True:
            opened = _open(settings, docker, metrics)
            current[:] = [opened]
            loop = Loop(opened.ctl, docker, settings)
            loop.install_signal_handlers()
            # `status` in another process asks it how long each drain has left.
            feed = DrainFeed(opened.path, settings.interface, opened.ctl.drain_report)
            try:
                loop.run()
                return
            except DirectorMoved as e:
                logger.warning("{}: reopening on the new namespace", e)
            finally:
                feed.close()
                opened.close()
    except ForcedStop as e:
        logger.warning("forced stop: {}", e)
        sys.exit(EXIT_FORCED)
    except DockerlbError as e:
        logger.error("{}", e)
        sys.exit(EXIT_FAILURE)
    finally:
        if server is not None:
            server.close()


def raise_nofile_limit() -> None:
    """The open files soft limit up to the hard one: each health probe and
    metrics connection holds a descriptor, and containers often start with a
    soft limit of 1024 under a far higher hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        logger.debug("open files limit {} (soft = hard)", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        logger.debug("open files limit {} (hard {}): cannot raise it: {}", soft, hard, e)
        return
    logger.debug("open files limit {} raised to the hard limit, {}", soft, hard)


def _metrics_server(settings: Settings, metrics: ControllerMetrics, current: list[Opened]) -> MetricsServer:
    def view() -> TableView | None:
        if not current:
            return None  # still starting: no namespace opened yet
        opened = current[0]
        # A socket of this scrape's own: pyroute2 sockets belong to one thread.
        with contextlib.ExitStack() as opened_here:
            ipvs = IpvsAdapter(opened.path, settings)
            opened_here.callback(ipvs.close)
            snapshot = ipvs.read()
            vips = opened.ctl.owned_vips
            pair = None
            if settings.pair:
                director = Director(opened.path, settings)
                opened_here.callback(director.close)
                pair = director_pair.state_of(settings, opened.ctl.sync_interface, ipvs, director, vips)
            announced = None
            if settings.announce:
                routes = RouteTable(opened.path, settings)
                opened_here.callback(routes.close)
                present = {r.vip for r in routes.routes()}
                announced = {vip: vip in present for vip in vips}
        return TableView.of(
            snapshot,
            vips,
            opened.ctl.server_names(),
            all_services=settings.metrics_all_services,
            pair=pair,
            announced=announced,
            drains=opened.ctl.drains_left(),
        )

    def ready() -> tuple[bool, str]:
        return current[0].ctl.health() if current else (False, "starting")

    metrics.registry.register(TableCollector(view, lambda e: metrics.errors.labels(type(e).__name__).inc()))
    server = MetricsServer(settings.metrics_listen, metrics.registry, ready)
    server.start()
    return server


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts (a line per refresh with --watch).")
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval", default=2.0, show_default=True, type=float, help="Seconds between refreshes.")
@settings_options
def status(as_json: bool, watch: bool, interval: float, **opts: Any) -> None:
    """The director's IPVS table with the container behind each real server.

    A table on a terminal, plain text in a pipe, JSON with --json.
    """
    from rich.console import Console
    from rich.live import Live

    settings = _settings(opts)
    console = Console()
    try:
        opened = _open(settings, open_source(settings))
        ctl = opened.ctl
        routes = RouteTable(opened.path, settings) if settings.announce else None

        def view() -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None]:
            ctl.refresh()
            state, snapshot = ctl.kernel_state()
            # The running controller's drains (how long each has left), if one answers.
            drains = drains_in(read_feed(opened.path, settings.interface))
            who = backends(ctl.containers(), settings.label_prefix)
            services = status_data(snapshot, state.vips, who, drains)
            announced = None
            if routes is not None:
                announced = announce_data(
                    state.owned,
                    minimums(ctl.containers(), settings.label_prefix),
                    {r.vip for r in routes.routes()},
                    BirdSpeaker(settings.speaker_socket).state(),
                )
            return services, pair_data(ctl.pair_state(state.vips)), announced

        if not watch:
            _show(console, *view(), as_json)
            return
        try:
            if console.is_terminal and not as_json:
                with Live(_drawn(*view()), console=console, auto_refresh=False, screen=True) as live:
                    while True:
                        time.sleep(interval)
                        live.update(_drawn(*view()), refresh=True)
            while True:
                if not as_json:
                    click.echo(f"--- {datetime.now().isoformat(timespec='seconds')}")
                _show(console, *view(), as_json, compact=True)
                time.sleep(interval)
        except KeyboardInterrupt:
            return
    except DockerlbError as e:
        logger.error("{}", e)
        sys.exit(EXIT_FAILURE)


def _show(
    console: Console,
    services: list[dict[str, Any]],
    pair: dict[str, Any] | None,
    announced: dict[str, Any] | None,
    as_json: bool,
    compact: bool = False,
) -> None:
    if as_json:
        shown = {"services": services} | ({"pair": pair} if pair is not None else {})
        shown |= {"announce": announced} if announced is not None else {}
        click.echo(json.dumps(shown, indent=None if compact else 2))
    elif console.is_terminal:
        console.print(_drawn(services, pair, announced))
    else:
        head = "".join(f"{line}\n" for line in (pair_text(pair), announce_text(announced)) if line)
        click.echo(head + status_text(services) + ("\n" if compact else ""))


def _drawn(
    services: list[dict[str, Any]], pair: dict[str, Any] | None, announced: dict[str, Any] | None
) -> Any:
    from rich.console import Group

    lines = [line for line in (pair_text(pair), announce_text(announced)) if line]
    return Group(*lines, status_table(services)) if lines else status_table(services)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@settings_options
def plan(as_json: bool, **opts: Any) -> None:
    """What `run` would change now, changing nothing. Exit 0: nothing; 2: changes."""
    settings = _settings(opts)
    try:
        ctl = _open(settings, open_source(settings)).ctl
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


@cli.group()
def drain() -> None:
    """Draining real servers (weight 0, their connections finishing)."""


@drain.command("wait")
@click.argument("containers", nargs=-1, required=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to wait at most [default: --drain-timeout plus 10].",
)
@click.option(
    "--interval",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between looks.",
)
@settings_options
def drain_wait(containers: tuple[str, ...], timeout: float | None, interval: float, **opts: Any) -> None:
    """Wait until each container is drained: every real server of it out of
    the table, or at weight 0 with no active connection (so a script can
    `docker stop` it right after). A container still serving at a weight
    above 0 is not drained: its drain has not begun.

    Exit 0: all drained; 1: not within the timeout (or nothing could be
    read); 2: bad usage (no such labelled container).
    """
    settings = _settings(opts)
    limit = settings.drain_timeout + 10 if timeout is None else timeout
    try:
        ctl = _open(settings, open_source(settings)).ctl
        ctl.refresh()
        targets = {c.name: _addresses(c) for c in (_named(ctl.containers(), n, settings) for n in containers)}
        started = time.monotonic()
        while True:
            state, snapshot = ctl.kernel_state(counters=False)
            held = holding(targets, snapshot, state.vips)
            waited = time.monotonic() - started
            if not any(held.values()):
                for name in targets:
                    click.echo(f"{name}: drained after {waited:.1f} s")
                return
            if waited >= limit:
                for name, why in held.items():
                    line = (
                        f"{name}: not drained after {limit:g} s: {'; '.join(why)}"
                        if why
                        else f"{name}: drained"
                    )
                    click.echo(line, err=bool(why))
                sys.exit(EXIT_FAILURE)
            time.sleep(min(interval, max(0.0, limit - waited)))
    except DockerlbError as e:
        logger.error("{}", e)
        sys.exit(EXIT_FAILURE)


def _named(containers: list[Container], wanted: str, settings: Settings) -> Container:
    """The labelled container of this name (or id, or id prefix); bad usage if none."""
    for c in containers:
        if wanted in (c.name, c.id) or (len(wanted) >= 4 and c.id.startswith(wanted)):
            return c
    raise click.UsageError(
        f"no container {wanted!r} carries {settings.label_prefix}* labels on this engine "
        f"(docker ps -a --filter label={settings.label_prefix}vip)"
    )


def _addresses(c: Container) -> frozenset[IPAddress]:
    return frozenset(a for net in c.networks.values() for a in (net.ipv4, net.ipv6) if a is not None)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@click.option(
    "--probe",
    is_flag=True,
    help="Also connect to each real server of each VIP:port, from the director's namespace, and "
    "name the first broken step (route, ARP, the VIP on lo/tunl0, rp_filter, routed NAT's return path).",
)
@click.option(
    "--probe-from",
    default="",
    metavar="NETNS",
    help="With --probe: also connect through each VIP from this client's namespace "
    "(container:NAME, an ip netns name or a path), until each real server has had a connection.",
)
@settings_options
def doctor(as_json: bool, probe: bool, probe_from: str, **opts: Any) -> None:
    """Check what the controller needs here; each failure comes with its fix.

    Exit 1 when something a configured feature needs is missing.
    """
    settings = _settings(opts)
    checks = run_checks(settings, probe=probe, probe_from=probe_from)
    click.echo(doctor_json(checks) if as_json else doctor_text(checks))
    sys.exit(0 if checks_pass(checks) else EXIT_FAILURE)


@cli.command()
@click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds to wait, per step.")
@settings_options
def healthz(timeout: float, **opts: Any) -> None:
    """Ask the /healthz that `run` serves (--metrics-listen): exit 0 when ready, 1 otherwise.

    The image's HEALTHCHECK. A listener on every address (0.0.0.0, [::], :PORT)
    is asked on loopback.
    """
    settings = _settings(opts)
    if not settings.metrics_listen:
        logger.error("no --metrics-listen (DOCKERLB_METRICS_LISTEN): no /healthz to ask")
        sys.exit(EXIT_FAILURE)
    try:
        ready, said = ask_healthz(settings.metrics_listen, timeout)
    except DockerlbError as e:
        logger.error("{}", e)
        sys.exit(EXIT_FAILURE)
    click.echo(said)
    sys.exit(0 if ready else EXIT_FAILURE)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
