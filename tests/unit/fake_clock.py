"""A monotonic clock the test moves by hand.

Policies take ``now`` as a float, so calling the clock is all they need. The engine takes a ``Clock``
(gateway/engine/clock.py): ``now()``, ``sleep()`` and ``call_at()`` here run on this clock's time, and
``advance()`` fires what falls due, in time order, so no test sleeps for real.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


class FakeTimer:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn = fn

    def cancel(self) -> None:
        self.fn = None


@dataclass
class FakeClock:
    t: float = 1000.0  # not 0, so "never happened" (0.0) and "now" differ
    _timers: list[tuple[float, int, FakeTimer]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def __call__(self) -> float:
        return self.t

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, fn: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(fn)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        self.call_at(self.t + seconds, wake)
        await fut

    def next_due(self) -> float | None:
        """When the earliest live timer is due (None: nothing scheduled)."""
        while self._timers and self._timers[0][2].fn is None:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def advance(self, seconds: float) -> float:
        """Move time on by ``seconds``, firing every timer that falls due on the way, each at its time."""
        end = self.t + seconds
        while True:
            due = self.next_due()
            if due is None or due > end:
                break
            _, _, timer = heapq.heappop(self._timers)
            self.t = max(self.t, due)
            fn, timer.fn = timer.fn, None
            fn()
        self.t = end
        return self.t
