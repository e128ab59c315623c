"""doctor's checks that need no kernel: the IPVS connection table, the VIP
allow-list and the health checks' namespace."""

from dataclasses import replace

import pytest

import dockerlb.app.doctor as doctor
from dockerlb.errors import ConfigError
from dockerlb.settings import Settings
from tests.unit.builders import container

pytestmark = pytest.mark.unit
WEB = container("web", {"dockerlb.vip": "10.1.2.3:80"})
CHECKED = container("api", {"dockerlb.vip": "192.0.2.9:80", "dockerlb.check": "http:/health"})


def test_a_table_with_room_passes_and_says_when_to_grow_it():
    detail = doctor._conn_table(12_000, 4096)
    assert detail == (
        "4,096 buckets (ip_vs conn_tab_bits=12); 12,000 connection(s) in the director now; "
        "raise it before holding more than about 32,768"
    )


def test_a_crowded_table_fails_with_the_module_parameter_that_fits_the_connections():
    with pytest.raises(doctor._Failed) as failed:
        doctor._conn_table(100_000, 4096)
    assert "about 24 per bucket" in str(failed.value)
    assert "options ip_vs conn_tab_bits=17" in failed.value.fix


def test_without_an_allow_list_doctor_says_it_is_open_to_any_private_address_and_names_the_option():
    with pytest.raises(doctor._Failed) as failed:
        doctor._vip_allow_list([WEB], Settings())
    assert str(failed.value) == (
        "not set: a label may ask for any private address "
        "(10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7)"
    )
    assert failed.value.fix.startswith("name the ranges your VIPs come from: --vip-cidr (DOCKERLB_VIP_CIDR)")
    # A public VIP is outside those: run skips it, and doctor names it.
    with pytest.raises(doctor._Failed, match=r"skips them: api \(192.0.2.9\)"):
        doctor._vip_allow_list([WEB, CHECKED], Settings())


def test_a_vip_outside_the_allow_list_names_its_container_and_address():
    settings = replace(Settings(), vip_cidr=("10.0.0.0/8", "fd00::/8"))
    with pytest.raises(doctor._Failed) as failed:
        doctor._vip_allow_list([WEB, CHECKED], settings)
    assert str(failed.value) == "outside 10.0.0.0/8, fd00::/8, so `dockerlb run` skips them: api (192.0.2.9)"
    assert doctor._vip_allow_list([WEB], settings) == "every labelled VIP is inside 10.0.0.0/8, fd00::/8"


def test_health_checks_in_another_namespace_need_sys_admin(monkeypatch):
    checked = doctor._checked([WEB, CHECKED], Settings())
    assert checked == ["api"]
    monkeypatch.setattr(doctor, "_has_cap", lambda cap: cap != doctor.CAP_SYS_ADMIN)
    with pytest.raises(doctor._Failed) as failed:
        doctor._health_checks(checked, "/proc/42/ns/net")
    assert "SYS_ADMIN" in failed.value.fix
    assert doctor._health_checks(checked, None) == "api: probed from the controller's own namespace"
    assert doctor._health_checks([], "/proc/42/ns/net") == "no container asks for one"


def test_a_bad_vip_cidr_is_the_projects_config_error_which_doctor_reports_as_a_failed_check():
    with pytest.raises(ConfigError, match="--vip-cidr"):
        doctor._vip_allow_list([WEB], replace(Settings(), vip_cidr=("10.0.0.0/33",)))
