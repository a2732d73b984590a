"""Retry decisions: what is retriable, how long to back off, and whether this retry may happen now."""

from __future__ import annotations

import calendar
import math
import random
from email.utils import parsedate_tz
from enum import StrEnum
from typing import NamedTuple


class FailureKind(StrEnum):
    """Why an attempt failed; the values are the names used in ``retry_on``."""

    CONNECT = "connect-failure"
    RESET = "reset"
    TIMEOUT = "timeout"
    STATUS = "status"
    PROTOCOL = "protocol-error"  # the provider answered, but not in acceptable HTTP; retried as a "reset"


# 4xx says "your request is wrong": retrying it elsewhere gives the same answer. Except these.
_RETRIABLE_4XX = frozenset({408, 409, 429})
# str(status) without allocating on the hot path.
_STATUS_NAMES = tuple(str(i) for i in range(600))


def is_retriable(kind: FailureKind, status: int | None, retry_on: frozenset[str]) -> bool:
    """Whether ``retry_on`` (e.g. {"connect-failure", "reset", "timeout", "503", "5xx"}) covers this failure.

    A 4xx other than 408/409/429 is never retried, even if listed.
    """
    if kind is FailureKind.PROTOCOL:
        return "reset" in retry_on  # as Envoy's "reset" covers protocol errors
    if kind is not FailureKind.STATUS:
        return kind.value in retry_on
    if status is None or not 0 <= status < 600:
        return False
    if 400 <= status < 500 and status not in _RETRIABLE_4XX:
        return False
    return _STATUS_NAMES[status] in retry_on or (status >= 500 and "5xx" in retry_on)


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """``Retry-After`` as seconds from now (>= 0): delta-seconds or an HTTP-date; garbage -> None.

    Fractional seconds are accepted (some providers send them); a date in the past means 0.
    ``now_wall`` is wall-clock epoch seconds, because an HTTP-date is wall-clock time.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0.0 and math.isfinite(seconds) else None
    try:
        parts = parsedate_tz(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parts is None:
        return None
    try:
        # A date without a zone is taken as GMT, which is what HTTP-dates always are.
        at = calendar.timegm(parts[:9]) - (parts[9] or 0)
    except (OverflowError, ValueError):
        return None
    return max(0.0, float(at) - now_wall)


def full_jitter_backoff(retry_index: int, base_ms: float, max_ms: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``retry_index`` (0 = first): uniform(0, min(max, base * 2**i)) / 1000."""
    cap = min(max_ms, math.ldexp(base_ms, min(max(retry_index, 0), 60)))
    if cap <= 0.0:
        return 0.0
    return rng.uniform(0.0, cap) / 1000.0


class RetryVerdict(StrEnum):
    RETRY = "retry"
    FAILOVER = "failover"  # another deployment, healthy, takes the retry: not charged to the budget
    NOT_RETRIABLE = "not-retriable"
    LIMIT = "retry-limit"
    BUDGET = "budget-exhausted"
    HOPELESS = "hopeless"  # the target fails nearly everything: a retry would only add load
    DEADLINE = "deadline"
    RETRY_AFTER_TOO_LONG = "retry-after-exceeds-deadline"


class RetryDecision(NamedTuple):  # immutable, and ~5x cheaper to build than a frozen dataclass
    verdict: RetryVerdict
    delay_s: float = 0.0  # the wait before the retry starts (only meaningful for RETRY)

    @property
    def retry(self) -> bool:
        return self.verdict is RetryVerdict.RETRY


# Refusals carry no data: share one instance of each.
_NOT_RETRIABLE = RetryDecision(RetryVerdict.NOT_RETRIABLE)
_LIMIT = RetryDecision(RetryVerdict.LIMIT)
_BUDGET = RetryDecision(RetryVerdict.BUDGET)
_DEADLINE = RetryDecision(RetryVerdict.DEADLINE)
_RETRY_AFTER_TOO_LONG = RetryDecision(RetryVerdict.RETRY_AFTER_TOO_LONG)
_RETRY_NOW = RetryDecision(RetryVerdict.RETRY, 0.0)


def plan_retry(
    *,
    retries_done: int,
    max_retries: int,
    retriable: bool,
    retry_after_s: float | None,
    remaining_s: float,
    min_attempt_s: float,
    base_ms: float,
    max_ms: float,
    budget_ok: bool,
    rng: random.Random,
) -> RetryDecision:
    """Whether to retry a failed attempt and after how long; the first rule that refuses names the verdict.

    Order: not retriable, retry limit, a Retry-After that does not fit the deadline (the caller answers
    the 429 at once rather than burn the deadline), backoff that does not fit the deadline, budget.
    The budget is asked last so a refusal for another reason never counts as budget exhaustion.
    """
    if not retriable:
        return _NOT_RETRIABLE
    if retries_done >= max_retries:
        return _LIMIT
    if retry_after_s is not None:
        if retry_after_s + min_attempt_s > remaining_s:
            return _RETRY_AFTER_TOO_LONG
        delay = retry_after_s
    else:
        delay = full_jitter_backoff(retries_done, base_ms, max_ms, rng)
    if delay + min_attempt_s > remaining_s:
        return _DEADLINE
    if not budget_ok:
        return _BUDGET
    return _RETRY_NOW if delay == 0.0 else RetryDecision(RetryVerdict.RETRY, delay)
