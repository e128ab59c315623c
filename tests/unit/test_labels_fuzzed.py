"""Fuzzed labels: arbitrary label dictionaries never break the parser, and
every label that is wrong on its own is reported exactly once, by name.
What "wrong" means comes from tests/unit/label_oracle.py, written from the
contract, never from the parser."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockerlb.core.labels import parse_labels
from tests.unit.label_oracle import KEYS, PREFIX, wrong_on_its_own

pytestmark = pytest.mark.unit
NAME = "fuzzed"

keys = st.sampled_from(sorted(KEYS | {"owner", "vipp", "Port", "weights", ""}))
groups = st.sampled_from(["", "admin", "b-2", "bad group", "a.b", "-x"])
labels_ = st.builds(lambda g, k: f"{PREFIX}{g}.{k}" if g else f"{PREFIX}{k}", groups, keys) | st.sampled_from(
    ["com.example.team", "dockerlbvip", "other.vip"]
)
values = st.sampled_from(
    ["1.2.3.4:8000", "[2001:db8::1]:80", "10.0.0.1:0", "80", "70000", "tcp", "udp", "sctp", "wlc", "rr",
     "nope", "nat", "dr", "tun", "3", "-1", "300", "lab", "", "true", "false", "maybe", "127.0.0.1:80",
     "http:/", "http:/health z", "http:x", "0.5", "2s", "nan", "204", " 7 ", "1_0", "1e3", "1.2.3.4: 80",
     "[fe80::1%eth0]:80", "[::ffff:127.0.0.1]:80", "240.0.0.1:80", "0.1.2.3:80", "http:/\u00e9", "front",
     "a b", "+3", "HTTP:/ok", "TCP", "UDP"]
) | st.text(max_size=24)  # fmt: skip


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(labels_, values, max_size=8))
def test_any_labels_give_one_named_problem_per_wrong_label_and_never_raise(labels):
    parsed = parse_labels(NAME, labels, PREFIX)  # raising anything fails the property

    named = [p.label for p in parsed.problems]
    assert all(p.container == NAME and p.reason for p in parsed.problems)
    assert set(named) <= set(labels), "a problem names a label the container does not have"
    assert len(named) == len(set(named)), f"a label reported twice: {named}"

    ours = {k: v for k, v in labels.items() if k.startswith(PREFIX)}
    top_enable = ours.get(f"{PREFIX}enable", "").lower()
    if top_enable in ("false", "no", "off", "0"):
        assert parsed.problems == () and parsed.specs == ()  # opted out: nothing is looked at
        return
    wrong = {label for label, value in ours.items() if wrong_on_its_own(label, value)}
    assert wrong <= set(named), f"wrong labels not reported: {wrong - set(named)}"
    if not parsed.problems:
        assert all(spec.key.port > 0 for spec in parsed.specs)
