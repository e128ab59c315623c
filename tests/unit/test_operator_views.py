"""The operator's views: the status table, doctor's report and exit code, metrics."""

import json
import urllib.error
import urllib.request
from ipaddress import ip_address

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

import dockerlb.app.cli
from dockerlb.adapters.metrics import (
    ControllerMetrics,
    MetricsServer,
    TableCollector,
    TableView,
    parse_listen,
)
from dockerlb.core.model import (
    Check,
    Forward,
    Proto,
    RealServer,
    ServerStats,
    Service,
    ServiceKey,
    Snapshot,
    VirtualService,
    checks_pass,
)
from dockerlb.core.render import backends, doctor_text, status_data, status_table, status_text
from dockerlb.errors import ConfigError, IpvsUnavailable
from tests.unit.builders import container

pytestmark = pytest.mark.unit
KEY = ServiceKey(Proto.TCP, ip_address("1.2.3.4"), 8000)
WEB1 = RealServer(ip_address("172.18.0.3"), 8000, 1, Forward.NAT)
WEB2 = RealServer(ip_address("172.18.0.4"), 8000, 0, Forward.NAT)
THEIRS = ServiceKey(Proto.UDP, ip_address("9.9.9.9"), 53)


def snapshot() -> Snapshot:
    return Snapshot(
        {
            KEY: VirtualService.of(Service(KEY), [WEB1, WEB2]),
            THEIRS: VirtualService.of(Service(THEIRS, "rr"), []),
        },
        {
            (KEY, WEB1.ident): ServerStats(
                active=1, inactive=2, conns=42, inpkts=10, outpkts=11, inbytes=600
            ),
            (KEY, WEB2.ident): ServerStats(conns=7),
        },
        {KEY: ServerStats(conns=49, inpkts=20, outpkts=21, inbytes=1200, outbytes=3400)},
    )


def test_each_real_server_shows_its_container_network_health_and_state():
    who = backends(
        [
            container("web1", {}, nets={"lab": ("172.18.0.3", None)}, health="healthy"),
            container("web2", {}, nets={"lab": ("172.18.0.4", None)}),
        ]
    )
    services = status_data(snapshot(), frozenset({KEY.vip}), who)
    web1, web2 = services[0]["servers"]
    assert (web1["container"], web1["network"], web1["health"], web1["state"]) == (
        "web1",
        "lab",
        "healthy",
        "serving",
    )
    assert (web2["container"], web2["state"]) == ("web2", "weight 0")
    assert services[0]["conns"] == 49 and services[0]["outbytes"] == 3400
    assert web1["conns"] == 42 and web1["inbytes"] == 600
    assert [s["managed"] for s in services] == [True, False]


def test_in_swarm_mode_each_real_server_names_its_task_and_the_node_it_runs_on():
    who = backends(
        [
            container("web.1", {}, nets={"lb": ("172.18.0.3", None)}, node="worker-1"),
            container("web.2", {}, nets={"lb": ("172.18.0.4", None)}, node="worker-2"),
        ]
    )
    services = status_data(snapshot(), frozenset({KEY.vip}), who)
    web1, web2 = services[0]["servers"]
    assert (web1["container"], web1["node"]) == ("web.1", "worker-1")
    assert (web2["container"], web2["node"]) == ("web.2", "worker-2")
    lines = status_text(services).splitlines()
    assert [line.split()[9] for line in lines if line.startswith("  -> 172.18")] == [
        "web.1@worker-1",
        "web.2@worker-2",
    ]


def test_a_paused_or_unknown_server_says_so():
    paused = backends([container("web1", {}, nets={"lab": ("172.18.0.3", None)}, running=False)])
    web1, web2 = status_data(snapshot(), frozenset({KEY.vip}), paused)[0]["servers"]
    assert (web1["health"], web1["state"]) == ("paused", "not serving")
    assert (web2["container"], web2["state"]) == ("", "unknown")


