"""Unit tier: a container as Docker's listing (/containers/json) describes it."""

from ipaddress import IPv4Address

import pytest

from dockerlb.adapters.docker_source import container_from_summary, health_from_status
from dockerlb.core.model import NetworkAddress

pytestmark = pytest.mark.unit

# One entry of dockerd 20.10's listing, as it sends it (trimmed of fields
# dockerlb does not read).
SUMMARY = {
    "Id": "4f9c0e3a" * 8,
    "Names": ["/shop_web_1"],
    "Created": 1764752400,
    "Labels": {"dockerlb.vip": "1.2.3.4:8000", "com.docker.compose.project": "shop"},
    "State": "running",
    "Status": "Up 2 hours (healthy)",
    "NetworkSettings": {
        "Networks": {
            "shop_default": {
                "IPAddress": "172.18.0.3",
                "Gateway": "172.18.0.1",
                "GlobalIPv6Address": "",
                "IPv6Gateway": "",
            }
        }
    },
}


def test_a_listed_container_carries_name_labels_address_state_and_health():
    c = container_from_summary(SUMMARY)
    assert c.id == "4f9c0e3a" * 8
    assert c.name == "shop_web_1"
    assert c.created == "2025-12-03T09:00:00Z"
    assert c.labels == {"dockerlb.vip": "1.2.3.4:8000", "com.docker.compose.project": "shop"}
    assert c.networks == {
        "shop_default": NetworkAddress(IPv4Address("172.18.0.3"), None, IPv4Address("172.18.0.1"), None)
    }
    assert c.running and c.health == "healthy"
    assert c.pid == 0


def test_a_paused_container_in_the_listing_is_not_running():
    c = container_from_summary(SUMMARY | {"State": "paused", "Status": "Up 2 hours (Paused)"})
    assert not c.running
    assert c.health is None


@pytest.mark.parametrize(
    ("status", "health"),
    [
        ("Up 2 hours (healthy)", "healthy"),
        ("Up 5 seconds (unhealthy)", "unhealthy"),
        ("Up Less than a second (health: starting)", "starting"),
        ("Up 3 minutes", None),
        ("Up 3 minutes (Paused)", None),
        ("", None),
    ],
)
def test_the_health_shown_in_a_status_line_is_read_as_inspect_names_it(status, health):
    assert health_from_status(status) == health


def test_a_listed_container_is_named_by_its_own_name_not_a_link_alias():
    c = container_from_summary(SUMMARY | {"Names": ["/shop_api_1/web", "/shop_web_1"]})
    assert c.name == "shop_web_1"
