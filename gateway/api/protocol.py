"""uvicorn's httptools protocol, stamped with when each request's first byte was parsed, and telling the
app at once when its client goes away.

The ASGI app is called only after uvicorn has parsed the head and scheduled a task, so a clock read
at the app's door misses that part of the gateway's own time. The stamp rides in the scope
(``llmgw.t_first_byte``); ``duration_ms`` and ``gateway_overhead_ms`` start from it. A request pipelined
behind one whose response is still being written waits, parsed, in uvicorn's ``pipeline``: when it starts
its scope gets ``llmgw.t_started``, and that wait is the client's queueing (``pipeline_wait_ms``), not
gateway overhead.

ASGI's way to learn of a disconnect is a pending ``receive()``, which costs a task per request. With this
protocol the scope carries ``llmgw.on_disconnect``: the app puts a callback there, and the protocol calls
it when the connection is lost before the response is complete. Under another server the key is absent
and the app falls back to the watcher task.

uvicorn writes a response's head as soon as the app sends ``http.response.start`` and its body with the
next message: two send() calls and two loopback packets per response. The transport here holds each
response's first write until the next one of the same loop turn, so head and first body bytes leave
together, as aiohttp's server sends them. uvicorn calls a response complete once the app sent it, though
most of a large one may still wait in the transport, the client reading none of it: the connection's
``Delivery`` (in each scope, ``llmgw.downstream``) lets the app wait for it to leave, or learn that
``server.send_timeout_s`` cut it. The transport's write-buffer limits are zero, so writing is paused
exactly while bytes wait in the gateway: resumed, every byte has left (for the kernel), and a tail
below the default 64 KiB mark no longer waits unseen, untimed.

With the app's ``EdgeLimits`` (``api/edge.py``) in the lifespan state, the protocol also bounds each
request head: bytes are counted as they arrive, before httptools sees them (it would buffer a header of
any size), and a head over ``server.max_header_bytes`` is answered 431 at once; a head with more than
``server.max_headers`` header lines gets 431 when it is complete, before uvicorn starts the request (each
header costs a parser callback, a tuple and, in the app, a decode and a forwarding decision), and so does
an ``Upgrade`` the gateway cannot take (400; only a head the parser flags as an upgrade is looked at);
heads slower than ``server.request_headers_timeout_s`` get 408, and connections silent from the start are
closed. A
connection beyond ``server.max_connections`` open ones is answered 503 at once and closed unread.
This leans on uvicorn's parser callbacks (``on_message_begin``, ``on_headers_complete``,
``on_message_complete``) and ``cycle``/``app_state``: pyproject bounds uvicorn's version and
tests/unit/test_protocol_transport.py checks that they are still there.

Bytes the protocol refuses (a malformed head or chunk, a head too large or too slow) are answered by the
protocol itself, and the refusal is logged as a request (flag ``DPE``, ``BR`` or ``HT``); the connection
then closes. The answer never cuts into another response: refused bytes that follow a complete request
(pipelined) wait, with reading paused, until the responses before them are complete (uvicorn calls
``on_response_complete``), as nginx does; an answer left waiting in the gateway behind an unread one is
logged once it left, ``DC`` too if the connection is cut first. Refused bytes of the request the app is
handling (a malformed chunk of its body) end that request: its scope gets ``llmgw.refused``
(``REFUSED_KEY``) and uvicorn's cycle is marked disconnected (its sends are dropped, ``receive()`` reports
a disconnect); the app, seeing the key, logs nothing of its own, so the request is logged once, as the
refusal. Besides the callbacks above this uses ``headers`` (the head's header list), ``pipeline``,
``_start_asgi_task`` (a pipelined request whose client left is started to log itself),
``_unset_keepalive_if_required``, ``flow`` (its ``drain()``), the parser's ``should_upgrade()`` (set before
``on_headers_complete`` runs) and the cycle's ``more_body``, ``response_started``, ``response_complete``,
``disconnected`` and ``message_event``, checked by the same tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.api.edge import (
    EDGE_KEY,
    EdgeLimits,
    head_timeout,
    head_too_large,
    malformed_http,
    request_timeout,
    response_bytes,
    too_many_connections,
    too_many_headers,
    unsupported_upgrade,
)
from gateway.api.types import Scope
from gateway.engine.relay import wait_delivery
from gateway.errors import GatewayError
from gateway.telemetry.timing import now

SCOPE_KEY = "llmgw.t_first_byte"
# In a pipelined request's scope: when it was started, after waiting behind the responses before it on
# its connection. That wait is the client's queueing (as Envoy counts it), not gateway overhead.
STARTED_KEY = "llmgw.t_started"
LINGER_S = 1.0  # how long a refused client may keep sending (dropped) before its connection closes
DISCONNECT_KEY = "llmgw.on_disconnect"
DOWNSTREAM_KEY = "llmgw.downstream"  # the connection's Delivery: the engine's Downstream
REFUSED_KEY = "llmgw.refused"  # in a request's scope: the protocol refused its bytes, answered and logged it


def client_gone() -> None:
    """What ``DISCONNECT_KEY`` holds when the client left before the app put its callback there (during
    auth, the body read, a rate-limit check, or queued behind a pipelined response): the app looks before
    it goes upstream, and before it answers a refusal, which the server would drop."""


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

    def __getattr__(self, name: str) -> object:  # everything else is the transport's own
        return getattr(self._transport, name)


class Delivery:
    """A connection as the engine sees it (its ``Downstream``): whether bytes wait in the gateway to be
    written to the client (writing paused), and a wait for them to leave. One per connection, in each
    request's scope; it holds nothing of a request."""

    __slots__ = ("send_blocked_t", "cut", "_flow")

    def __init__(self, flow: FlowControl) -> None:
        self.send_blocked_t = 0.0  # since when writing is paused (the client's socket full); 0.0: it is not
        self.cut = False  # the connection was lost while writing was paused: what was buffered never left
        self._flow = flow

    async def delivered(self) -> bool:
        """Wait while writing is paused: False if the connection was cut first (``server.send_timeout_s``,
        or the client reset it) or before, else True. For a response the app sent whole (uvicorn calls it
        complete at once): whether its end left. Left means handed to the kernel (the buffer limits are
        zero): what a reset makes the kernel drop after that is not seen here, as in nginx and Envoy."""
        await self._flow.drain()  # resume_writing ends the wait, and so does connection_lost
        return not self.cut


