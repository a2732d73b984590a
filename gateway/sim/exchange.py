"""One generation request in flight: timers release its bytes on schedule; a lost peer cancels it at once.

Timing model (all from t0, the moment the request was fully read):
  stream      token i is written at t0 + ttft + i * itl (the first write also carries the head and preface)
  non-stream  the whole answer is written at t0 + ttft + (tokens - 1) * itl
Timers (loop.call_at) rather than a task per request: cheaper, and cancelling is one call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gateway.sim.protocol import Connection
from gateway.sim.stats import Endpoint, Outcome
from gateway.sim.wire import Shape


class Phase(Enum):
    WAITING = "waiting"  # nothing sent yet (or only the Responses API's opening events)
    STREAMING = "streaming"
    DONE = "done"


@dataclass(slots=True)
class Plan:
    """Everything decided about a request when it arrived."""

    endpoint: Endpoint
    shape: Shape
    stream: bool
    tokens: int
    ttft_s: float
    itl_s: float
    stall: bool
    reset_after: int | None  # reset the connection after this many content tokens; None = never
    headers: bytes  # extra response header lines


class Exchange:
    __slots__ = (
        "conn",
        "loop",
        "plan",
        "rec",
        "on_end",
        "phase",
        "attached",
        "next",
        "first_at",
        "handle",
        "first_byte",
        "clock",
        "t0",
    )

    def __init__(
        self,
        conn: Connection,
        plan: Plan,
        rec: dict[str, Any],
        t0: float,
        on_end: Callable[[Exchange, Outcome], None],
        clock: Callable[[], float],
    ) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.plan = plan
        self.rec = rec
        self.on_end = on_end
        self.clock = clock  # wall clock for the stats' *_at fields
        self.phase = Phase.WAITING
        self.attached = False  # the connection waits for finish(); False while start() runs
        self.next = 0  # next content token to write
        self.t0 = t0
        self.first_at = t0 + plan.ttft_s
        self.handle: asyncio.TimerHandle | None = None
        self.first_byte = False

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def start(self) -> None:
        p = self.plan
        if p.stall:
            return  # never answer; only the peer going away ends it
        if p.stream:
            opening = p.shape.opening()
            if opening:
                self._write(opening, head=True)
            due = self.first_at
        else:
            due = self.first_at + max(0, p.tokens - 1) * p.itl_s
        if due <= self.loop.time():
            self._fire()
        else:
            self.handle = self.loop.call_at(due, self._fire)

    def cancel(self) -> None:
        """The peer closed the connection while this request was in flight."""
        if self.phase is Phase.DONE:
            return
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self._end(Outcome.CANCELLED)

    # -- internals ---------------------------------------------------------------------------------------
    def _fire(self) -> None:
        self.handle = None
        p = self.plan
        if not p.stream:
            if p.reset_after is not None:
                self._reset()  # a non-stream reset: the connection closes when the answer was due
                return
            body = p.shape.body()
            self._mark_first_byte()
            self.conn.respond(200, body, headers=p.headers + self._processing_ms())
            self._end(Outcome.OK)
            return
        self.phase = Phase.STREAMING
        preface = p.shape.preface()
        if p.reset_after == 0:
            self._write(preface, head=not self.first_byte)
            self._reset()
            return
        self._pump(preface)

    def _pump(self, prefix: bytes = b"") -> None:
        """Write every token that is due, then schedule the next one, reset, or finish."""
        self.handle = None
        if self.phase is Phase.DONE:
            return
        p = self.plan
        if self.conn.write_paused and not prefix:
            self.conn.on_resume = self._pump  # the peer is not reading: wait for it to drain
            return
        out = [prefix] if prefix else []
        stop = p.tokens if p.reset_after is None else min(p.reset_after, p.tokens)
        due = stop
        if p.itl_s > 0:  # tokens due by now (within half a millisecond); at least the next one
            due = min(
                stop, max(self.next + 1, int((self.loop.time() + 0.0005 - self.first_at) / p.itl_s) + 1)
            )
        if due > self.next:
            out.append(p.shape.tokens(self.next, due))
            self.next = due
        if self.next >= stop and p.reset_after is not None:
            self._write(b"".join(out), head=not self.first_byte)
            self._reset()
            return
        if self.next >= p.tokens:
            out.append(p.shape.closing())
            self._write(b"".join(out), head=not self.first_byte, last=True)
            self._end(Outcome.OK)
            return
        self._write(b"".join(out), head=not self.first_byte)
        self.handle = self.loop.call_at(self.first_at + self.next * p.itl_s, self._pump)

    def _write(self, data: bytes, *, head: bool = False, last: bool = False) -> None:
        self._mark_first_byte()
        self.conn.send(data, head=self.conn.stream_head(self.plan.headers) if head else b"", last=last)

    def _mark_first_byte(self) -> None:
        if not self.first_byte:
            self.first_byte = True
            self.rec["first_byte_at"] = self.clock()

    def _processing_ms(self) -> bytes:
        return b"openai-processing-ms: %d\r\n" % int((self.loop.time() - self.t0) * 1000)

    def _reset(self) -> None:
        self._end(Outcome.RESET)
        self.conn.drop()

    def _end(self, outcome: Outcome) -> None:
        self.phase = Phase.DONE
        self.on_end(self, outcome)
        if self.attached and outcome is not Outcome.CANCELLED and outcome is not Outcome.RESET:
            self.conn.finish()
