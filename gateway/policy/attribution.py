"""Whose fault an attempt's outcome was: only the provider's own outcomes may count against it.

Outlier ejection, the retry budget's failure rates and latency estimates are the provider's record.
A request's deadline (``x-gateway-timeout-ms``, the SDK's ``x-stainless-timeout``, the model's
``total_ms``), a client that hung up and a client's bad request say nothing about the provider: fed
in, a client with a short deadline would get a healthy provider ejected for everyone.
"""

from __future__ import annotations

from enum import StrEnum

from gateway.policy.retry import FailureKind


class Blame(StrEnum):
    PROVIDER_OK = "provider-ok"  # a usable answer
    PROVIDER_FAILURE = "provider-failure"  # connect failure, reset, provider timeout, 5xx, malformed answer
    DEADLINE = "deadline"  # the request's own deadline cut the attempt: censored, "slower than X"
    NEUTRAL = "neutral"  # a 4xx (429 included): the request or the caller's quota, not the provider's health


# The timeout flag an attempt carries when the request's deadline, not a provider limit, bounded it.
DEADLINE_FLAG = "total"


def blame(ok: bool, failure: FailureKind | None, status: int | None, timeout_flag: str | None) -> Blame:
    """Classify one finished attempt (a cancelled one, by a hedge or a client disconnect, is never fed)."""
    if ok:
        return Blame.PROVIDER_OK
    if failure is FailureKind.TIMEOUT and timeout_flag == DEADLINE_FLAG:
        return Blame.DEADLINE
    if failure is FailureKind.STATUS and status is not None and status < 500:
        return Blame.NEUTRAL
    return Blame.PROVIDER_FAILURE


def retry_evidence(who: Blame, status: int | None) -> bool | None:
    """What an outcome tells the retry budget about "would a retry there succeed": True (no), False
    (yes), None (nothing). Like the provider's record, except that a 429 says a retry there now would
    fail too: a provider shedding load must not be retried harder (LiteLLM's 429 storms)."""
    if who is Blame.PROVIDER_FAILURE:
        return True
    if who is Blame.PROVIDER_OK:
        return False
    if who is Blame.NEUTRAL and status == 429:
        return True
    return None


def censored_latency_ms(estimate_ms: float, waited_ms: float) -> float | None:
    """What an attempt cut after ``waited_ms`` tells a latency estimate: only "at least this slow".

    When the estimate is already above it, nothing (the sample is not a measurement, and feeding it
    would pull a healthy estimate down); when the estimate is below, the estimate is known to be too
    low and may be raised to ``waited_ms``.
    """
    return waited_ms if waited_ms > estimate_ms else None
