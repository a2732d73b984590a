"""Relay a committed stream downstream, chunk by chunk, as it arrives (zero buffering).

Bounded by the idle timeout between chunks, the attempt's per-try limit and the request deadline;
when any fires, or the upstream breaks mid-stream, the client gets a final SSE error event instead
of a silent cut. The relay writes what happened into a ``RelayOutcome`` and returns it; it reads and
writes nothing else of the exchange.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from gateway.engine.alarms import SLACK_S, Alarms
from gateway.engine.interrupt import CancelReason, Interrupt
from gateway.engine.sse import UsageTail, error_event
from gateway.flags import ResponseFlag
from gateway.policy.deadline import Deadline
from gateway.upstream.errors import UpstreamError, UpstreamProtocolError

if TYPE_CHECKING:
    from gateway.engine.attempt import Attempt

Send = Callable[[dict[str, Any]], Awaitable[None]]  # the ASGI send


class Downstream(Protocol):
    """The client's connection, where the server tells (api/protocol.py): a response sent whole may still
    wait in the gateway's buffers, the client reading none of it, until ``server.send_timeout_s`` cuts it."""

    send_blocked_t: float  # since when bytes wait in the gateway (the client's socket full); 0.0: none do
    cut: bool  # the connection was lost while bytes waited: they never left

    async def delivered(self) -> bool:
        """Wait while bytes wait in the gateway: False if the connection was cut first (or before), else True."""
        ...


async def wait_delivery(ds: Downstream | None) -> bool:
    """Whether a response handed to the server whole, a success or an error, left the gateway. The server
    calls it complete at once, though bytes of it may still wait to leave: this waits while they do, and
    is False when the connection was cut first (``server.send_timeout_s``, a reset) or before. Without a
    Downstream (another server) nothing tells: True."""
    if ds is None or not (ds.send_blocked_t or ds.cut):
        return True  # the common answer: the kernel took it whole
    return await ds.delivered()


SSE_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
# A blank line ends an event, and a line may end in LF, CRLF or CR (the SSE spec): every such pair.
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n", b"\r\r\n")
MAX_HELD = (
    256 * 1024
)  # an "event" longer than this is relayed as it comes (the stream is no SSE of ours to fix)


def split_at_event_end(data: bytes) -> tuple[bytes, bytes]:
    """``data`` cut after its last complete SSE event: (whole events, the start of an unfinished one).

    The relay sends whole events only, so a stream cut mid-event never leaves the client a half event
    for the final error event to be glued onto (the openai SDK would raise a bare JSONDecodeError on it
    instead of an ``APIError``). Events almost always arrive whole: one ``endswith`` per chunk."""
    if data.endswith(_EVENT_ENDS):
        return data, b""
    ends = [i + len(sep) for sep in _EVENT_ENDS if (i := data.rfind(sep)) >= 0]
    end = max(ends) if ends else 0
    return data[:end], data[end:]


class RelayOutcome:
    """What relaying one stream did; filled as it goes, so a relay cut short by the client still tells.

    Fields start as class-level defaults (all immutable), so a new outcome costs no per-field set-up."""

    started: bool = False  # the 200 head went out
    closing: bool = False  # the final (empty) body is being sent: a disconnect now changes nothing
    bytes_sent: int = 0
    t_first_sent: float | None = None
    t_last_sent: float | None = None
    failure_flag: ResponseFlag | None = None  # UT, DT, UC or UPE when the stream ended with an error event
    timeout_flag: str | None = None  # "idle", "per_try" or "total" for a timed-out stream
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    at_event_end: bool = True  # what was sent ends with a whole event: an error event may follow as it is


