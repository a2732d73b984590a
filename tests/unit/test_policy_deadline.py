"""Deadlines: the earliest of total, x-gateway-timeout-ms and x-stainless-timeout; per-attempt time."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from gateway.policy.deadline import Deadline, DeadlineSource, attempt_timeout, resolve_deadline


def test_without_headers_the_configured_total_is_the_deadline():
    clock = FakeClock()
    d = resolve_deadline(clock(), 30_000, None, None)
    assert d == Deadline(clock() + 30.0, DeadlineSource.TOTAL)
    assert d.remaining(clock()) == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("total_ms", "client_ms", "sdk_s", "expected_s", "source"),
    [
        (30_000, "400", "600", 0.4, DeadlineSource.CLIENT),  # voice agent shortens the turn
        (30_000, "60000", "600", 30.0, DeadlineSource.TOTAL),  # a client may shorten, never lengthen
        (30_000, "5000", "2.5", 2.5, DeadlineSource.SDK),  # openai SDK's timeout=2.5
        (30_000, None, "10", 10.0, DeadlineSource.SDK),
        (1_000, "1000", "1", 1.0, DeadlineSource.TOTAL),  # ties keep the configured total
        (30_000, "2000", "2", 2.0, DeadlineSource.CLIENT),  # ties between headers keep the explicit one
    ],
)
def test_the_earliest_of_the_three_limits_wins_and_is_named(total_ms, client_ms, sdk_s, expected_s, source):
    clock = FakeClock()
    d = resolve_deadline(clock(), total_ms, client_ms, sdk_s)
    assert d.source is source
    assert d.expires_at == pytest.approx(clock() + expected_s)


@pytest.mark.parametrize("bad", ["abc", "0", "-5", "", "nan", "inf", "1e999", "12ms"])
def test_a_malformed_client_header_is_a_bad_request(bad):
    with pytest.raises(ValueError, match="^x-gateway-timeout-ms: must be a positive number$"):
        resolve_deadline(0.0, 30_000, bad, None)


@pytest.mark.parametrize("bad", ["abc", "0", "-1", "", "nan", "inf", "None"])
def test_a_malformed_sdk_header_is_ignored_because_the_client_may_not_control_it(bad):
    d = resolve_deadline(0.0, 30_000, None, bad)
    assert d == Deadline(30.0, DeadlineSource.TOTAL)


def test_header_whitespace_and_fractions_are_accepted():
    d = resolve_deadline(0.0, 30_000, " 250.5 ", None)
    assert d.expires_at == pytest.approx(0.2505)


def test_remaining_goes_negative_once_the_deadline_has_passed():
    clock = FakeClock()
    d = resolve_deadline(clock(), 1_000, None, None)
    clock.advance(1.25)
    assert d.remaining(clock()) == pytest.approx(-0.25)


def test_an_attempt_gets_the_per_try_limit_while_plenty_of_time_is_left():
    clock = FakeClock()
    d = resolve_deadline(clock(), 30_000, None, None)
    assert attempt_timeout(d, clock(), per_try_ms=5_000) == pytest.approx(5.0)


def test_an_attempt_gets_only_the_time_left_near_the_deadline():
    clock = FakeClock()
    d = resolve_deadline(clock(), 30_000, "1000", None)
    clock.advance(0.7)
    assert attempt_timeout(d, clock(), per_try_ms=5_000) == pytest.approx(0.3)


def test_no_attempt_starts_with_less_than_the_minimum_left():
    clock = FakeClock()
    d = resolve_deadline(clock(), 1_000, None, None)
    clock.advance(0.96)  # 40 ms left, minimum 50
    assert attempt_timeout(d, clock(), per_try_ms=5_000) is None
    assert attempt_timeout(d, clock(), per_try_ms=5_000, min_attempt_ms=30.0) == pytest.approx(0.04)


def test_exactly_the_minimum_left_may_still_start():
    d = Deadline(1.0, DeadlineSource.TOTAL)
    assert attempt_timeout(d, 0.95, per_try_ms=5_000, min_attempt_ms=50.0) == pytest.approx(0.05)


def test_no_attempt_after_the_deadline_even_without_a_minimum():
    d = Deadline(1.0, DeadlineSource.TOTAL)
    assert attempt_timeout(d, 1.0, per_try_ms=5_000, min_attempt_ms=0.0) is None
    assert attempt_timeout(d, 2.0, per_try_ms=5_000, min_attempt_ms=0.0) is None


def test_a_zero_per_try_limit_means_the_deadline_alone_bounds_the_attempt():
    d = Deadline(10.0, DeadlineSource.TOTAL)
    assert attempt_timeout(d, 4.0, per_try_ms=0.0) == pytest.approx(6.0)


def test_an_sdk_timeout_is_answered_early_enough_for_the_sdk_to_read_it():
    d = resolve_deadline(100.0, 300_000, None, "2.5", sdk_margin_ms=50.0)
    assert d.source is DeadlineSource.SDK and d.margin_s == 0.05
    assert d.expires_at == pytest.approx(100.0 + 2.45)


def test_the_margin_never_takes_more_than_a_third_of_a_short_sdk_timeout():
    d = resolve_deadline(0.0, 300_000, None, "0.15", sdk_margin_ms=100.0)
    assert d.margin_s == pytest.approx(0.05) and d.expires_at == pytest.approx(0.1)


def test_the_python_sdks_read_timeout_is_its_deadline_when_no_other_is_sent():
    d = resolve_deadline(0.0, 300_000, None, None, "0.4", sdk_margin_ms=50.0)
    assert d.source is DeadlineSource.SDK_READ and d.expires_at == pytest.approx(0.35)
    assert (
        resolve_deadline(0.0, 300_000, None, "0.3", "0.4").source is DeadlineSource.SDK
    )  # x-stainless-timeout first


def test_a_client_header_shorter_than_the_sdk_timeout_is_answered_on_time():
    d = resolve_deadline(0.0, 300_000, "100", None, "0.4", sdk_margin_ms=50.0)
    assert d == Deadline(0.1, DeadlineSource.CLIENT)
