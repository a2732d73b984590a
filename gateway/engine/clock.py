"""The engine's time source, passed in: production reads the monotonic clock, tests move a fake one.

``Engine``, ``Exchange``, ``Attempt``, the relay, ``Alarms`` and ``StateSync`` read time only through a
``Clock`` (and ``StateSync`` the wall clock through a ``WallClock``), so a unit test drives a whole
exchange (hedge timers, first-token limits, backoff, stream watchdogs), or replicas' sync rounds, with
``tests/unit/fake_clock.py`` and no real sleep. A bound on a call is ``wait_for`` here, not ``asyncio``'s,
which times it on the loop's own clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

# WallClock is defined below the state layer, which takes it too (state/memory.py's expiry); the engine's here.
from gateway.telemetry.timing import WallClock as WallClock
from gateway.telemetry.timing import now as _monotonic_now


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn()`` on the event loop once ``now() >= when``."""
        ...


class RunningLoop:
    """The running event loop, asked of asyncio once: ``get_running_loop()`` (and ``current_task()``
    without a loop) costs a ``getpid()`` system call each time. A closed loop was a past run: asked again."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop


class MonotonicClock:
    """The production clock: ``telemetry.timing.now`` and the running event loop's timers."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop = RunningLoop()

    now = staticmethod(_monotonic_now)
    sleep = staticmethod(asyncio.sleep)

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        return self._loop.get().call_later(max(0.0, when - _monotonic_now()), fn)


MONOTONIC = MonotonicClock()

T = TypeVar("T")


async def wait_for(clock: Clock, aw: Awaitable[T], timeout_s: float) -> T:
    """``asyncio.wait_for`` timed on ``clock``: past ``timeout_s``, ``aw`` is cancelled and, once it has
    ended, ``TimeoutError`` raised. A cancel of the caller meanwhile stays a cancel."""
    task = asyncio.ensure_future(aw)
    cut = False

    def expire() -> None:
        nonlocal cut
        cut = task.cancel()  # False: it had ended already, and its outcome stands

    timer = clock.call_at(clock.now() + timeout_s, expire)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if cut and current is not None and not current.cancelling():
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
