"""Retry decisions: what is retriable, how long to back off, and whether this retry may happen now."""

from __future__ import annotations

import calendar
import math
import random
from email.utils import parsedate_tz
from enum import StrEnum


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


def cooldown_s(retry_after_s: float | None, longest_s: float) -> float:
    """How long routing passes by a deployment that answered 429: its Retry-After (1 s without one), at most
    ``longest_s`` (the model's outlier.max_ejection_s), so "come back in a century" cannot keep it out until
    a restart."""
    return min(retry_after_s if retry_after_s is not None else 1.0, longest_s)


def retry_delay_s(retry_after_s: float | None, backoff_s: float) -> float:
    """The wait before retrying the deployment that failed: its Retry-After, but never less than the backoff a
    provider without one gets (a Retry-After of 0, or a date already past on a skewed clock, is no reason to
    retry a rate-limited provider harder)."""
    return backoff_s if retry_after_s is None else max(retry_after_s, backoff_s)


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
