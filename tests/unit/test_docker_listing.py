"""Unit tier: a container as Docker's listing (/containers/json) describes it."""

import json
from ipaddress import IPv4Address

import pytest

from dockerlb.adapters.docker_source import container_from_summary, health_from_status, json_items
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


def test_a_listing_is_decoded_one_entry_at_a_time_however_its_bytes_arrive():
    entries = [{**SUMMARY, "Id": f"{i:064x}", "Names": [f"/web_é{i}"]} for i in range(40)]
    body = json.dumps([*entries, 12, "x]y,{", None]).encode()
    for cut in (1, 7, 100, 1 << 16):  # pieces of this many bytes, a UTF-8 character split too
        pieces = [body[i : i + cut] for i in range(0, len(body), cut)]
        assert list(json_items(pieces)) == [*entries, 12, "x]y,{", None]
    assert list(json_items([b" [ ] "])) == []
    assert list(json_items([b"[1", b"2]"])) == [12]  # a number cut short is not taken for another


@pytest.mark.parametrize("body", [b"[1,2", b"{}", b"[1] x", b"[{]"])
def test_a_listing_that_is_not_a_whole_json_array_is_refused(body):
    with pytest.raises(ValueError):
        list(json_items([body]))
