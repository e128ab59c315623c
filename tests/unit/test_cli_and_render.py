import dataclasses
import json
from ipaddress import ip_address

import click
import pytest
from click.testing import CliRunner

from dockerlb.app.cli import settings_options
from dockerlb.core.model import (
    Forward,
    Proto,
    RealServer,
    ServerStats,
    Service,
    ServiceKey,
    Snapshot,
    VirtualService,
)
from dockerlb.core.plan import AddServer, RemoveServer
from dockerlb.core.render import backends, op_dict, plan_json, plan_text, status_data, status_text
from dockerlb.settings import Settings
from tests.unit.builders import container

pytestmark = pytest.mark.unit
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)
WEB1 = RealServer(ip_address("172.18.0.3"), 8000, 1, Forward.NAT, "web1")


@click.command()
@settings_options
def show(**opts):
    click.echo(json.dumps(opts))


def _settings_of(output: str) -> Settings:
    # JSON has no tuples: repeatable options come back as lists.
    return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(output).items()})


def test_every_setting_is_an_option_and_a_dockerlb_env_var():
    env = {
        "DOCKERLB_NETNS": "container:director",
        "DOCKERLB_MASQUERADE": "false",
        "DOCKERLB_RESYNC_INTERVAL": "7.5",
        "DOCKERLB_RETRY_ATTEMPTS": "9",
        "DOCKERLB_LOG_FORMAT": "json",
        "DOCKERLB_VIP_CIDR": "10.0.0.0/8 fd00::/8",
    }
    result = CliRunner().invoke(show, [], env=env)
    assert result.exit_code == 0, result.output
    opts = json.loads(result.output)
    assert set(opts) == {f.name for f in dataclasses.fields(Settings)}
    settings = _settings_of(result.output)
    assert settings.netns == "container:director" and settings.masquerade is False
    assert settings.resync_interval == 7.5 and settings.retry_attempts == 9 and settings.log_format == "json"
    assert settings.vip_cidr == ("10.0.0.0/8", "fd00::/8")


def test_defaults_are_the_settings_defaults():
    result = CliRunner().invoke(show, [], env={})
    assert _settings_of(result.output) == Settings()


def test_an_option_beats_its_env_var():
    result = CliRunner().invoke(show, ["--netns", "lb"], env={"DOCKERLB_NETNS": "other"})
    assert json.loads(result.output)["netns"] == "lb"


def test_status_text_is_ipvsadms_table_with_containers_and_foreign_services_apart():
    theirs = ServiceKey(Proto.UDP, ip_address("9.9.9.9"), 53)
    snap = Snapshot(
        {
            theirs: VirtualService.of(Service(theirs, "rr", 0), []),
            KEY: VirtualService.of(Service(KEY, "wlc", 300), [WEB1]),
        },
        {(KEY, WEB1.ident): ServerStats(active=2, inactive=5, cps=3, inbps=700, outbps=9000)},
    )
    who = backends([container("web1", {}, nets={"lab": ("172.18.0.3", None)})])
    text = status_text(status_data(snap, frozenset({KEY.vip}), who))
    lines = text.splitlines()
    assert lines[1].split() == [
        "->", "RemoteAddress:Port", "Forward", "Weight", "ActiveConn", "InActConn",
        "CPS", "InBPS", "OutBPS", "Container", "Network", "Health", "State",
    ]  # fmt: skip
    assert lines[2] == "TCP  1.2.3.4:8000 wlc persistent 300"
    assert lines[3].split() == [
        "->", "172.18.0.3:8000", "Masq", "1", "2", "5", "3", "700", "9000", "web1", "lab", "-", "serving"
    ]  # fmt: skip
    assert lines[4:] == ["", "Not managed by dockerlb (left untouched):", "UDP  9.9.9.9:53 rr"]


def test_plan_lines_say_what_changes_and_for_which_container():
    ops = [AddServer(KEY, WEB1), RemoveServer(KEY, WEB1)]
    assert plan_text(ops).splitlines() == [
        "+ server TCP 1.2.3.4:8000 -> 172.18.0.3:8000 nat weight=1 (web1)",
        "- server TCP 1.2.3.4:8000 -> 172.18.0.3:8000 (web1)",
    ]
    assert plan_text([]) == "nothing to change"
    assert op_dict(ops[0])["op"] == "add_server"
    assert json.loads(plan_json(ops))[0]["server"]["addr"] == "172.18.0.3"
