import docker
import pytest

from tests.dockerlab import Lab


@pytest.fixture(scope="session")
def client():
    # No skip: a host- or kernel-tier run without a Docker engine is a failure.
    c = docker.from_env()
    c.ping()
    yield c
    c.close()


@pytest.fixture
def lab(client):
    lab = Lab(client)
    yield lab
    lab.close()
