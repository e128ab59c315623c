from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockerlb.core.model import Forward, KernelState, Proto, RealServer, Service, ServiceKey, VirtualService
from dockerlb.core.plan import (
    AddServer,
    AddService,
    AddVip,
    EditServer,
    EditService,
    RemoveServer,
    RemoveService,
    RemoveVip,
    applied,
    plan,
    refused,
)

pytestmark = pytest.mark.unit
VIP = ip_address("1.2.3.4")
KEY = ServiceKey(Proto.TCP, VIP, 8000)
WEB1 = RealServer(ip_address("10.0.0.2"), 8000, 1, Forward.NAT, "web1")
WEB2 = RealServer(ip_address("10.0.0.3"), 8000, 1, Forward.NAT, "web2")


def table(*services):
    return {vs.service.key: vs for vs in services}


def vs(key=KEY, servers=(WEB1, WEB2), scheduler="wlc", persistence=0):
    return VirtualService.of(Service(key, scheduler, persistence), list(servers))


def state(owned=None, vips=None, foreign=frozenset()):
    owned = owned or {}
    if vips is None:
        vips = frozenset(k.vip for k in owned)
    return KernelState(owned, frozenset(vips), frozenset(foreign))


def test_an_empty_kernel_gets_vip_then_service_then_servers():
    ops = plan(table(vs()), state())
    assert ops == [AddVip(VIP), AddService(Service(KEY)), AddServer(KEY, WEB1), AddServer(KEY, WEB2)]


def test_a_kernel_that_is_already_right_gets_no_operation():
    assert plan(table(vs()), state(table(vs()))) == []


def test_a_weight_change_is_an_edit_in_place():
    heavier = RealServer(WEB2.addr, 8000, 5, Forward.NAT, "web2")
    assert plan(table(vs(servers=(WEB1, heavier))), state(table(vs()))) == [EditServer(KEY, heavier, WEB2)]


def test_a_scheduler_change_is_an_edit_in_place():
    ops = plan(table(vs(scheduler="rr", persistence=60)), state(table(vs())))
    assert ops == [EditService(Service(KEY, "rr", 60), Service(KEY))]


def test_a_stopped_container_removes_only_its_real_server():
    assert plan(table(vs(servers=(WEB1,))), state(table(vs()))) == [RemoveServer(KEY, WEB2)]


def test_the_last_service_on_a_vip_takes_the_vip_with_it():
    assert plan({}, state(table(vs()))) == [RemoveService(Service(KEY)), RemoveVip(VIP)]


def test_a_vip_shared_by_two_services_stays_while_one_is_left():
    other = ServiceKey(Proto.UDP, VIP, 53)
    ops = plan(table(vs()), state(table(vs(), vs(key=other))))
    assert ops == [RemoveService(Service(other))]


def test_replacing_a_server_adds_the_new_one_before_removing_the_old():
    web3 = RealServer(ip_address("10.0.0.4"), 8000, 1, Forward.NAT, "web3")
    ops = plan(table(vs(servers=(WEB1, web3))), state(table(vs())))
    assert ops == [AddServer(KEY, web3), RemoveServer(KEY, WEB2)]


def test_services_it_does_not_own_are_never_touched():
    theirs = ServiceKey(Proto.TCP, ip_address("9.9.9.9"), 80)
    assert plan({}, state(foreign={theirs})) == []


def test_a_vip_carrying_someone_elses_service_is_refused():
    theirs = ServiceKey(Proto.TCP, VIP, 80)
    s = state(foreign={theirs})
    assert refused(table(vs()), s) == [KEY]
    assert plan(table(vs()), s) == []


def test_a_forward_method_change_is_an_edit():
    dr = RealServer(WEB1.addr, 8000, 1, Forward.DR, "web1")
    assert plan(table(vs(servers=(dr, WEB2))), state(table(vs()))) == [EditServer(KEY, dr, WEB1)]


# -- property: applying the plan to the kernel gives exactly the desired table ----

addresses = st.sampled_from(["1.2.3.4", "1.2.3.5", "fd00::10"]).map(ip_address)
keys = st.builds(ServiceKey, st.sampled_from(list(Proto)), addresses, st.sampled_from([80, 8000]))