async def relay_stream(
    w: Attempt,
    send: Send,
    out: RelayOutcome,
    *,
    headers: list[tuple[bytes, bytes]],
    deadline: Deadline,
    alarms: Alarms,
    interrupt: Interrupt,
    now: Callable[[], float],
) -> RelayOutcome:
    dep = w.dep
    headers.extend(SSE_HEADERS)
    out.started = True
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    assert w.resp is not None
    content = w.resp.content
    first = b"".join(w.chunks) if len(w.chunks) != 1 else w.chunks[0]
    w.chunks = []
    usage = UsageTail()  # fed every byte as it arrives: a usage object split across chunks still counts
    usage.feed(first)
    first, held = split_at_event_end(first)  # ``held``: an unfinished event, sent once it is whole
    # ``ended``: the provider's body has ended and the bytes in hand are its last. They go out with the
    # end of the response (one write instead of two): a short stream often arrives in a single read.
    ended = out.closing = not held and content.at_eof
    await send({"type": "http.response.body", "body": first, "more_body": not ended})
    out.t_first_sent = now()
    sent = out.bytes_sent = len(first)

    # The hard end: the attempt's per-try limit or the request deadline, whichever is first.
    per_try_end = w.t_start + dep.per_try_s
    hard_end = min(per_try_end, deadline.expires_at)
    hard_flag = "per_try" if per_try_end <= deadline.expires_at else "total"
    failure: tuple[ResponseFlag, str | None, str] | None = None  # (flag, timeout_flag, message)
    watchdog: _Watchdog | None = None
    try:
        if not ended:
            watchdog = wd = _Watchdog(dep.idle_s, hard_end, alarms, interrupt, now)
        while not ended:
            chunk = await content.readany()
            if not chunk:
                break
            usage.feed(chunk)
            if held or not chunk.endswith(_EVENT_ENDS):
                chunk, held = split_at_event_end(held + chunk)
                if len(held) > MAX_HELD:
                    chunk, held = chunk + held, b""
                    out.at_event_end = False
                elif not chunk:
                    wd.last = now()  # the provider is not silent, only its event is unfinished
                    continue
                else:
                    out.at_event_end = True
            ended = out.closing = not held and content.at_eof
            wd.last = (
                WAITING_ON_CLIENT  # a send waits while the client does not read: not the provider's idle
            )
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
            wd.last = now()
            sent += len(chunk)
            out.bytes_sent = sent
    except asyncio.CancelledError:
        reason = interrupt.claim(CancelReason.STREAM_HARD_END, CancelReason.STREAM_IDLE)
        if reason is None:
            raise  # the client left (or shutdown): not ours to handle
        if reason is CancelReason.STREAM_HARD_END:
            # DT (never held against the provider) also when the limit found the client not reading
            blocked = watchdog is not None and watchdog.last == WAITING_ON_CLIENT
            flag = ResponseFlag.DEADLINE if hard_flag == "total" or blocked else ResponseFlag.UPSTREAM_TIMEOUT
            limit = (
                "the request deadline"
                if hard_flag == "total"
                else f"per_try_ms={dep.cfg.timeouts.per_try_ms:.0f}"
            )
            why = " while the client was not reading" if blocked else ""
            failure = (flag, hard_flag, f"Stream stopped: {limit} reached{why}.")
        else:
            failure = (
                ResponseFlag.UPSTREAM_TIMEOUT,
                "idle",
                f"Stream stopped: deployment '{dep.id}' sent "
                f"nothing for idle_ms={dep.cfg.timeouts.idle_ms:.0f}.",
            )
    except UpstreamError as exc:  # bad framing mid-way is UPE, as it is before a stream starts; else UC
        bad = isinstance(exc, UpstreamProtocolError)
        failure = (
            ResponseFlag.UPSTREAM_PROTOCOL_ERROR if bad else ResponseFlag.UPSTREAM_RESET,
            None,
            f"Stream stopped: deployment '{dep.id}' broke the stream ({type(exc).__name__}).",
        )
    finally:
        if watchdog is not None:
            watchdog.stop()
    w.t_end = now()
    if failure is not None:
        flag, tflag, message = failure
        # a send that was to end the response was interrupted before it wrote: the error event ends it
        ended = False
        w.abort()
        out.failure_flag = flag
        out.timeout_flag = tflag
        if tflag:
            typ, code = "timeout_error", "timeout"
        elif flag is ResponseFlag.UPSTREAM_PROTOCOL_ERROR:
            typ, code = "server_error", "upstream_protocol_error"
        else:
            typ, code = "server_error", "upstream_reset"
        if held:  # the provider's unfinished event is dropped: it was never sent, and could not be parsed
            message += f" An unfinished event ({len(held)} bytes) was dropped."
        ev = error_event(message, typ, code, out.at_event_end)
        await send({"type": "http.response.body", "body": ev, "more_body": True})
        sent += len(ev)
        out.bytes_sent = sent
    else:
        if held:  # the stream ended cleanly without a final blank line: relay it as it came
            await send({"type": "http.response.body", "body": held, "more_body": True})
            sent += len(held)
            out.bytes_sent = sent
        w.resp.release()
        w.released = True
    if not ended:
        out.closing = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    out.t_last_sent = now()
    out.prompt_tokens, out.completion_tokens = usage.usage()
    w.finish()
    return out


WAITING_ON_CLIENT = math.inf  # ``_Watchdog.last`` while a send waits for the client to read


class _Watchdog:
    """Idle and hard limits for a relay with one alarm, re-armed only when it fires.

    Rescheduling a timeout per chunk costs a timer cancel and a new one for every token; instead the
    relay stamps ``last`` (one clock read) and the alarm, when it fires, checks how long it really
    was and either re-arms for the rest or interrupts the relay.

    ``last`` is when the relay began waiting on the provider: idle_ms is the provider's silence. While
    a send waits for a client that does not read (``WAITING_ON_CLIENT``) the gateway reads nothing
    from the provider, so idle_ms does not run; only the hard end does.
    """

    __slots__ = ("idle", "hard_end", "last", "_now", "_interrupt", "_alarms", "_alarm")

    def __init__(
        self, idle: float, hard_end: float, alarms: Alarms, interrupt: Interrupt, now: Callable[[], float]
    ) -> None:
        self.idle = idle
        self.hard_end = hard_end
        self._now = now
        self.last = now()
        self._interrupt = interrupt
        self._alarms = alarms
        self._arm(self.last)

    def _arm(self, since: float) -> None:
        self._alarm = self._alarms.at(min(since + self.idle, self.hard_end), self._check)

    def _check(self) -> None:
        t = self._now() + SLACK_S
        if t >= self.hard_end:
            self._interrupt.cancel(CancelReason.STREAM_HARD_END)
        elif t >= self.last + self.idle:
            self._interrupt.cancel(CancelReason.STREAM_IDLE)
        else:
            self._arm(min(self.last, t))  # waiting on the client: look again idle_ms from now

    def stop(self) -> None:
        self._alarms.cancel(self._alarm)
