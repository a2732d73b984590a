"""One monotonic clock for every boundary, and the arithmetic that turns reads into durations.

Every boundary of an Exchange and of each Attempt is read once with ``now()``; all durations in the
access log and metrics are differences of those reads (never wall clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

# CLOCK_MONOTONIC, the same clock asyncio timers use (loop.time()), so deadlines and timings agree.
now = time.monotonic

# Epoch seconds (``time.time`` in production): only what is compared between processes reads it. Here, in
# the bottom layer, so the engine's sync and the state backends take the same type (engine/clock.py).
WallClock = Callable[[], float]


def ms(start: float | None, end: float | None) -> float | None:
    """Milliseconds between two reads, rounded to µs precision; None when either is missing."""
    if start is None or end is None:
        return None
    return round((end - start) * 1000000.0) / 1000.0


def round3(x: float) -> float:
    """``round(x, 3)`` by arithmetic: round() with digits formats the float through a decimal string,
    twice the cost, and the access log does it a dozen times per request. (Exact halves may round the
    other way.)"""
    return round(x * 1000.0) / 1000.0


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total time covered by possibly overlapping intervals (the critical path's upstream waits)."""
    if not intervals:
        return 0.0
    if len(intervals) == 1:
        a, b = intervals[0]
        return max(0.0, b - a)
    total = 0.0
    ordered = iter(sorted(intervals))
    cur_a, cur_b = next(ordered)
    for a, b in ordered:
        if a > cur_b:
            total += cur_b - cur_a
            cur_a, cur_b = a, b
        elif b > cur_b:
            cur_b = b
    total += cur_b - cur_a
    return max(0.0, total)


# The whole second last formatted, and its text: one strftime per second, not per request.
_iso_second: tuple[int, str] = (-1, "")
# ".000Z" to ".999Z": a format with a width costs ~1.9k instructions a call, the table's item nothing.
_MILLIS: Final = tuple(f".{n:03d}Z" for n in range(1000))


def iso_utc(wall: float) -> str:
    """Wall-clock timestamp for the access log's start_time (the only wall-clock read per request)."""
    global _iso_second
    sec = int(wall)
    second, text = _iso_second
    if second != sec:
        t = time.gmtime(sec)
        text = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        _iso_second = (sec, text)
    return text + _MILLIS[int(wall * 1000) % 1000]
