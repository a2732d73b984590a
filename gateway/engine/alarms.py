"""Many one-shot deadlines on one loop timer.

Every request arms deadlines that almost never fire: the first-token timeout, the hedge delay, a
stream's idle and hard limits. ``asyncio.timeout()`` or ``loop.call_at()`` per deadline allocates a
timer handle and starts and stops an event-loop timer each time (about 3 % of a proxied request's
instructions, measured). Here arming is a heap push and disarming forgets the callback; one loop
timer sleeps until the earliest live deadline. Forgotten entries leave the heap when they reach its
head, or all at once when they outnumber the live ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from itertools import count
from typing import Final

from gateway.engine.clock import MONOTONIC, Clock, Timer

log = logging.getLogger("llmgw")

# The loop's own timer may wake up to a millisecond early (uvloop keeps time in whole ms): what is due
# within this slack fires now rather than costing another wake-up.
SLACK_S: Final = 0.001
_COMPACT_MIN: Final = 256  # below this many forgotten entries, never rebuild the heap

Alarm = list  # [when, seq, callback or None once fired or cancelled]: compares by (when, seq) only


class Alarms:
    """``at(when, fn)`` calls ``fn()`` on the loop at ``when`` (``clock.now()`` time), unless ``cancel``-led
    first. Use from the event loop's thread only."""

    __slots__ = ("_clock", "_now", "_heap", "_seq", "_timer", "_timer_at", "_cancelled")

    def __init__(self, clock: Clock = MONOTONIC) -> None:
        self._clock = clock
        self._now = clock.now
        self._heap: list[Alarm] = []
        self._seq = count()
        self._timer: Timer | None = None
        self._timer_at: float | None = None
        self._cancelled = 0

    def at(self, when: float, fn: Callable[[], None]) -> Alarm:
        alarm = [when, next(self._seq), fn]
        heappush(self._heap, alarm)
        if self._timer_at is None or when < self._timer_at:
            self._wake_at(when)
        return alarm

    def cancel(self, alarm: Alarm | None) -> None:
        if alarm is None or alarm[2] is None:
            return
        alarm[2] = None
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
            self._heap = [a for a in self._heap if a[2] is not None]
            heapify(self._heap)
            self._cancelled = 0

    def __len__(self) -> int:
        """Live (armed, not yet fired or cancelled) alarms."""
        return len(self._heap) - self._cancelled

    def _wake_at(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        heap = self._heap
        due = self._now() + SLACK_S
        while heap:
            alarm = heap[0]
            fn = alarm[2]
            if fn is None:
                heappop(heap)
                self._cancelled -= 1
                continue
            if alarm[0] > due:
                break
            heappop(heap)
            alarm[2] = None
            try:
                fn()
            except Exception:  # one broken callback must not strand the others
                log.exception("alarm callback failed")
            heap = self._heap  # a callback that cancels may have compacted it
        if heap and (self._timer_at is None or heap[0][0] < self._timer_at):
            self._wake_at(heap[0][0])  # the head is live: cancelled ones were popped above
