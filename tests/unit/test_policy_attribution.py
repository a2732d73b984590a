"""Only the provider's own outcomes count against it; the client's deadline is a censored sample."""

from __future__ import annotations

import pytest

from gateway.policy.attribution import Blame, blame, censored_latency_ms, retry_evidence
from gateway.policy.retry import FailureKind


@pytest.mark.parametrize(
    ("ok", "failure", "status", "flag", "expected"),
    [
        (True, None, None, None, Blame.PROVIDER_OK),
        (False, FailureKind.CONNECT, None, None, Blame.PROVIDER_FAILURE),
        (False, FailureKind.CONNECT, None, "connect", Blame.PROVIDER_FAILURE),
        (False, FailureKind.RESET, None, None, Blame.PROVIDER_FAILURE),
        (
            False,
            FailureKind.TIMEOUT,
            None,
            "ttft",
            Blame.PROVIDER_FAILURE,
        ),  # the provider's first-token limit
        (False, FailureKind.TIMEOUT, None, "per_try", Blame.PROVIDER_FAILURE),
        (False, FailureKind.STATUS, 503, None, Blame.PROVIDER_FAILURE),
        (False, FailureKind.STATUS, 500, None, Blame.PROVIDER_FAILURE),
        (False, FailureKind.TIMEOUT, None, "total", Blame.DEADLINE),  # the request's own deadline cut it
        (False, FailureKind.STATUS, 400, None, Blame.NEUTRAL),
        (False, FailureKind.STATUS, 429, None, Blame.NEUTRAL),
    ],
)
def test_who_is_to_blame(ok, failure, status, flag, expected):
    assert blame(ok, failure, status, flag) is expected


def test_a_deadline_shorter_than_the_provider_says_nothing_about_a_slower_estimate():
    assert censored_latency_ms(estimate_ms=300.0, waited_ms=150.0) is None  # "slower than 150": known


def test_a_deadline_longer_than_the_estimate_raises_it_to_at_least_that():
    assert censored_latency_ms(estimate_ms=100.0, waited_ms=400.0) == 400.0


@pytest.mark.parametrize(
    ("who", "status", "expected"),
    [
        (Blame.PROVIDER_OK, 200, False),
        (Blame.PROVIDER_FAILURE, 503, True),
        (Blame.NEUTRAL, 429, True),  # rate-limited: retrying there now fails too, so it is not free
        (Blame.NEUTRAL, 400, None),  # the request's fault: nothing about the provider
        (Blame.DEADLINE, None, None),  # the client's deadline: nothing either
    ],
)
def test_what_the_retry_budget_learns(who, status, expected):
    assert retry_evidence(who, status) is expected
