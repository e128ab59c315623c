"""What one container may ask for is bounded, and a problem never quotes a
whole label: literal expected problems."""

import pytest

from dockerlb.core.labels import LabelProblem, Limits, parse_labels

pytestmark = pytest.mark.unit


def test_a_value_longer_than_the_limit_is_one_problem_and_nothing_is_parsed():
    parsed = parse_labels("big", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.scheduler": "x" * 2000})
    assert parsed.specs == ()
    assert parsed.problems == (
        LabelProblem("big", "dockerlb.scheduler", "value is 2000 characters; at most 1024"),
    )


def test_a_label_name_longer_than_the_limit_is_shown_cut_short():
    name = "dockerlb." + "n" * 1100
    (problem,) = parse_labels("big", {name: "1"}).problems
    assert str(problem) == (
        "container 'big': label '" + "dockerlb." + "n" * 51 + "'... (1109 characters): "
        "label name is 1109 characters; at most 1024; container skipped"
    )


def test_a_bad_value_is_quoted_only_in_part():
    (problem,) = parse_labels("w", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.weight": "9" * 70}).problems
    assert (
        problem.reason == "weight must be a whole number 0..65535, got '" + "9" * 60 + "'... (70 characters)"
    )


def test_more_named_groups_than_the_limit_is_one_problem_naming_the_first_group_over():
    labels = {f"dockerlb.a{i:02}.vip": f"10.9.0.{i + 1}:80" for i in range(17)}
    parsed = parse_labels("many", labels)
    assert parsed.specs == ()
    assert parsed.problems == (
        LabelProblem("many", "dockerlb.a16.*", "17 named groups; at most 16 (--max-groups)"),
    )


def test_more_vips_than_the_limit_is_one_problem_naming_the_first_vip_over():
    labels = {"dockerlb.vip": "10.9.0.1:80", "dockerlb.b.vip": "10.9.0.2:80", "dockerlb.c.vip": "10.9.0.3:80"}
    parsed = parse_labels("vips", labels, limits=Limits(vips=2))
    assert parsed.specs == ()
    assert parsed.problems == (LabelProblem("vips", "dockerlb.vip", "3 VIPs; at most 2 (--max-vips)"),)


def test_sixteen_groups_and_sixteen_vips_are_within_the_limits():
    labels = {f"dockerlb.a{i:02}.vip": f"10.9.0.{i + 1}:80" for i in range(16)}
    parsed = parse_labels("ok", labels)
    assert parsed.problems == ()
    assert len(parsed.specs) == 16


def test_the_owner_label_names_the_group_and_is_no_service_key():
    parsed = parse_labels("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.owner": "team-a"})
    assert parsed.problems == ()
    assert parsed.owner == "team-a"
    assert len(parsed.specs) == 1


def test_an_owner_that_is_not_a_name_is_a_problem():
    (problem,) = parse_labels("web", {"dockerlb.vip": "1.2.3.4:80", "dockerlb.owner": "a b"}).problems
    assert problem == LabelProblem(
        "web", "dockerlb.owner", "expected a name (letters, digits, _ . -; 1-63), got 'a b'"
    )


def test_owner_inside_a_named_group_is_an_unknown_label():
    (problem,) = parse_labels("web", {"dockerlb.x.vip": "1.2.3.4:80", "dockerlb.x.owner": "a"}).problems
    assert problem.label == "dockerlb.x.owner"
    assert problem.reason.startswith("unknown label; known keys: owner, announce_min, check, check_fall")
