"""uvicorn's httptools protocol, stamped with when each request's first byte was parsed, and telling the
app at once when its client goes away.

The ASGI app is called only after uvicorn has parsed the head and scheduled a task, so a clock read
at the app's door misses that part of the gateway's own time. The stamp rides in the scope
(``llmgw.t_first_byte``); ``duration_ms`` and ``gateway_overhead_ms`` start from it.

ASGI's way to learn of a disconnect is a pending ``receive()``, which costs a task per request. With this
protocol the scope carries ``llmgw.on_disconnect``: the app puts a callback there, and the protocol calls
it when the connection is lost before the response is complete. Under another server the key is absent
and the app falls back to the watcher task.

uvicorn writes a response's head as soon as the app sends ``http.response.start`` and its body with the
next message: two send() calls and two loopback packets per response. The transport here holds each
response's first write until the next one of the same loop turn, so head and first body bytes leave
together, as aiohttp's server sends them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.telemetry.timing import now

SCOPE_KEY = "llmgw.t_first_byte"
DISCONNECT_KEY = "llmgw.on_disconnect"


def client_gone() -> None:
    """What ``DISCONNECT_KEY`` holds when the client left before the app put its callback there (during
    auth, the body read, a rate-limit check): the app looks before it goes upstream."""


class HeadWithBodyTransport:
    """A connection's transport that holds the first write after ``hold_next`` is set (a response's head)
    until the next write, or the end of the loop turn, whichever comes first."""

    __slots__ = ("_transport", "_loop", "_held", "hold_next")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self.hold_next = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.writelines((held, data))  # one writev(), no copy
        elif self.hold_next:
            self.hold_next = False
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = HeadWithBodyTransport(transport, self.loop)  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        t = now()
        super().on_message_begin()
        self.transport.hold_next = True  # type: ignore[attr-defined]
        self.scope[SCOPE_KEY] = t  # type: ignore[typeddict-unknown-key]
        self.scope[DISCONNECT_KEY] = None  # type: ignore[typeddict-unknown-key]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        hook = None
        if cycle is not None and not cycle.response_complete:
            hook = cycle.scope.get(DISCONNECT_KEY)
            if hook is None:
                cycle.scope[DISCONNECT_KEY] = client_gone  # type: ignore[typeddict-unknown-key]
        super().connection_lost(exc)
        if hook is not None:
            hook()


def arrival(scope: dict[str, Any]) -> tuple[float, float]:
    """The request's first byte on the monotonic clock and on the wall clock (now, if it was not stamped).

    The wall time is derived from the same instant, so ``start_time`` and exported spans line up with
    the durations measured from it."""
    t = now()
    t0 = scope.get(SCOPE_KEY, t)
    return t0, time.time() - (t - t0)
