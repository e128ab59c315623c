"""Host tier: the sidecar image (built by scripts/build-image.sh, as tests/run
does) and every compose file a user would copy, in both Compose shapes."""

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness.dockerlab import wait_for

pytestmark = pytest.mark.host
ROOT = Path(__file__).resolve().parents[2]
IMAGE = "dockerlb:test"
COMPOSE_FILES = sorted(
    [
        *ROOT.glob("compose/*.yml"),
        *ROOT.glob("compose/*/docker-compose.yml"),
        *ROOT.glob("examples/*/docker-compose.yml"),
        *ROOT.glob("tests/kernel/*/docker-compose.yml"),
    ]
)
# The Compose Specification's schema, as Debian's docker-compose ships it.
COMPOSE_SPEC = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image() -> dict:
    done = docker("image", "inspect", IMAGE)
    assert done.returncode == 0, f"{IMAGE} is missing: run scripts/build-image.sh first ({done.stderr})"
    return json.loads(done.stdout)[0]


def test_the_image_runs_dockerlb_and_its_health_check_asks_for_readiness(image):
    config = image["Config"]
    assert config["Entrypoint"] == ["dockerlb"] and config["Cmd"] == ["run"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "dockerlb.adapters.healthz"]
    assert "DOCKERLB_METRICS_LISTEN=127.0.0.1:9469" in config["Env"]
    size = image["Size"] / 1e6
    print(f"{IMAGE}: {size:.0f} MB")
    assert size < 300, f"{size:.0f} MB"
    assert docker("run", "--rm", IMAGE, "--version").stdout.startswith("dockerlb, version ")


# The image's own /healthz endpoint, ready: no IPVS here for `dockerlb run`.
READY_ENDPOINT = (
    "import os, time\n"
    "from dockerlb.adapters.metrics import ControllerMetrics, MetricsServer\n"
    "listen = os.environ['DOCKERLB_METRICS_LISTEN']\n"
    "MetricsServer(listen, ControllerMetrics().registry, lambda: (True, 'ready')).start()\n"
    "time.sleep(600)\n"
)


