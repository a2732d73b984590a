"""Fallback chains: which failures move a request to the next model, and when to degrade up front."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum


class FallbackReason(StrEnum):
    """Values are the names used in ``fallback_on`` (and the metric's ``reason`` label)."""

    STATUS_5XX = "5xx"
    RATE_LIMITED = "429"
    TIMEOUT = "timeout"
    OVERLOAD = "overload"
    UNHEALTHY = "unhealthy"
    DEGRADE = "degrade"


def fallback_reason_for(status: int | None, kind: str | None) -> FallbackReason | None:
    """Map a model's final failure to a reason; None when a fallback would not help (e.g. a 400).

    ``kind`` is a FailureKind value ("connect-failure", "reset", "timeout", "status") or "overload" /
    "unhealthy". A connection that failed or was reset is reported to clients as a 5xx, so it counts as one.
    """
    if kind == "timeout" or status == 408:
        return FallbackReason.TIMEOUT
    if status == 429:
        return FallbackReason.RATE_LIMITED
    if status is not None and 500 <= status < 600:
        return FallbackReason.STATUS_5XX
    if kind in ("connect-failure", "reset", "protocol-error"):
        return FallbackReason.STATUS_5XX
    if kind == "overload":
        return FallbackReason.OVERLOAD
    if kind == "unhealthy":
        return FallbackReason.UNHEALTHY
    return None


def should_degrade(
    *,
    remaining_ms: float,
    when_remaining_ms_below: float | None,
    expected_ttft_ms: float | None,
    when_expected_exceeds_remaining: bool,
) -> bool:
    """Go straight to the first fallback: too little time left, or more than the model is expected to need.

    Without an estimate (``expected_ttft_ms`` None) the expectation rule cannot fire.
    """
    if when_remaining_ms_below is not None and remaining_ms < when_remaining_ms_below:
        return True
    return (
        when_expected_exceeds_remaining and expected_ttft_ms is not None and expected_ttft_ms > remaining_ms
    )


def find_fallback_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A loop in model -> fallbacks, as a path that ends where it starts ([A, B, A]); None without one.

    Names that are not keys are leaves (unknown names are reported elsewhere). Deterministic: the first
    loop found walking the models in order.
    """
    done: set[str] = set()
    for root in graph:
        if root in done:
            continue
        path: list[str] = [root]
        on_path = {root: 0}
        stack = [iter(graph.get(root, ()))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                del on_path[finished]
                done.add(finished)
                continue
            if nxt in on_path:
                return path[on_path[nxt] :] + [nxt]
            if nxt in done or nxt not in graph:
                continue
            on_path[nxt] = len(path)
            path.append(nxt)
            stack.append(iter(graph[nxt]))
    return None