@st.composite
def tables(draw):
    out = {}
    for key in draw(st.lists(keys, max_size=4, unique=True)):
        fam = "10.0.0." if key.vip.version == 4 else "fd01::"
        servers = [
            RealServer(
                ip_address(f"{fam}{n}"),
                key.port,
                draw(st.integers(0, 3)),
                draw(st.sampled_from(list(Forward))),
            )
            for n in draw(st.sets(st.integers(1, 5), max_size=3))
        ]
        out[key] = VirtualService.of(
            Service(key, draw(st.sampled_from(["wlc", "rr"])), draw(st.sampled_from([0, 60]))), servers
        )
    return out


def simulate(ops, owned, vips):
    """Apply ops to a copy of the kernel, as the kernel would, checking each is valid."""
    kernel = {k: dict(v.servers) for k, v in owned.items()}
    services = {k: v.service for k, v in owned.items()}
    vips = set(vips)
    for op in ops:
        match op:
            case AddVip(vip):
                assert vip not in vips
                vips.add(vip)
            case RemoveVip(vip):
                assert not any(k.vip == vip for k in services)
                vips.remove(vip)
            case AddService(s):
                assert s.key not in services and s.key.vip in vips
                services[s.key], kernel[s.key] = s, {}
            case EditService(s, _):
                services[s.key] = s
            case RemoveService(s):
                del services[s.key], kernel[s.key]
            case AddServer(k, s):
                assert s.ident not in kernel[k]
                kernel[k][s.ident] = s
            case EditServer(k, s, _):
                assert s.ident in kernel[k]
                kernel[k][s.ident] = s
            case RemoveServer(k, s):
                del kernel[k][s.ident]
    return {k: VirtualService(services[k], kernel[k]) for k in services}, vips


def canonical(t):
    return {k: (v.service, {i: s.settings() for i, s in v.servers.items()}) for k, v in t.items()}


@settings(max_examples=400, deadline=None)
@given(desired=tables(), actual=tables())
def test_applying_the_plan_turns_any_owned_table_into_the_desired_one(desired, actual):
    ops = plan(desired, state(actual))
    result, vips = simulate(ops, actual, {k.vip for k in actual})
    assert canonical(result) == canonical(desired)
    assert vips == {k.vip for k in desired}
    assert plan(desired, state(result)) == []  # and then it is settled


@settings(max_examples=200, deadline=None)
@given(desired=tables(), actual=tables())
def test_no_removal_ever_comes_before_an_addition(desired, actual):
    kinds = [type(op).__name__.startswith("Remove") for op in plan(desired, state(actual))]
    assert kinds == sorted(kinds)


OTHER = ServiceKey(Proto.UDP, ip_address("1.2.3.5"), 53)


def test_the_kernel_after_a_plan_is_the_table_the_plan_was_for():
    before = state(table(vs(servers=[WEB1, WEB2]), vs(OTHER, servers=[WEB1])))
    after = applied(
        before,
        [
            EditService(Service(KEY, "rr"), Service(KEY)),
            RemoveServer(KEY, WEB1),
            RemoveService(Service(OTHER)),
            RemoveVip(OTHER.vip),
        ],
    )
    assert after == state(table(vs(servers=[WEB2], scheduler="rr")))
    assert before == state(table(vs(servers=[WEB1, WEB2]), vs(OTHER, servers=[WEB1])))  # left as it was


def test_a_new_service_starts_with_the_servers_added_after_it():
    after = applied(state(), [AddVip(VIP), AddService(Service(KEY)), AddServer(KEY, WEB1)])
    assert after == state(table(vs(servers=[WEB1])))


def test_a_threshold_change_is_an_edit_in_place_and_says_both_thresholds():
    limited = RealServer(WEB2.addr, 8000, 1, Forward.NAT, "web2", upper_threshold=100, lower_threshold=60)
    ops = plan(table(vs(servers=(WEB1, limited))), state(table(vs())))
    assert ops == [EditServer(KEY, limited, WEB2)]
    assert ops[0].describe() == (
        "~ server TCP 1.2.3.4:8000 -> 10.0.0.3:8000 forward=nat->nat weight=1->1 "
        "upper_threshold=0->100 lower_threshold=0->60 (web2)"
    )
    assert AddServer(KEY, limited).describe() == (
        "+ server TCP 1.2.3.4:8000 -> 10.0.0.3:8000 nat weight=1 "
        "upper_threshold=100 lower_threshold=60 (web2)"
    )
    assert plan(table(vs(servers=(WEB1, limited))), state(table(vs(servers=(WEB1, limited))))) == []
