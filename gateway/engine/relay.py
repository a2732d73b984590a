"""Relay a committed stream downstream, chunk by chunk, as it arrives (zero buffering).

Bounded by the idle timeout between chunks, the attempt's per-try limit and the request deadline;
when any fires, or the upstream breaks mid-stream, the client gets a final SSE error event instead
of a silent cut.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.engine.alarms import SLACK_S, Alarms
from gateway.engine.sse import UsageTail, error_event
from gateway.telemetry.timing import now

if TYPE_CHECKING:
    from gateway.engine.attempt import Attempt
    from gateway.engine.exchange import Exchange

SSE_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


async def relay_stream(ex: Exchange, w: Attempt, send: Any) -> None:
    dep = w.dep
    headers = ex._response_headers(w, "text/event-stream; charset=utf-8", None)
    headers.extend(SSE_HEADERS)
    ex.status = 200
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    first = b"".join(w.chunks) if len(w.chunks) != 1 else w.chunks[0]
    w.chunks = []
    await send({"type": "http.response.body", "body": first, "more_body": True})
    ex.t_first_sent = now()
    sent = len(first)
    usage = UsageTail()
    usage.feed(first)

    # The hard end: the attempt's per-try limit or the request deadline, whichever is first.
    per_try_end = w.t_start + dep.per_try_s
    hard_end = min(per_try_end, ex.deadline.expires_at)
    hard_flag = "per_try" if per_try_end <= ex.deadline.expires_at else "total"
    idle = dep.idle_s
    content = w.resp.content
    failure: tuple[str, str, str] | None = None  # (flag, timeout_flag, message)
    watchdog = _Watchdog(idle, hard_end, ex.engine.alarms, ex.task)
    try:
        while True:
            chunk = await content.readany()
            watchdog.last = now()
            if not chunk:
                break
            usage.feed(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
    except asyncio.CancelledError:
        if not watchdog.fired:
            raise  # the client left (or shutdown): not ours to handle
        ex.task.uncancel()
        if watchdog.fired == "hard":
            flag = "DT" if hard_flag == "total" else "UT"
            limit = "the request deadline" if hard_flag == "total" else f"per_try_ms={dep.cfg.timeouts.per_try_ms:.0f}"
            failure = (flag, hard_flag, f"Stream stopped: {limit} reached.")
        else:
            failure = ("UT", "idle", f"Stream stopped: deployment '{dep.id}' sent nothing for "
                                     f"idle_ms={dep.cfg.timeouts.idle_ms:.0f}.")
    except (aiohttp.ClientError, ConnectionError, OSError) as exc:
        failure = ("UC", None, f"Stream stopped: deployment '{dep.id}' broke the stream ({type(exc).__name__}).")
    finally:
        watchdog.stop()
    w.t_end = now()
    if failure is not None:
        flag, tflag, message = failure
        w.abort()
        ex.flags.append(flag)
        ex.timeout_flag = tflag
        typ, code = ("timeout_error", "timeout") if tflag else ("server_error", "upstream_reset")
        ev = error_event(message, typ, code)
        await send({"type": "http.response.body", "body": ev, "more_body": True})
        sent += len(ev)
    else:
        w.resp.release()
        w.released = True
    ex.closing = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    ex.t_last_sent = now()
    ex.bytes_sent = sent
    ex.prompt_tokens, ex.completion_tokens = usage.usage()
    w.finish()


class _Watchdog:
    """Idle and hard limits for a relay with one alarm, re-armed only when it fires.

    Rescheduling a timeout per chunk costs a timer cancel and a new one for every token; instead the
    relay stamps ``last`` (one clock read) and the alarm, when it fires, checks how long it really
    was and either re-arms for the rest or cancels the relay task.
    """

    __slots__ = ("idle", "hard_end", "last", "fired", "_task", "_alarms", "_alarm")

    def __init__(self, idle: float, hard_end: float, alarms: Alarms, task: asyncio.Task) -> None:
        self.idle = idle
        self.hard_end = hard_end
        self.last = now()
        self.fired: str | None = None
        self._task = task
        self._alarms = alarms
        self._arm()

    def _arm(self) -> None:
        self._alarm = self._alarms.at(min(self.last + self.idle, self.hard_end), self._check)

    def _check(self) -> None:
        t = now() + SLACK_S
        if t >= self.hard_end:
            self.fired = "hard"
        elif t >= self.last + self.idle:
            self.fired = "idle"
        else:
            self._arm()
            return
        self._task.cancel()

    def stop(self) -> None:
        self._alarms.cancel(self._alarm)