@pytest.mark.parametrize("listen", ["127.0.0.1:9470", "[::]:9471"])
def test_the_images_health_check_asks_where_metrics_listen_says(image, listen):
    # Old image: its check asked 127.0.0.1:9469 whatever the variable said.
    name = f"dockerlb-healthz-{listen[-4:]}"
    docker("rm", "-f", name)
    started = docker(
        "run", "-d", "--name", name, "-e", f"DOCKERLB_METRICS_LISTEN={listen}",
        "--health-interval", "1s", "--health-start-period", "60s",
        "--entrypoint", "python3", IMAGE, "-c", READY_ENDPOINT,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr

    def verdict() -> dict | None:
        health = json.loads(docker("inspect", "--format", "{{json .State.Health}}", name).stdout)
        return None if health["Status"] == "starting" else health

    try:
        # A pass in the start period is healthy at once; a failure counts
        # only after it (60 s: python3 on a busy machine takes seconds to
        # listen), then 3 retries at 1 s.
        done = wait_for(verdict, 120, 1, what="a verdict")
        assert done["Status"] == "healthy", done["Log"]
        assert done["Log"][-1]["ExitCode"] == 0 and done["Log"][-1]["Output"] == "200 ready\n"
    finally:
        docker("rm", "-f", name)


def test_the_image_needs_only_net_admin_to_check_itself(image):
    # As every compose file runs it: no other capability, none to be gained, a read-only root.
    done = docker(
        "run", "--rm", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN",
        "--security-opt", "no-new-privileges:true", "--read-only",
        "-v", "/var/run/docker.sock:/var/run/docker.sock", IMAGE, "doctor",
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert "PASS  CAP_NET_ADMIN: the controller has CAP_NET_ADMIN" in lines, done.stdout + done.stderr
    assert any(line.startswith("PASS  Docker engine: answers") for line in lines)
    assert "PASS  masquerade (nftables): nft answers in the director namespace" in lines
    # This host's kernel has no IPVS: the one failure, with its fix.
    assert done.returncode == 1 and "FAIL  IPVS in the kernel" in done.stdout


def test_every_compose_file_is_read_by_compose_v1(tmp_path):
    assert len(COMPOSE_FILES) == 16, COMPOSE_FILES  # compose/ 6, examples/ 9, the sidecar lab
    for path in COMPOSE_FILES:
        done = subprocess.run(
            ["docker-compose", "-f", str(path), "config", "-q"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{path}: {done.stderr}"


def test_every_stack_file_is_read_by_docker_stack():
    stacks = sorted(ROOT.glob("examples/*/stack.yml"))
    vips = {"bgp-two-directors": "10.20.30.1:8000", "swarm": "1.2.3.4:8000"}
    assert [p.parent.name for p in stacks] == sorted(vips)
    for path in stacks:
        done = subprocess.run(
            ["docker", "stack", "config", "-c", str(path)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{path}: {done.stderr}"
        web = yaml.safe_load(done.stdout)["services"]["web"]
        assert web["deploy"]["labels"]["dockerlb.vip"] == vips[path.parent.name]


def test_every_compose_file_is_a_compose_spec_file_for_v2():
    schema = json.loads(COMPOSE_SPEC.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    for path in COMPOSE_FILES:
        doc = yaml.safe_load(path.read_text())
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == [], f"{path}: {errors}"
        # `version` is obsolete in Compose v2, and no file runs privileged.
        assert "version" not in doc, path
        for name, service in doc["services"].items():
            assert not service.get("privileged"), f"{path}: {name}"


def test_the_schema_check_catches_a_key_compose_does_not_know():
    validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SPEC.read_text()))
    doc = {"services": {"web": {"image": "busybox", "no_such_key": True}}}
    assert any("no_such_key" in e.message for e in validator.iter_errors(doc))


# Who gets more than NET_ADMIN, and why (docs/trust.md). Everyone else
# gets NET_ADMIN (a director, a client routing to the VIP) or nothing.
MORE_THAN_NET_ADMIN = {
    # VRRP: a raw socket.
    ("compose/ha/docker-compose.yml", "keepalived_a"): ["NET_ADMIN", "NET_RAW"],
    ("compose/ha/docker-compose.yml", "keepalived_b"): ["NET_ADMIN", "NET_RAW"],
    # BGP: BIRD accepts its peer's session on port 179.
    ("compose/bgp/docker-compose.yml", "bird"): ["NET_BIND_SERVICE"],
    # The keepalived pair across two hosts: VRRP adverts (raw) and the VIP.
    ("compose/vrrp/docker-compose.yml", "keepalived"): ["NET_ADMIN", "NET_RAW"],
    # DR and TUN: dockerlb enters the servers' namespaces and mounts a procfs
    # to write their sysctls (pid: host, and no AppArmor: docker-default denies mount).
    ("examples/direct-routing/docker-compose.yml", "director"): ["NET_ADMIN", "SYS_ADMIN"],
    ("examples/tunnel/docker-compose.yml", "director"): ["NET_ADMIN", "SYS_ADMIN"],
    ("tests/kernel/sidecar/docker-compose.yml", "director"): ["NET_ADMIN", "SYS_ADMIN"],
}


def services_of(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def test_every_service_drops_every_capability_it_does_not_name_gains_none_and_runs_read_only():
    for path in COMPOSE_FILES:
        for name, service in services_of(path).items():
            where = f"{path.relative_to(ROOT)}: {name}"
            assert service.get("cap_drop") == ["ALL"], where
            assert "no-new-privileges:true" in service.get("security_opt", []), where
            assert service.get("read_only") is True, where
            caps = sorted(service.get("cap_add", []))
            more = MORE_THAN_NET_ADMIN.get((str(path.relative_to(ROOT)), name))
            assert caps == more if more else caps in ([], ["NET_ADMIN"]), where
            unconfined = "apparmor:unconfined" in service.get("security_opt", [])
            assert unconfined == ("SYS_ADMIN" in caps), where
            assert ("SYS_ADMIN" in caps) == (service.get("pid") == "host"), where
    # Swarm takes no security_opt: no-new-privileges cannot be asked for in a stack.
    for path in ROOT.glob("examples/*/stack.yml"):
        for name, service in services_of(path).items():
            assert service.get("cap_drop") == ["ALL"] and service.get("read_only") is True, name
            assert "cap_add" not in service, name
    assert all(k[1] in services_of(ROOT / k[0]) for k in MORE_THAN_NET_ADMIN)
