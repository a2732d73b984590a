"""Fallbacks: which final failures move to the next model, degrading before the deadline, loop checks."""

from __future__ import annotations

import pytest

from gateway.policy.fallback import FallbackReason, fallback_reason_for, find_fallback_cycle, should_degrade


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (503, "status", FallbackReason.STATUS_5XX),
        (500, "status", FallbackReason.STATUS_5XX),
        (504, "status", FallbackReason.STATUS_5XX),
        (429, "status", FallbackReason.RATE_LIMITED),
        (408, "status", FallbackReason.TIMEOUT),
        (None, "timeout", FallbackReason.TIMEOUT),
        (None, "connect-failure", FallbackReason.STATUS_5XX),  # the client would have seen a 502
        (None, "reset", FallbackReason.STATUS_5XX),
        (None, "overload", FallbackReason.OVERLOAD),
        (None, "unhealthy", FallbackReason.UNHEALTHY),
        (400, "status", None),  # the request is wrong; another model will not fix it
        (401, "status", None),
        (404, "status", None),
        (None, None, None),
    ],
)
def test_final_failures_map_to_fallback_on_names(status, kind, expected):
    assert fallback_reason_for(status, kind) is expected


def test_reason_values_are_the_fallback_on_names():
    assert {r.value for r in FallbackReason} == {"5xx", "429", "timeout", "overload", "unhealthy", "degrade"}


def degrade(**overrides) -> bool:
    kw = dict(
        remaining_ms=400.0,
        when_remaining_ms_below=None,
        expected_ttft_ms=None,
        when_expected_exceeds_remaining=False,
    )
    kw.update(overrides)
    return should_degrade(**kw)


def test_without_degrade_config_never_degrade():
    assert not degrade(remaining_ms=1.0, expected_ttft_ms=10_000.0)


def test_degrade_when_less_than_the_configured_time_is_left():
    assert degrade(remaining_ms=299.0, when_remaining_ms_below=300.0)
    assert not degrade(remaining_ms=300.0, when_remaining_ms_below=300.0)


def test_degrade_when_the_model_is_expected_to_need_more_than_is_left():
    # Voice turn: 400 ms left, model A's first token usually takes 1 s: go to the small model now.
    assert degrade(expected_ttft_ms=1000.0, when_expected_exceeds_remaining=True)
    assert not degrade(expected_ttft_ms=350.0, when_expected_exceeds_remaining=True)
    assert not degrade(expected_ttft_ms=1000.0, when_expected_exceeds_remaining=False)


def test_no_estimate_means_no_expectation_based_degrade():
    assert not degrade(expected_ttft_ms=None, when_expected_exceeds_remaining=True)


def test_either_rule_is_enough():
    assert degrade(
        remaining_ms=100.0,
        when_remaining_ms_below=200.0,
        expected_ttft_ms=50.0,
        when_expected_exceeds_remaining=True,
    )


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"A": ["B"], "B": []}, None),
        ({"A": ["B"], "B": ["A"]}, ["A", "B", "A"]),
        ({"A": ["B"], "B": ["C"], "C": ["D"], "D": ["B"]}, ["B", "C", "D", "B"]),
        ({"A": ["A"]}, ["A", "A"]),
        ({"A": ["B", "C"], "B": ["D"], "C": ["D"], "D": []}, None),  # a diamond is not a loop
        ({"A": ["ghost"], "B": ["A"]}, None),  # unknown names are leaves (reported elsewhere)
        ({"X": [], "A": ["C"], "B": ["C"], "C": ["B"]}, ["C", "B", "C"]),
        ({}, None),
    ],
)
def test_fallback_loops_are_found_as_a_path(graph, cycle):
    assert find_fallback_cycle(graph) == cycle


def test_a_long_chain_does_not_hit_the_recursion_limit():
    graph = {f"m{i}": [f"m{i + 1}"] for i in range(5000)}
    assert find_fallback_cycle(graph) is None
    graph["m5000"] = ["m0"]
    assert len(find_fallback_cycle(graph)) == 5002
