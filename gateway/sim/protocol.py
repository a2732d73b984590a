"""A small, fast HTTP/1.1 server connection: httptools parses, asyncio writes, nothing else.

Requests on one connection are answered in order (pipelining is queued). A request handler answers
either at once (`respond`) or returns a `Pending` that finishes later and calls `finish()`. When the
peer goes away, the pending request is cancelled at once: that is how the simulator sees a client
abandon a request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools
import orjson

log = logging.getLogger("llmgw.sim")

JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
MAX_BODY = 16 * 1024 * 1024
MAX_QUEUED = 64
SIM_HEADER_PREFIX = "x-sim-"

REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Payload Too Large",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; x-sim-* are in `overrides` instead
    overrides: dict[str, str]  # x-sim-<knob> headers
    body: bytes
    keep_alive: bool
    t0: float  # loop time when the request was fully read
    started_at: float  # wall clock, for the stats
    too_large: bool = False


class Pending(Protocol):
    def cancel(self) -> None: ...


class Handler(Protocol):
    def connection_opened(self, conn: Connection) -> None: ...
    def connection_closed(self, conn: Connection) -> None: ...
    def handle(self, conn: Connection, request: Request) -> Pending | None: ...


def header_line(name: bytes, value: str) -> bytes:
    """One response header line; values that could break the framing are dropped."""
    raw = value.encode("latin-1", "replace")
    if b"\r" in raw or b"\n" in raw:
        return b""
    return name + b": " + raw + b"\r\n"


class Connection(asyncio.Protocol):
    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop, conn_id: int) -> None:
        self.handler = handler
        self.loop = loop
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.last_active = loop.time()
        self.receiving = False  # a request is partly read
        self.queue: deque[Request] = deque()
        self.current: Pending | None = None
        self.keep_alive = True  # of the request being answered (HTTP/1.0 peers: never)
        self.write_paused = False
        self.on_resume: Callable[[], None] | None = None  # run when the peer drains its receive buffer
        self._url = b""
        self._headers: dict[str, str] = {}
        self._overrides: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._too_large = False

    # -- asyncio callbacks -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.handler.connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.queue.clear()
        self.on_resume = None
        current, self.current = self.current, None
        if current is not None:
            current.cancel()
        self.handler.connection_closed(self)

    def eof_received(self) -> bool:
        return False  # a half-closed peer is gone: close our side too (connection_lost follows)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        cb, self.on_resume = self.on_resume, None
        if cb is not None:
            cb()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
            return
        if len(self.queue) > MAX_QUEUED:
            self._fail(429, "too many pipelined requests")
            return
        if self.current is None and self.queue:
            self._next()

    # -- httptools callbacks (must not raise) ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.receiving = True
        self._url = b""
        self._headers = {}
        self._overrides = {}
        self._body = []
        self._body_len = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        if key.startswith(SIM_HEADER_PREFIX):
            self._overrides[key] = val
        else:
            self._headers[key] = val

    def on_headers_complete(self) -> None:
        expects = self._headers.get("expect", "").lower() == "100-continue"
        if expects and self.transport is not None and self.current is None and not self.queue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > MAX_BODY:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.receiving = False
        path = self._url.split(b"?", 1)[0].decode("latin-1")
        method = self.parser.get_method().decode("latin-1")
        keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
        self.queue.append(
            Request(
                method,
                path,
                self._headers,
                self._overrides,
                b"".join(self._body),
                keep_alive,
                self.loop.time(),
                time.time(),
                self._too_large,
            )
        )

    # -- answering ---------------------------------------------------------------------------------------
    def _next(self) -> None:
        while self.current is None and self.queue and self.writable:
            req = self.queue.popleft()
            self.keep_alive = req.keep_alive
            if req.too_large:
                self._fail(413, "request body too large", "request_too_large")
                return
            try:
                pending = self.handler.handle(self, req)
            except Exception:  # a bug must not take the server down: answer 500 and drop the connection
                log.exception("simulator failed on %s %s", req.method, req.path)
                self.current = None
                self._fail(500, "simulator internal error", None, "server_error")
                return
            if pending is not None:
                self.current = pending
                return
            if not self.keep_alive:
                self.close()

    def finish(self) -> None:
        """The pending request has been answered in full."""
        self.current = None
        self.last_active = self.loop.time()
        if not self.writable:
            return
        if not self.keep_alive:
            self.close()
        elif self.queue:
            self._next()

    @property
    def writable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def respond(self, status: int, body: bytes, content_type: bytes = JSON, headers: bytes = b"") -> None:
        if not self.writable:
            return
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n" % (
            status,
            REASONS.get(status, b"Status"),
            content_type,
            len(body),
            headers,
            b"" if self.keep_alive else b"connection: close\r\n",
        )
        self.transport.write(head + body)  # type: ignore[union-attr]  # writable: connected

    def stream_head(self, headers: bytes = b"") -> bytes:
        # keep-alive streams are chunked; otherwise the end of the stream is the end of the connection
        framing = b"transfer-encoding: chunked\r\n" if self.keep_alive else b"connection: close\r\n"
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: "
            + SSE
            + b"\r\ncache-control: no-cache\r\n"
            + framing
            + headers
            + b"\r\n"
        )

    def send(self, data: bytes, *, head: bytes = b"", last: bool = False) -> None:
        """Write stream data (plus the response head if given, plus the end of the body if `last`)."""
        if not self.writable:
            return
        if self.keep_alive:
            out = (
                head
                + (b"%x\r\n%s\r\n" % (len(data), data) if data else b"")
                + (b"0\r\n\r\n" if last else b"")
            )
        else:
            out = head + data
        if out:
            self.transport.write(out)  # type: ignore[union-attr]  # writable: connected

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def drop(self) -> None:
        """Close mid-answer, leaving the response unfinished (a reset as the client sees it)."""
        self.current = None
        self.keep_alive = False
        self.close()

    @property
    def idle(self) -> bool:
        return self.current is None and not self.queue and not self.receiving and not self.closed

    def _fail(
        self, status: int, message: str, code: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        """Answer an error (when nothing else is being answered) and close the connection."""
        if self.current is None and not self.closed:
            self.keep_alive = False
            self.respond(
                status,
                orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}),
            )
        self.queue.clear()
        self.close()
