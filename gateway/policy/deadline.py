"""The request deadline: the earliest of the configured total, the client's header and the SDK's timeout."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import NamedTuple


class DeadlineSource(StrEnum):
    """Which limit set the deadline (named in the 504 and the access log)."""

    TOTAL = "total"
    CLIENT = "x-gateway-timeout-ms"
    SDK = "x-stainless-timeout"
    SDK_READ = "x-stainless-read-timeout"  # what the Python SDK sends: its read timeout, in seconds


# An SDK's timeout: it bounds the wait for the response to start, not how long a stream may run.
SDK_SOURCES = frozenset({DeadlineSource.SDK, DeadlineSource.SDK_READ})


class Deadline(NamedTuple):  # immutable, and ~5x cheaper to build than a frozen dataclass
    expires_at: float  # monotonic seconds: when the gateway answers
    source: DeadlineSource
    # An SDK gives up at its own timeout: the gateway answers this much earlier, so the SDK reads the
    # gateway's 504 (which says what happened and that a retry cannot help) instead of timing out blind.
    margin_s: float = 0.0

    def remaining(self, now: float) -> float:
        """Seconds left; negative once the deadline has passed."""
        return self.expires_at - now


_BAD_CLIENT_HEADER = "x-gateway-timeout-ms: must be a positive number"


def _positive(raw: str) -> float | None:
    try:
        v = float(raw)
    except ValueError:
        return None
    return v if v > 0.0 and math.isfinite(v) else None


def sdk_margin_s(timeout_s: float, margin_ms: float) -> float:
    """How much earlier than an SDK's ``timeout_s`` the gateway answers: ``margin_ms``, at most a third."""
    m = margin_ms / 1000.0
    q = timeout_s / 3.0
    return m if m < q else q


def resolve_deadline(
    now: float,
    total_ms: float,
    client_ms: str | None,
    sdk_timeout_s: str | None,
    sdk_read_timeout_s: str | None = None,
    sdk_margin_ms: float = 0.0,
) -> Deadline:
    """The earliest of ``total_ms``, ``x-gateway-timeout-ms`` (ms) and the SDK's timeout (s), one behaviour
    for all: the gateway answers its deadline with a 504 saying which limit fired.

    The SDK's timeout is ``x-stainless-timeout`` (or, when absent, the Python SDK's
    ``x-stainless-read-timeout``); since the SDK stops reading at that moment, the gateway answers
    ``sdk_margin_s`` earlier. A malformed client header is the caller's mistake and raises ValueError
    (answered with a 400); a malformed SDK header comes from code the client may not control, so it is
    ignored. Ties keep the first source in the order total, client, SDK.
    """
    best_s = total_ms / 1000.0
    source = DeadlineSource.TOTAL
    if client_ms is not None:
        v = _positive(client_ms)
        if v is None:
            raise ValueError(_BAD_CLIENT_HEADER)
        if v / 1000.0 < best_s:
            best_s, source = v / 1000.0, DeadlineSource.CLIENT
    sdk_source = DeadlineSource.SDK
    if sdk_timeout_s is None and sdk_read_timeout_s is not None:
        sdk_timeout_s, sdk_source = sdk_read_timeout_s, DeadlineSource.SDK_READ
    if sdk_timeout_s is not None:
        v = _positive(sdk_timeout_s)
        if v is not None and v < best_s:
            margin = sdk_margin_s(v, sdk_margin_ms)
            return Deadline(now + v - margin, sdk_source, margin)
    return Deadline(now + best_s, source)


def attempt_timeout(
    deadline: Deadline, now: float, per_try_ms: float, min_attempt_ms: float = 50.0
) -> float | None:
    """Seconds one attempt may take: min(per-try, time left); None when too little is left to start one.

    ``per_try_ms <= 0`` means no per-try limit (the deadline alone bounds the attempt).
    """
    remaining = deadline.expires_at - now
    if remaining <= 0.0 or remaining * 1000.0 < min_attempt_ms:
        return None
    if per_try_ms > 0.0:
        per_try_s = per_try_ms / 1000.0
        if per_try_s < remaining:
            return per_try_s
    return remaining
