"""The default upstream client: HTTP/1.1 over asyncio protocols, parsed by httptools, pooled per deployment.

Upstream calls always have one shape (a POST of a body the gateway already holds to one host, JSON or
SSE back), so a request here is one pre-joined head plus the body in one write, and the response is
parsed by the C parser uvicorn uses for the downstream side. A general-purpose client (aiohttp, measured)
builds a URL, a header multidict, request, payload, writer, timer and reader objects per call: about
3,500 bytecode instructions per proxied request against about 670 here, and a third fewer machine
instructions for the whole gateway. It implements the Protocols of ``base.py`` and their read contract.
docs/benchmarks.md ("Choosing the upstream client") has the figures.

The pool keeps idle connections last-in first-out (the warmest first), at most ``max_connections``
open or opening; a caller over the limit queues (first come, first served) and the wait shows as
``pool_wait_ms``. Idle connections past ``keepalive_expiry_s`` are closed when next looked at.

A response is checked as it is parsed (``framing.py``, the deployment's ``response_limits``): a head
past its size or count limit is refused as soon as it passes it, a status outside 100-599 or an
unasked-for 101 at once, a whole non-stream body past ``max_body_bytes`` before it is held. Any of
these, or anything httptools refuses, is an ``UpstreamProtocolError`` (502, UPE). Bytes after the end
of a response are never parsed as the next one: the connection is closed instead of reused.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from typing import Any, Final
from urllib.parse import urlsplit

import httptools

from gateway.config import DeploymentConfig
from gateway.telemetry.timing import now
from gateway.upstream.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamResetError,
)
from gateway.upstream.framing import (
    body_fault,
    count_fault,
    encoding_fault,
    size_fault,
    status_fault,
    transfer_fault,
)
from gateway.upstream.proxy import open_connection, proxy_for
from gateway.upstream.wire import AttemptWire, static_headers, tls_context

# A response body buffered past this (a client slower than its provider) pauses reading from the
# provider until the relay catches up: memory per stream stays bounded, TCP pushes back upstream.
HIGH_WATER: Final = 256 * 1024


class Body:
    """The response body as it arrives: ``readany()`` for the next bytes, ``read()`` for all of it."""

    __slots__ = ("_conn", "_chunks", "_size", "_eof", "_exc", "_waiter", "_paused")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # ------------------------------------------------------------ fed by the connection

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------------ read by the engine

    async def _wait(self) -> None:
        self._waiter = self._conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        return data

    async def readany(self) -> bytes:
        """What has arrived since the last read (waiting for some); b"" at the end of the body.

        Bytes that arrived before a failure are returned first; the failure is raised on the next read."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        return self._take()

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (the whole body when n < 0), fewer only at its end; the rest stays buffered.

        Taking each chunk as it comes keeps reading unpaused however large the body is; a whole body
        past ``response_limits.max_body_bytes`` is refused (UpstreamProtocolError) instead of held."""
        parts: list[bytes] = []
        have = 0
        while True:
            if self._chunks:
                data = self._take()
                parts.append(data)
                have += len(data)
                if n < 0 and have > self._conn.limits.max_body_bytes:
                    raise UpstreamProtocolError(body_fault(have, self._conn.limits))
            if self._eof or 0 <= n <= have:
                break
            if self._exc is not None:
                raise self._exc
            await self._wait()
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if 0 <= n < len(data):
            data, rest = data[:n], data[n:]
            self._chunks, self._size = [rest], len(rest)
        return data

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks


class Headers(dict[str, str]):
    """Response headers under lower-case names; look-ups ignore case, as HTTP's do."""

    __slots__ = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)


_NO_HEADERS: Final = Headers()