def test_a_server_the_controller_set_to_weight_0_against_its_label_is_draining():
    labelled = {"dockerlb.vip": f"{KEY.vip}:{KEY.port}"}
    stopping = backends([container("web2", labelled, nets={"lab": ("172.18.0.4", None)})])
    assert status_data(snapshot(), frozenset({KEY.vip}), stopping)[0]["servers"][1]["state"] == "draining"
    unhealthy = backends([container("web2", {}, nets={"lab": ("172.18.0.4", None)}, health="unhealthy")])
    assert status_data(snapshot(), frozenset({KEY.vip}), unhealthy)[0]["servers"][1]["state"] == "draining"
    standby = backends(
        [container("web2", {**labelled, "dockerlb.weight": "0"}, nets={"lab": ("172.18.0.4", None)})]
    )
    assert status_data(snapshot(), frozenset({KEY.vip}), standby)[0]["servers"][1]["state"] == "weight 0"


def test_the_terminal_table_has_a_row_per_server_and_keeps_foreign_services_apart():
    who = backends([container("web1", {}, nets={"lab": ("172.18.0.3", None)})])
    console = Console(force_terminal=True, width=160, record=True)
    console.print(status_table(status_data(snapshot(), frozenset({KEY.vip}), who)))
    text = console.export_text()
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if "│" in line]
    assert ["-> 172.18.0.3:8000", "Masq", "1", "1", "2", "0", "0", "0", "web1", "lab", "-", "serving"] in rows
    assert text.index("managed by dockerlb") < text.index("Not managed by dockerlb") < text.index("9.9.9.9")


def test_doctor_prints_each_check_with_the_fix_and_notes_what_nothing_needs():
    checks = [
        Check("CAP_NET_ADMIN", True, "the controller has CAP_NET_ADMIN"),
        Check("IPVS in the kernel", False, "no IPVS", "boot a kernel with CONFIG_IP_VS"),
        Check("forward=dr: real-server namespaces", False, "no container asks for it", "use nat", False),
    ]
    assert doctor_text(checks).splitlines() == [
        "PASS  CAP_NET_ADMIN: the controller has CAP_NET_ADMIN",
        "FAIL  IPVS in the kernel: no IPVS",
        "      fix: boot a kernel with CONFIG_IP_VS",
        "NOTE  forward=dr: real-server namespaces: no container asks for it",
        "      fix: use nat",
    ]
    assert not checks_pass(checks)
    assert checks_pass([checks[0], checks[2]])


@pytest.mark.parametrize(("ok", "code"), [(True, 0), (False, 1)])
def test_doctor_exits_non_zero_only_when_a_needed_check_fails(monkeypatch, ok, code):
    checks = [Check("IPVS in the kernel", ok, "detail", "fix"), Check("optional", False, "d", "f", False)]
    monkeypatch.setattr(dockerlb.app.cli, "run_checks", lambda settings, **probe: checks)
    result = CliRunner().invoke(dockerlb.app.cli.cli, ["doctor", "--json"])
    assert result.exit_code == code, result.output
    assert [c["ok"] for c in json.loads(result.output)] == [ok, False]


def scrape(view: TableView) -> str:
    registry = CollectorRegistry()
    registry.register(TableCollector(lambda: view, lambda e: None))
    return generate_latest(registry).decode()