class _Upgrade(Exception):
    """Raised from a parser callback for an Upgrade the gateway does not take (see on_headers_complete)."""


class _TooManyHeaders(Exception):
    """Raised from a parser callback: stops httptools before uvicorn starts the request. uvicorn answers
    a parser error with ``send_400_response``, which answers this one with 431 instead."""


@dataclass(slots=True, frozen=True)
class Refusal:
    """Refused bytes of a connection, to be answered and logged as one request."""

    err: GatewayError
    limit: str  # the llmgw_input_limits_total label
    method: str
    path: str
    started: float  # when the refused request's first byte was parsed (or the refusal, if none began)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    # Without EdgeLimits in the app state (another app, tests) these stay off: nothing counted or timed.
    _edge: EdgeLimits | None = None
    _head_limit = 0  # bytes a head may still take; 0 while no head is being read (a body is)
    _head_seen = 0  # bytes received since the current head may have begun
    _head_t = 0.0  # when the pending head's first byte was parsed; 0.0 = no head pending
    _body_t = 0.0  # when the request whose body is still arriving began; 0.0 = no body pending
    _born = 0.0
    _refusal: Refusal | None = None  # refused, to be answered once the responses before it are complete
    _too_many_headers = False  # the parser was stopped by _TooManyHeaders
    _upgrade: str | None = None  # the protocol of an Upgrade refused in on_headers_complete
    # The request whose app task runs. uvicorn's ``cycle`` is the newest parsed one, which differs while
    # pipelined requests wait in ``pipeline`` behind a response being written.
    _running: RequestResponseCycle | None = None
    _logging: asyncio.Task[None] | None = None  # a refusal's record, waiting for its answer to leave
    delivery: Delivery  # set in connection_made

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Paused while any byte waits in the transport, resumed once none does: with the default marks
        # (64 KiB, 16 KiB) a tail below them waited unseen by the delivery wait and by send_timeout_s.
        transport.set_write_buffer_limits(0)
        self.transport = HeadWithBodyTransport(transport, self.loop)  # type: ignore[assignment]
        self.delivery = Delivery(self.flow)
        edge = self.app_state.get(EDGE_KEY)
        if edge is not None:
            if edge.max_connections and len(edge.connections) >= edge.max_connections:
                self._overflow(edge)
                return
            self._edge = edge
            self._head_limit = edge.max_head_bytes
            self._born = now()
            edge.connections.add(self)

    def data_received(self, data: bytes) -> None:
        limit = self._head_limit
        if limit:
            if limit < 0:  # refused: anything read before reading paused is dropped
                return
            seen = self._head_seen + len(data)
            budget = max(limit - self._head_seen, 0)
            if seen > limit and not _head_ends_within(data, budget):
                super().data_received(data[:budget])  # what fits: the request line, for the log
                if self._head_limit >= 0:  # (unless the parser already refused it)
                    self._refuse(head_too_large(limit), "head_too_large")
                return
            self._head_seen = seen
        super().data_received(data)

    def on_message_begin(self) -> None:
        t = now()
        super().on_message_begin()
        self._head_t = t
        self.transport.hold_next = True  # type: ignore[attr-defined]
        self.scope[SCOPE_KEY] = t  # type: ignore[literal-required]
        self.scope[DISCONNECT_KEY] = None  # type: ignore[literal-required]
        self.scope[DOWNSTREAM_KEY] = self.delivery  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        edge = self._edge
        if edge is not None and len(self.headers) > edge.max_headers:
            self._too_many_headers = True
            raise _TooManyHeaders
        # the parser's flag (an Upgrade with Connection: upgrade, or CONNECT) spares the common head a scan
        if edge is not None and self.parser.should_upgrade():
            self._refuse_upgrade()
        self._body_t = self._head_t  # until on_message_complete: the body is timed from the request's start
        self._head_t = 0.0
        self._head_limit = 0  # the body is the app's to bound (server.max_body_bytes)
        queued = len(self.pipeline)
        super().on_headers_complete()
        if len(self.pipeline) == queued:  # started at once, not queued behind a response being written
            self._running = self.cycle

    def _refuse_upgrade(self) -> None:
        """An Upgrade the gateway cannot honour, refused before uvicorn starts the request: WebSocket (no route
        speaks it; uvicorn answered a bare 403, unlogged), and any other with a body (``curl --http2`` sends
        ``Upgrade: h2c``: the parser stops at the head, and the body was lost to a misleading "body is
        empty"). Without a body, any other Upgrade is ignored, as RFC 9110 7.8 allows."""
        upgrade = b""
        has_body = False
        for name, value in self.headers:  # only for a head the parser flagged: the common one pays nothing
            if name == b"upgrade":
                upgrade = value.lower()
            elif name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" \t0")):
                has_body = True
        if not upgrade:  # CONNECT: no Upgrade header, the app answers it
            return
        if upgrade.startswith(b"websocket") or has_body:
            self._upgrade = upgrade.decode("latin-1") or "-"
            raise _Upgrade

    def on_message_complete(self) -> None:
        self._body_t = 0.0
        super().on_message_complete()
        edge = self._edge
        if edge is not None:  # the next head may begin: count again
            self._head_limit = edge.max_head_bytes
            self._head_seen = 0

    def pause_writing(self) -> None:
        super().pause_writing()
        self.delivery.send_blocked_t = now()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.delivery.send_blocked_t = 0.0

    def expire(self, t: float, limits: EdgeLimits) -> None:
        """Called by the edge's sweep: a head slower than its timeout gets 408, and so does a request whose
        body is not all in within ``server.request_timeout_s`` of its first byte; a connection that has
        not begun a request since it opened is closed after the idle timeout. (After a response,
        uvicorn's keep-alive timer, ``server.idle_timeout_s`` too, closes idle connections.) A client
        that reads nothing of what is written to it for ``server.send_timeout_s`` has its connection
        aborted: closing would wait for the unread bytes to go first, which is forever."""
        delivery = self.delivery
        blocked = delivery.send_blocked_t
        if blocked and t - blocked > limits.send_timeout_s:  # (refused too: a close would wait for it)
            delivery.send_blocked_t = 0.0
            delivery.cut = True
            self.transport.abort()  # the request in flight, if any, ends as its client gone (DC)
            limits.on_limit("send_timeout")
        elif (
            self._head_limit < 0
        ):  # refused already: closing, or answering once the response in flight is out
            return
        elif self._head_t:
            if t - self._head_t > limits.head_timeout_s:
                self._refuse(head_timeout(limits.head_timeout_s), "head_timeout")
        elif self._body_t:  # a body trickling in (a slow POST) holds a request and its worker's memory
            if t - self._body_t > limits.request_timeout_s and not self.flow.read_paused:
                self._body_t = 0.0
                self._refuse(request_timeout(limits.request_timeout_s), "request_timeout")
        elif (
            self.cycle is None and t - self._born > limits.idle_timeout_s and not self.transport.is_closing()
        ):
            self.transport.close()
            limits.on_limit("idle_timeout")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refused (plain text, not logged): an OpenAI-shaped 400 and
        an access-log record with flag DPE instead, as for the other refusals here."""
        edge = self._edge
        if edge is None:
            return super().send_400_response(msg)
        if self._too_many_headers:
            self._too_many_headers = False
            self._refuse(too_many_headers(edge.max_headers), "too_many_headers")
        elif self._upgrade is not None:
            self._refuse(unsupported_upgrade(self._upgrade), "unsupported_upgrade")
            self._upgrade = None
        else:
            self._refuse(malformed_http(), "malformed_http")

    def _refuse(self, err: GatewayError, limit: str) -> None:
        """Refuse what the client sent from here on: answer ``err`` and close the connection, at once or,
        while a response of an earlier request is still being written, once it is complete (reading
        paused meanwhile). Logged as a request, when answered or when the connection is lost first."""
        cycle = self.cycle
        refusal = self._refusal_of(err, limit, cycle)
        self._head_limit = -1  # anything read from here on is dropped
        self._head_t = 0.0
        if cycle is None or cycle.response_complete:  # no response is being written
            self._answer(refusal)
        elif cycle.more_body:  # the refused bytes are this request's own (its body): it ends here
            self._end_refused(cycle)
            if self.pipeline and self.pipeline[0][0] is cycle:  # it waited behind a response being written
                self.pipeline.popleft()  # and never runs; the answer follows that response
                self._defer(refusal)
            elif cycle.response_started:  # the app had begun answering it: nothing can follow half an answer
                self.transport.close()
                self._log(refusal, 0)
            else:  # the app was reading its body
                self._answer(refusal)
        else:  # they follow a complete request whose response (or one ahead of it) is being written
            self._defer(refusal)

    def _defer(self, refusal: Refusal) -> None:
        self._refusal = refusal  # answered by on_response_complete
        self.transport.pause_reading()

    def _refusal_of(self, err: GatewayError, limit: str, cycle: RequestResponseCycle | None) -> Refusal:
        """The refused request as the log names it: the head being read, if any (as far as it came), else
        the request whose body was refused, else none ("-")."""
        url = getattr(self, "url", b"")  # set by uvicorn once a request began
        if self._head_t:
            method = self._method() if url else "-"
            return Refusal(err, limit, method, url[:512].decode("latin-1") or "-", self._head_t)
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            scope = cycle.scope
            started = cast("float | None", scope.get(SCOPE_KEY)) or now()
            return Refusal(err, limit, scope["method"], url[:512].decode("latin-1") or "-", started)
        return Refusal(err, limit, "-", "-", now())

    def _end_refused(self, cycle: RequestResponseCycle) -> None:
        """End the request in flight whose bytes were refused, as uvicorn ends one whose client left:
        whatever it sends is dropped and ``receive()`` answers ``http.disconnect``. ``REFUSED_KEY`` tells the
        app not to log it: the refusal's record is the request's."""
        cycle.scope[REFUSED_KEY] = True  # type: ignore[literal-required]
        cycle.disconnected = True
        cycle.message_event.set()  # wakes a receive() waiting for more of the body

    def on_response_complete(self) -> None:
        last = not self.pipeline  # no pipelined request waits to start after this response
        nxt = None if last else self.pipeline[-1][0]  # the one uvicorn starts next
        super().on_response_complete()
        if nxt is not None and (not self.pipeline or self.pipeline[-1][0] is not nxt):
            self._running = nxt
            nxt.scope[STARTED_KEY] = now()  # type: ignore[literal-required]
        refusal = self._refusal
        if refusal is not None and last:
            self._refusal = None
            self._unset_keepalive_if_required()  # not kept alive: it closes after the answer
            self._answer(refusal)

    def _overflow(self, edge: EdgeLimits) -> None:
        """A connection over ``server.max_connections``: answered 503 at once and closed, never read, as
        Envoy closes a connection over its limit. Counted, not logged as a request: none was read."""
        self._head_limit = -1  # anything it sends is dropped
        edge.on_limit("max_connections")
        self._send_and_close(too_many_connections(edge.max_connections))

    def _answer(self, refusal: Refusal) -> None:
        sent = self._send_and_close(refusal.err)
        if self.delivery.send_blocked_t:  # the answer waits in the gateway (behind an unread response)
            self._logging = self.loop.create_task(self._log_delivered(refusal, sent))
        else:
            self._log(refusal, sent)

    async def _log_delivered(self, refusal: Refusal, bytes_sent: int) -> None:
        """Log the refusal once its answer left the gateway, as DC if the connection was cut first."""
        if not await wait_delivery(self.delivery):
            refusal = replace(refusal, err=refusal.err.undelivered())
        self._log(refusal, bytes_sent)

    def _send_and_close(self, err: GatewayError) -> int:
        """``err`` as the connection's last response, then the close; the body bytes sent."""
        transport = self.transport
        if transport.can_write_eof() and not transport.is_closing():
            # Delayed close, as Envoy and nginx do: closing at once with the client's bytes unread
            # would reset the connection, and the client might never read the answer.
            transport.write(response_bytes(err))
            transport.flush()  # type: ignore[attr-defined]  # not held back as a response head
            transport.write_eof()
            transport.pause_reading()  # the rest of a flood waits in the kernel: TCP stops the sender
            self.loop.call_later(LINGER_S, transport.close)
            return len(err.body())
        transport.close()
        return 0

    def _log(self, refusal: Refusal, bytes_sent: int) -> None:
        edge = self._edge
        if edge is not None:
            edge.on_limit(refusal.limit)
            client = f"{self.client[0]}:{self.client[1]}" if self.client else None
            edge.on_refused(refusal.err, refusal.method, refusal.path, client, refusal.started, bytes_sent)

    def _method(self) -> str:
        try:
            return self.parser.get_method().decode("latin-1")
        except Exception:  # the request line itself is not complete
            return "-"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.delivery.send_blocked_t:  # reset by the client while writing was paused (super() resumes it)
            self.delivery.cut = True
        cycle = self._running
        hook = None
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # uvicorn marks only its newest cycle: this one's sends are dropped too
            cycle.message_event.set()
            hook = cast("Callable[[], None] | None", cycle.scope.get(DISCONNECT_KEY))
            if hook is None:
                cycle.scope[DISCONNECT_KEY] = client_gone  # type: ignore[literal-required]
        while self.pipeline:  # requests queued behind it never got an answer: each runs to log itself
            queued, app = self.pipeline.pop()  # as a request whose client left (499 DC), in order
            queued.disconnected = True
            queued.scope[DISCONNECT_KEY] = client_gone  # type: ignore[literal-required]
            queued.scope[STARTED_KEY] = now()  # type: ignore[literal-required]
            self._start_asgi_task(queued, app)
        if self._edge is not None:
            self._edge.connections.discard(self)
        refusal = self._refusal
        if refusal is not None:  # gone before the responses ahead of the answer were complete
            self._refusal = None
            self._log(refusal, 0)
        super().connection_lost(exc)
        if hook is not None:
            hook()


def _head_ends_within(data: bytes, budget: int) -> bool:
    """Whether the head's blank line falls within ``budget`` more bytes of ``data`` (one C-speed scan of
    at most ``budget`` bytes). A blank line split across reads shows as ``data`` starting with the
    rest of it; the parser judges whether it really was one."""
    return data.startswith((b"\n", b"\r\n")) or data.find(b"\r\n\r\n", 0, budget + 4) >= 0


def arrival(scope: Scope) -> tuple[float, float]:
    """The request's first byte on the monotonic clock and on the wall clock (now, if it was not stamped).

    The wall time is derived from the same instant, so ``start_time`` and exported spans line up with
    the durations measured from it."""
    t = now()
    t0 = scope.get(SCOPE_KEY, t)
    return t0, time.time() - (t - t0)


def queue_wait(scope: Scope, t0: float) -> float:
    """How long a pipelined request waited behind the responses before it (``STARTED_KEY``), else 0."""
    started = scope.get(STARTED_KEY)
    return started - t0 if started is not None else 0.0
