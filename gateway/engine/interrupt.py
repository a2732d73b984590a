"""One way to cancel what a task is waiting for, with a reason, read in one place.

Several sources stop the work a request's task is doing: the client leaving, shutdown, the first-token
limit, a hedge that won the race, a loser of the race, the stream's idle and hard limits. Each calls
``Interrupt.cancel(reason)``; the task sees ``CancelledError`` at its current ``await``, and the code
that handles one kind of interrupt asks ``claim(reasons)``: the reason when it is one of those (the
cancel is then consumed), else None, and the handler re-raises for an outer one to claim.

A task has one ``Interrupt``: the exchange's own (``Exchange.cancel``) for the request task, where the
first attempt, the relay and the race run; one per hedge task. Only one cancel is pending at a time:
a later reason only replaces a pending one that ranks lower (the client leaving outranks all), so a
pending cancel is never delivered twice. A cancel from outside (``task.cancel()`` by the server) is
never claimed: ``claim`` sees the task's cancel count above what it set and lets it propagate.
"""

from __future__ import annotations

import asyncio
from enum import IntEnum


class CancelReason(IntEnum):
    """Why a task was interrupted; a higher value outranks a lower one when both are pending."""

    FIRST_TOKEN_TIMEOUT = 1  # the attempt's first-token (or per-try, or deadline) limit ran out
    STREAM_IDLE = 2  # the committed stream sent nothing for idle_ms
    STREAM_HARD_END = 3  # the committed stream reached per_try_ms or the request deadline
    HEDGE_WON = 4  # another attempt of the race has its first token: stop waiting for this one
    RACE_LOST = 5  # this attempt's race was won by another (or is over): it is a loser
    DRAIN = 6  # the gateway is shutting down: the request is answered 503 draining (LR), or its stream ended
    CLIENT_GONE = 7  # the client disconnected: nothing is worth finishing


class Interrupt:
    __slots__ = ("task", "pending", "_base")

    def __init__(self, task: asyncio.Task | None) -> None:
        self.task = task  # None until known (a hedge's task is created after its coroutine)
        self.pending: CancelReason | None = None
        self._base = task.cancelling() if task is not None else 0

    def cancel(self, reason: CancelReason) -> None:
        pending = self.pending
        if pending is not None:
            if reason > pending:
                self.pending = reason  # already on its way: only the reason changes
            return
        task = self.task
        if task is None or task.done():
            return
        self.pending = reason
        task.cancel()

    def claim(self, *reasons: CancelReason) -> CancelReason | None:
        """In an ``except CancelledError``: the pending reason if it is one of ``reasons`` (consumed, the task
        un-cancelled), else None (re-raise: an outer handler, or the server, owns this cancel)."""
        reason = self.pending
        task = self.task
        if reason is None or reason not in reasons or task is None:
            return None
        self.pending = None
        if task.uncancel() > self._base:  # cancelled from outside too: that one still stands
            return None
        return reason
