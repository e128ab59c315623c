import docker
import pytest

from harness.dockerlab import Lab


@pytest.fixture(scope="session")
def client():
    # No skip: a host- or kernel-tier run without a Docker engine is a failure.
    # A busy dockerd in a guest can take over the SDK's default 60 s to
    # answer (a start queued behind others); a wait is not a failure.
    c = docker.from_env(timeout=300)
    c.ping()
    yield c
    c.close()


@pytest.fixture
def lab(client):
    lab = Lab(client)
    yield lab
    lab.close()