class H1Response:
    """An ``UpstreamResponse`` (base.py): status, headers, content, read, release, close.

    Repeated response headers are joined with ", " (RFC 9110 5.3)."""

    __slots__ = ("status", "headers", "content", "_conn")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: Headers = _NO_HEADERS
        self.content = Body(conn)
        self._conn: _Connection | None = conn

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        """Done with the response: a connection whose response was read to the end goes back to the pool."""
        self._let_go(self.content.at_eof)

    def close(self) -> None:
        """Abort: close the connection now, so the provider sees the client leave and stops generating."""
        self._let_go(False)

    def _let_go(self, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release(reusable)


class _Connection(asyncio.Protocol):
    """One kept-alive connection to the provider, carrying one request at a time."""

    def __init__(self, pool: H1UpstreamClient) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: H1Response | None = None
        self.waiter: asyncio.Future[H1Response] | None = None  # resolved when the response head arrived
        self.raw_headers: list[tuple[str, str]] = []  # of the response head being parsed
        self.complete = False  # the response in hand was read to its end
        self.keep_alive = True
        self.closed = False
        self.idle_since = 0.0
        self.limits = pool.limits
        self.max_headers = pool.limits.max_headers
        self.head_bytes = 0  # bytes fed while no final response head was complete (1xx heads included)
        self.fault: str | None = None  # why the response in hand is malformed, set by a parser callback

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes on an idle connection (a 408 before a close, say): not reusable
            self.close()
            return
        if self.complete:  # bytes after the end of the response nobody asked for: never reuse this connection
            self.keep_alive = False
            return
        head_open = resp.status == 0
        if head_open:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.complete:  # a second response right after the first, in the same read: the first stands
                self.keep_alive = False
                return
            self._broken(UpstreamProtocolError(self.fault or f"invalid HTTP response: {exc}"))
            self.close()
            return
        if (
            head_open
            and resp.status == 0
            and (
                fault := count_fault(len(self.raw_headers), self.limits)
                or size_fault(self.head_bytes, self.limits)
            )
        ):
            self._broken(UpstreamProtocolError(fault))  # an endless head is refused once it passes a limit
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f": {exc}" if exc is not None else ""
        self._broken(
            UpstreamResetError(f"the provider closed the connection{reason}"), clean_close=exc is None
        )
        self.pool.discard(self)

    def _broken(self, exc: BaseException, clean_close: bool = False) -> None:
        """The connection ended: whoever waits for this response's head or body gets ``exc``; a body without
        a length ends with it instead when the provider closed cleanly (a FIN, not a reset or an error)."""
        self.keep_alive = False
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        resp = self.response
        if resp is None or self.complete:
            return
        h = resp.headers
        if (
            clean_close
            and resp.status
            and "content-length" not in h
            and "chunked" not in h.get("transfer-encoding", "").lower()
        ):
            self.complete = True  # a body without a length ends when the connection does (RFC 9112 6.3)
            resp.content.feed_eof()
        else:
            resp.content.fail(exc)

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # the provider sent another response after the one asked for
            self.keep_alive = False
            raise UpstreamProtocolError("unsolicited response")  # stops the parser: the rest is dropped

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted once per head (on_headers_complete, or data_received for a head still open), not here
        # per header: until then the head's byte limit bounds how many pile up.
        self.raw_headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if len(self.raw_headers) > self.max_headers:
            self.fault = count_fault(len(self.raw_headers), self.limits)
            raise UpstreamProtocolError(self.fault)
        status = self.parser.get_status_code()
        resp = self.response
        if status < 200 or status > 599 or resp is None:  # not a final answer: malformed, or an interim 1xx
            if status < 100 or status > 599 or status == 101:
                self.fault = (
                    status_fault(status) or "101 Switching Protocols to a request that asked for none"
                )
                raise UpstreamProtocolError(self.fault)
            self.raw_headers = []  # 1xx: an interim answer; the real head follows
            return
        resp.status = status
        pairs, self.raw_headers = self.raw_headers, []
        resp.headers = headers = Headers(pairs)
        if len(headers) < len(pairs):  # a repeated name: keep every value
            dict.clear(headers)
            for key, text in pairs:
                old = dict.get(headers, key)
                dict.__setitem__(headers, key, text if old is None else f"{old}, {text}")
        encoding = dict.get(headers, "content-encoding")
        if encoding is not None and (fault := encoding_fault(dict.get(headers, "content-type"), encoding)):
            self.fault = fault
            raise UpstreamProtocolError(fault)
        coding = dict.get(headers, "transfer-encoding")
        if coding is not None and (fault := transfer_fault(coding)):
            self.fault = fault
            raise UpstreamProtocolError(fault)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(resp)

    def on_body(self, body: bytes) -> None:
        resp = self.response
        if resp is not None:
            resp.content.feed(body)

    def on_message_complete(self) -> None:
        resp = self.response
        if resp is None or resp.status == 0:  # the end of a 1xx answer
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        resp.content.feed_eof()

    # ------------------------------------------------------------ used by the client

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    async def request(self, head: bytes, body: bytes) -> H1Response:
        """Write one request; return its response once the head arrived (the body keeps arriving)."""
        self.response = resp = H1Response(self)
        self.complete = False
        self.head_bytes = 0
        self.waiter = waiter = self.loop.create_future()
        self.transport.write(head + body if body else head)  # type: ignore[union-attr]
        try:
            return await waiter
        except BaseException:  # cancelled, or the connection broke: this connection is done
            resp._conn = None
            self.close()
            raise
        finally:
            self.waiter = None

    def release(self, reusable: bool) -> None:
        self.response = None
        if reusable and self.complete and self.keep_alive and not self.closed:
            self.pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.discard(self)


class H1UpstreamClient:
    """Pooled HTTP/1.1 client for one deployment; auth and static headers pre-built once."""

    def __init__(self, dep: DeploymentConfig) -> None:
        self.deployment = dep
        self.base_url = dep.base_url
        url = urlsplit(dep.base_url)
        self.host = url.netloc
        self._hostname = url.hostname or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._prefix = url.path.rstrip("/")
        self._query = f"?{url.query}" if url.query else ""  # after the API path (wire.endpoint_url)
        self._host_line = f"host: {url.netloc}\r\n"
        self._proxy = proxy_for(dep.base_url, dep.proxy, os.environ)
        if self._proxy is not None and url.scheme == "http":  # the proxy forwards: absolute-form requests
            self._prefix = f"http://{url.netloc}{self._prefix}"
            if self._proxy.authorization:
                self._host_line += f"proxy-authorization: {self._proxy.authorization}\r\n"
        self.static_headers = static_headers(dep)
        self._limit = dep.pool.max_connections
        self.limits = dep.response_limits
        self._expiry_s = dep.pool.keepalive_expiry_s
        self._connect_s = dep.timeouts.connect_ms / 1000.0
        self._idle: list[_Connection] = []  # last in, first out: the most recently used is the warmest
        self._busy: set[_Connection] = set()  # carrying a request
        self._opening = 0
        self._queue: deque[asyncio.Future[_Connection | None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.opened = 0

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._ssl = tls_context(self.deployment)

    async def close(self) -> None:
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        self._busy.clear()
        while self._queue:
            w = self._queue.popleft()
            if not w.done():
                w.set_exception(UpstreamConnectError("the upstream client is closed"))

    # ------------------------------------------------------------ requests

    def _head(self, method: str, path: str, headers: dict[str, str], length: int | None) -> bytes:
        fields = "\r\n".join(map(": ".join, headers.items())) + "\r\n" if headers else ""  # built in C
        size = "" if length is None else f"content-length: {length}\r\n"
        return f"{method} {self._prefix}{path}{self._query} HTTP/1.1\r\n{self._host_line}{fields}{size}\r\n".encode(
            "latin-1"
        )

    async def post(self, path: str, body: bytes, headers: dict[str, str], wire: AttemptWire) -> H1Response:
        """Send a request and return once response headers arrived; the caller reads and releases/aborts."""
        conn = await self._acquire(wire)
        return await conn.request(self._head("POST", path, headers, len(body)), body)

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout_s):
            conn = await self._acquire(None)
            resp = await conn.request(self._head("GET", path, self.static_headers, None), b"")
            try:
                return resp.status, await resp.read()
            finally:
                resp.release()

    # ------------------------------------------------------------ the pool

    async def _acquire(self, wire: AttemptWire | None) -> _Connection:
        t0 = now()
        if wire is not None:
            wire.queued_at = t0
        while True:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.closed or t0 - conn.idle_since > self._expiry_s or _closing(conn):
                    conn.close()
                    continue
                self._busy.add(conn)
                if wire is not None:
                    wire.reused = True
                    wire.dequeued_at = t0
                return conn
            if len(self._busy) + self._opening < self._limit:
                break
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self._queue.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._hand_on(waiter.result())  # handed a connection (or a slot) as we were cancelled
                raise
            if handed is not None and (handed.closed or _closing(handed)):
                handed = None  # it died on the way over: not counted in the pool any more, so open one
            if handed is not None:  # handed over directly by a release
                self._busy.add(handed)
                if wire is not None:
                    wire.reused = True
                    wire.dequeued_at = now()
                return handed
            t0 = now()  # a slot opened up: look again
        return await self._open(wire)

    async def _open(self, wire: AttemptWire | None) -> _Connection:
        self._opening += 1
        conn = _Connection(self)
        t0 = now()
        if wire is not None:
            wire.dequeued_at = t0
            wire.connect_start = t0
        try:
            async with asyncio.timeout(self._connect_s):
                await open_connection(self.loop, conn, self._proxy, self._hostname, self._port, self._ssl)
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connect timed out after {self._connect_s * 1000:.0f} ms (timeouts.connect_ms)"
            ) from None
        except OSError as exc:  # the reason alone: the OS's text names the address, which stays internal
            raise UpstreamConnectError(f"cannot connect: {_reason(exc)}") from exc
        finally:
            self._opening -= 1
            if not conn.closed and conn.transport is None:
                conn.closed = True
            if conn.closed:
                self._hand_on(None)
        self.opened += 1
        if wire is not None:
            wire.connect_end = now()
        self._busy.add(conn)
        return conn

    def put_back(self, conn: _Connection) -> None:
        """A connection whose response was read to the end: to a queued caller, else to the idle pool."""
        self._busy.discard(conn)
        self._hand_on(conn)

    def _hand_on(self, conn: _Connection | None) -> None:
        """To the first caller still queued: a connection, or (None) a free slot to open one in. With
        nobody queued, a connection goes to the idle pool and a slot simply stays free."""
        queue = self._queue
        while queue:
            w = queue.popleft()
            if not w.done():
                w.set_result(conn)
                return
        if conn is not None:
            conn.idle_since = now()
            self._idle.append(conn)

    def discard(self, conn: _Connection) -> None:
        """A connection closed (by either side): it leaves the pool and frees a slot for a queued caller."""
        if conn in self._busy:
            self._busy.discard(conn)
            self._hand_on(None)
        elif conn in self._idle:
            self._idle.remove(conn)

    # ------------------------------------------------------------ pool facts

    @property
    def connections_opened(self) -> int:
        return self.opened

    def pool_counts(self) -> dict[str, int]:
        """Connections by state: idle in the pool, or active (carrying a request)."""
        return {"idle": len(self._idle), "active": len(self._busy)}

    async def warm(self, n: int, timeout_s: float) -> list[tuple[int, bytes] | BaseException]:
        """Open (or exercise) n connections at once: concurrent cheap requests take distinct connections."""
        if n <= 0:
            return []
        return await asyncio.gather(
            *(self.get("/models", timeout_s) for _ in range(n)), return_exceptions=True
        )

    def __repr__(self) -> str:
        return f"H1UpstreamClient({self.host}, idle={len(self._idle)}, busy={len(self._busy)})"


def _closing(conn: _Connection) -> bool:
    transport = conn.transport
    return transport is None or transport.is_closing()


def _reason(exc: OSError) -> str:
    """Why a connect failed, without the address asyncio writes into the text (it reaches clients)."""
    if isinstance(exc, UpstreamConnectError):  # the egress proxy's own diagnosis (proxy.py)
        return str(exc)
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "name resolution failed"
    if isinstance(exc, ssl.SSLError):  # certificate problems: the library's words are the diagnosis
        return str(exc)
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__