def test_metrics_carry_the_kernel_counters_per_service_and_server_with_the_container():
    names = {(KEY, WEB1.ident): "web1"}
    text = scrape(TableView(snapshot(), frozenset({KEY.vip}), names))
    server = 'container="web1",port="8000",protocol="tcp",server="172.18.0.3:8000",vip="1.2.3.4"'
    assert f"dockerlb_server_connections_total{{{server}}} 42.0" in text
    assert f'dockerlb_server_bytes_total{{{server},direction="in"}}' not in text  # labels sort by name
    assert 'dockerlb_server_bytes_total{container="web1",direction="in",port="8000"' in text
    assert f"dockerlb_server_active_connections{{{server}}} 1.0" in text
    assert f"dockerlb_server_weight{{{server}}} 1.0" in text
    service = 'managed="true",port="8000",protocol="tcp",vip="1.2.3.4"'
    assert f"dockerlb_service_connections_total{{{service}}} 49.0" in text
    assert (
        'dockerlb_service_connections_total{managed="false",port="53",protocol="udp",vip="9.9.9.9"} 0.0'
        in text
    )


def test_a_failed_table_read_is_counted_and_the_scrape_still_answers():
    errors = []

    def broken() -> TableView:
        raise IpvsUnavailable("no IPVS")

    registry = CollectorRegistry()
    registry.register(TableCollector(broken, errors.append))
    assert "dockerlb_server" not in generate_latest(registry).decode()
    assert [str(e) for e in errors] == ["no IPVS"]


def test_the_endpoint_serves_metrics_and_readiness_on_loopback():
    metrics = ControllerMetrics()
    metrics.operations.labels("add_server").inc()
    state = {"ready": (False, "start-up sync not done yet")}
    server = MetricsServer("127.0.0.1:0", metrics.registry, lambda: state["ready"])
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as not_yet:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert not_yet.value.code == 503
        not_yet.value.close()
        state["ready"] = (True, "ready")
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            assert 'dockerlb_operations_applied_total{kind="add_server"} 1.0' in r.read().decode()
    finally:
        server.close()


@pytest.mark.parametrize("text", ["9469", "host:", "host:99999", "a:b"])
def test_a_bad_metrics_address_is_a_clear_config_error(text):
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        parse_listen(text)


def test_metrics_addresses_accept_ipv6_and_every_address():
    assert parse_listen("[::1]:9469") == ("::1", 9469)
    assert parse_listen(":9469") == ("0.0.0.0", 9469)


def test_a_draining_server_shows_the_time_its_controller_gives_it_and_a_restored_one_does_not():
    labelled = {"dockerlb.vip": f"{KEY.vip}:{KEY.port}"}
    who = backends(
        [
            container("web1", labelled, nets={"lab": ("172.18.0.3", None)}),
            container("web2", labelled, nets={"lab": ("172.18.0.4", None)}),
        ]
    )
    # The controller says both drain; web1's weight is 1 again (restored since).
    services = status_data(snapshot(), frozenset({KEY.vip}), who, {"web1": 3.0, "web2": 12.34})
    web1, web2 = services[0]["servers"]
    assert (web1["state"], web1["drain_left"]) == ("serving", None)
    assert (web2["state"], web2["drain_left"], web2["active"]) == ("draining", 12.3, 0)
    line = status_text(services).splitlines()[4]
    assert line.endswith(" web2             lab              -         draining (12 s left)"), line
    assert status_data(snapshot(), frozenset({KEY.vip}), who)[0]["servers"][1]["drain_left"] is None


def test_metrics_say_which_servers_drain_and_how_long_each_has_left():
    names = {(KEY, WEB1.ident): "web1", (KEY, WEB2.ident): "web2"}
    text = scrape(TableView.of(snapshot(), frozenset({KEY.vip}), names, drains={"web2": 12.34}))
    web1 = 'container="web1",port="8000",protocol="tcp",server="172.18.0.3:8000",vip="1.2.3.4"'
    web2 = 'container="web2",port="8000",protocol="tcp",server="172.18.0.4:8000",vip="1.2.3.4"'
    assert f"dockerlb_server_draining{{{web1}}} 0.0" in text
    assert f"dockerlb_server_draining{{{web2}}} 1.0" in text
    assert f"dockerlb_server_drain_seconds_left{{{web2}}} 12.3" in text
    assert f"dockerlb_server_drain_seconds_left{{{web1}}}" not in text
