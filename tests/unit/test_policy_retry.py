"""Retries: what is retriable, Retry-After, full-jitter backoff, and the order of refusals."""

from __future__ import annotations

import calendar
import random

import pytest

from gateway.policy.retry import (
    FailureKind,
    RetryVerdict,
    cooldown_s,
    full_jitter_backoff,
    is_retriable,
    parse_retry_after,
    retry_delay_s,
)

DEFAULT_RETRY_ON = frozenset({"connect-failure", "reset", "502", "503", "504", "429", "timeout"})


# ---------------------------------------------------------------- is_retriable


@pytest.mark.parametrize(
    ("kind", "status", "retry_on", "expected"),
    [
        (FailureKind.CONNECT, None, DEFAULT_RETRY_ON, True),
        (FailureKind.RESET, None, DEFAULT_RETRY_ON, True),
        (FailureKind.TIMEOUT, None, DEFAULT_RETRY_ON, True),
        (FailureKind.TIMEOUT, None, frozenset({"503"}), False),  # only what is listed
        (FailureKind.CONNECT, None, frozenset({"reset"}), False),
        (FailureKind.STATUS, 503, DEFAULT_RETRY_ON, True),
        (FailureKind.STATUS, 500, DEFAULT_RETRY_ON, False),  # 500 is not in the default list
        (FailureKind.STATUS, 500, frozenset({"5xx"}), True),
        (FailureKind.STATUS, 599, frozenset({"5xx"}), True),
        (FailureKind.STATUS, 429, DEFAULT_RETRY_ON, True),
        (FailureKind.STATUS, 429, frozenset({"5xx"}), False),  # "5xx" does not cover 429
        (FailureKind.STATUS, 408, frozenset({"408"}), True),
        (FailureKind.STATUS, 409, frozenset({"409"}), True),
        (FailureKind.STATUS, 400, frozenset({"400", "5xx"}), False),  # 4xx never, even if listed
        (FailureKind.STATUS, 404, frozenset({"404"}), False),
        (FailureKind.STATUS, 422, frozenset({"422"}), False),
        (FailureKind.STATUS, None, frozenset({"5xx"}), False),
        (FailureKind.STATUS, 200, frozenset({"200"}), True),  # odd config, but it is what was asked
        (FailureKind.STATUS, 700, frozenset({"5xx"}), False),  # nonsense status
    ],
)
def test_retriable_is_what_retry_on_lists_minus_client_errors(kind, status, retry_on, expected):
    assert is_retriable(kind, status, retry_on) is expected


# ---------------------------------------------------------------- Retry-After

NOW_WALL = float(calendar.timegm((2015, 10, 21, 7, 27, 0, 0, 0, 0)))  # Wed, 21 Oct 2015 07:27:00 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("1.5", 1.5),  # some providers send fractions
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),  # IMF-fixdate
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 60.0),  # RFC 850
        ("Wed Oct 21 07:28:00 2015", 60.0),  # asctime
        ("Wed, 21 Oct 2015 07:27:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:20:00 GMT", 0.0),  # in the past: retry now
    ],
)
def test_retry_after_as_seconds_or_http_date(value, expected):
    assert parse_retry_after(value, NOW_WALL) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", [None, "", "  ", "soon", "-1", "nan", "inf", "1e999", "0x10", "Wed, 99 Foo"]
)
def test_retry_after_garbage_is_ignored(value):
    assert parse_retry_after(value, NOW_WALL) is None


# ---------------------------------------------------------------- backoff


def test_full_jitter_backoff_stays_within_the_doubling_cap():
    rng = random.Random(1)
    for retry_index, cap_ms in [(0, 25), (1, 50), (2, 100), (3, 200), (4, 250), (10, 250)]:
        draws = [full_jitter_backoff(retry_index, 25, 250, rng) for _ in range(500)]
        assert min(draws) >= 0.0
        assert max(draws) <= cap_ms / 1000.0
        assert max(draws) > 0.9 * cap_ms / 1000.0  # it really uses the whole range ("full" jitter)
        assert sum(draws) / len(draws) == pytest.approx(cap_ms / 2000.0, rel=0.1)


def test_backoff_is_deterministic_for_a_seed_and_survives_absurd_retry_counts():
    a = [full_jitter_backoff(i, 25, 250, random.Random(7)) for i in range(5)]
    b = [full_jitter_backoff(i, 25, 250, random.Random(7)) for i in range(5)]
    assert a == b
    assert 0.0 <= full_jitter_backoff(10_000, 25, 250, random.Random(7)) <= 0.25
    assert full_jitter_backoff(0, 0, 250, random.Random(7)) == 0.0


def test_retry_after_is_a_floor_under_the_backoff_never_a_way_around_it():
    assert retry_delay_s(None, 0.02) == 0.02
    assert retry_delay_s(2.0, 0.02) == 2.0  # waited exactly
    assert retry_delay_s(0.0, 0.02) == 0.02  # "0", or a date past on a skewed clock: the usual backoff


def test_a_429_cools_a_deployment_down_for_its_retry_after_bounded_by_the_longest_ejection():
    assert cooldown_s(None, 300.0) == 1.0
    assert cooldown_s(30.0, 300.0) == 30.0
    assert cooldown_s(99_999_999_999.0, 300.0) == 300.0  # not until a restart


def test_verdict_values_are_the_names_used_in_metrics():
    assert [v.value for v in RetryVerdict] == [
        "retry",
        "failover",
        "not-retriable",
        "retry-limit",
        "budget-exhausted",
        "hopeless",
        "deadline",
        "retry-after-exceeds-deadline",
    ]
    assert [k.value for k in FailureKind] == [
        "connect-failure",
        "reset",
        "timeout",
        "status",
        "protocol-error",
    ]


def test_a_protocol_error_is_retried_when_resets_are():
    assert is_retriable(FailureKind.PROTOCOL, None, frozenset({"reset"}))
    assert not is_retriable(FailureKind.PROTOCOL, None, frozenset({"connect-failure", "timeout", "5xx"}))
