"""``clock.wait_for``: a bound on a call timed on the engine's ``Clock`` (a ``FakeClock`` here), not the loop's."""

from __future__ import annotations

import asyncio

import pytest
from fake_clock import FakeClock

from gateway.engine.clock import wait_for


class Call:
    """A call that answers only when told to, and says whether it was cancelled."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[str] | None = None
        self.cancelled = False

    async def run(self) -> str:
        self.answer = asyncio.get_running_loop().create_future()
        try:
            return await self.answer
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_call_past_its_bound_on_the_clock_is_cancelled_and_timeout_error_raised() -> None:
    async def scenario() -> None:
        clock, call = FakeClock(), Call()
        waiting = asyncio.ensure_future(wait_for(clock, call.run(), 2.0))
        await _turns()
        clock.advance(1.99)
        await _turns()
        assert not waiting.done() and not call.cancelled
        clock.advance(0.01)
        with pytest.raises(TimeoutError):
            await waiting
        assert call.cancelled

    asyncio.run(scenario())


def test_an_answer_within_the_bound_is_returned_and_its_timer_disarmed() -> None:
    async def scenario() -> None:
        clock, call = FakeClock(), Call()
        waiting = asyncio.ensure_future(wait_for(clock, call.run(), 2.0))
        await _turns()
        assert clock.next_due() == pytest.approx(clock.t + 2.0)
        assert call.answer is not None
        call.answer.set_result("ok")
        assert await waiting == "ok"
        assert clock.next_due() is None

    asyncio.run(scenario())


def test_a_cancelled_caller_is_cancelled_not_timed_out_even_when_the_bound_passes_meanwhile() -> None:
    async def scenario() -> None:
        for bound_passes in (False, True):
            clock, call = FakeClock(), Call()
            waiting = asyncio.ensure_future(wait_for(clock, call.run(), 2.0))
            await _turns()
            waiting.cancel()
            if bound_passes:  # the timer fires in the same loop turn as the caller's cancel
                clock.advance(2.0)
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert call.cancelled and clock.next_due() is None

    asyncio.run(scenario())
