"""Interrupt: one pending cancel per task, a reason that ranks, claimed in one place, outside cancels kept."""

from __future__ import annotations

import asyncio

from gateway.engine.interrupt import CancelReason, Interrupt


async def _waiting(
    started: asyncio.Event,
    seen: list[CancelReason | None],
    intr_box: list[Interrupt],
    claims: tuple[CancelReason, ...],
) -> str:
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        reason = intr_box[0].claim(*claims)
        seen.append(reason)
        if reason is None:
            raise
        return "claimed"
    return "not interrupted"


def _start(claims: tuple[CancelReason, ...]) -> tuple[asyncio.Task[str], Interrupt, list, asyncio.Event]:
    started, seen, box = asyncio.Event(), [], []
    task = asyncio.get_running_loop().create_task(_waiting(started, seen, box, claims))
    intr = Interrupt(task)
    box.append(intr)
    return task, intr, seen, started


def test_a_claimed_reason_is_consumed_and_the_task_carries_on() -> None:
    async def scenario() -> None:
        task, intr, seen, started = _start((CancelReason.FIRST_TOKEN_TIMEOUT,))
        await started.wait()
        intr.cancel(CancelReason.FIRST_TOKEN_TIMEOUT)
        assert await task == "claimed"
        assert seen == [CancelReason.FIRST_TOKEN_TIMEOUT] and intr.pending is None and task.cancelling() == 0

    asyncio.run(scenario())


def test_a_higher_reason_replaces_a_pending_one_without_a_second_cancel() -> None:
    async def scenario() -> None:
        task, intr, seen, started = _start((CancelReason.FIRST_TOKEN_TIMEOUT, CancelReason.CLIENT_GONE))
        await started.wait()
        intr.cancel(CancelReason.FIRST_TOKEN_TIMEOUT)
        intr.cancel(CancelReason.CLIENT_GONE)  # outranks: replaces
        intr.cancel(CancelReason.HEDGE_WON)  # ranks lower than CLIENT_GONE: ignored
        assert task.cancelling() == 1
        assert await task == "claimed" and seen == [CancelReason.CLIENT_GONE]

    asyncio.run(scenario())


def test_a_reason_the_handler_does_not_own_propagates() -> None:
    async def scenario() -> None:
        task, intr, seen, started = _start((CancelReason.FIRST_TOKEN_TIMEOUT,))
        await started.wait()
        intr.cancel(CancelReason.HEDGE_WON)
        await asyncio.wait([task])
        assert task.cancelled() and seen == [None]
        assert intr.pending is CancelReason.HEDGE_WON  # left for an outer handler to claim

    asyncio.run(scenario())


def test_a_cancel_from_outside_is_never_claimed() -> None:
    async def scenario() -> None:
        task, intr, seen, started = _start((CancelReason.FIRST_TOKEN_TIMEOUT,))
        await started.wait()
        intr.cancel(CancelReason.FIRST_TOKEN_TIMEOUT)
        task.cancel()  # the server, at the same time
        await asyncio.wait([task])
        assert task.cancelled() and seen == [None]

    asyncio.run(scenario())


def test_cancel_before_the_task_is_known_or_after_it_ended_does_nothing() -> None:
    async def scenario() -> None:
        intr = Interrupt(None)
        intr.cancel(CancelReason.RACE_LOST)
        assert intr.pending is None
        done = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        await done
        intr.task = done
        intr.cancel(CancelReason.RACE_LOST)
        assert intr.pending is None

    asyncio.run(scenario())
