"""The library upstream client: httpx (over httpcore), selectable with ``LLMGW_UPSTREAM_CLIENT=httpx``.

Kept beside the default ``h1.py`` as the well-kept reference it is measured and tested against
(docs/benchmarks.md, "Choosing the upstream client"; tests/e2e/test_upstream_clients.py). It obeys the
read contract of ``base.py`` and maps every httpx failure into ``errors.py``.

A response head is checked whole (``framing.head_fault``, the deployment's ``response_limits``) and a
whole non-stream body against ``max_body_bytes``, as ``h1.py`` checks them while parsing: a failure is an
``UpstreamProtocolError`` (502, UPE). A connection with bytes left over after a response (a stray second
response) is closed instead of reused.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpcore
import httpx

from gateway.config import DeploymentConfig, ResponseLimitsConfig
from gateway.telemetry.timing import now
from gateway.upstream.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamResetError,
)
from gateway.upstream.framing import body_fault, head_fault
from gateway.upstream.wire import (
    CURRENT_WIRE,
    AttemptWire,
    endpoint_url,
    host_of,
    static_headers,
    tls_context,
)

_CONNECT_FAILURES = (httpx.ConnectError, httpx.PoolTimeout)
# httpcore/h11 report a provider that hung up early as a protocol error; like h1, count it as a reset (UC).
_CLOSED_EARLY = ("peer closed connection", "server disconnected")


def _translate(exc: httpx.TransportError, host: str) -> Exception:
    """The failure in the tree of ``errors.py``; the upstream's address stays out of the text (it reaches clients)."""
    text = f"{type(exc).__name__}: {exc}".replace(host, "the provider")
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamConnectTimeout(text)
    if isinstance(exc, _CONNECT_FAILURES):
        return UpstreamConnectError(text)
    if isinstance(exc, httpx.RemoteProtocolError) and not any(m in text.lower() for m in _CLOSED_EARLY):
        return UpstreamProtocolError(text)
    return UpstreamResetError(text)


class _Body:
    """A ``ResponseBody`` (base.py) over an httpx response's raw byte iterator."""

    __slots__ = ("_it", "_buf", "_eof", "_host", "_limits")

    def __init__(self, response: httpx.Response, host: str, limits: ResponseLimitsConfig) -> None:
        self._it = response.aiter_raw().__aiter__()
        self._buf = b""
        self._eof = False
        self._host = host
        self._limits = limits

    async def _next(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:  # httpx has closed the response and pooled its connection by now
            self._eof = True
            return b""
        except httpx.TransportError as exc:
            self._eof = True
            raise _translate(exc, self._host) from exc

    async def readany(self) -> bytes:
        """The next bytes as they arrived; b"" at the end of the body."""
        if self._buf:
            chunk, self._buf = self._buf, b""
            return chunk
        if self._eof:
            return b""
        while True:  # an empty chunk from the library is not the end
            chunk = await self._next()
            if chunk or self._eof:
                return chunk

    @property
    def at_eof(self) -> bool:  # httpx tells of the end only when read again: mostly False after data
        return self._eof and not self._buf

    async def read(self, n: int = -1) -> bytes:
        """Exactly n bytes (all when n < 0), fewer only at the end of the body; a whole body past
        ``response_limits.max_body_bytes`` is refused (UpstreamProtocolError) instead of held."""
        parts = [self._buf] if self._buf else []
        have = len(self._buf)
        self._buf = b""
        while (n < 0 or have < n) and not self._eof:
            chunk = await self._next()
            parts.append(chunk)
            have += len(chunk)
            if n < 0 and (fault := body_fault(have, self._limits)) is not None:
                raise UpstreamProtocolError(fault)
        data = b"".join(parts)
        if 0 <= n < len(data):
            data, self._buf = data[:n], data[n:]
        return data


class HttpxResponse:
    """An ``UpstreamResponse`` (base.py) over an httpx streaming response."""

    __slots__ = ("_response", "_client", "status", "headers", "content")

    def __init__(self, response: httpx.Response, client: HttpxUpstreamClient) -> None:
        self._response = response
        self._client = client
        self.status: int = response.status_code
        self.headers = response.headers  # case-insensitive .get() and .items() with lower-case names
        self.content = _Body(response, client.host, client.deployment.response_limits)

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        """Done with the body: a fully read one has already gone back to the pool; else drop the connection."""
        if not self._response.is_closed:
            self._client.close_later(self._response)

    def close(self) -> None:
        """Abort: closing a response before its end closes the connection, so the provider sees it."""
        if not self._response.is_closed:
            self._client.close_later(self._response)


class _CountingBackend:
    """Wraps httpcore's network backend: counts connections and times their set-up for the attempt."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.opened = 0

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> Any:
        wire = CURRENT_WIRE.get()
        if wire is not None:
            wire.connect_start = now()
        stream = await self._inner.connect_tcp(*args, **kwargs)
        self.opened += 1
        if wire is not None:
            wire.connect_end = now()
        return stream

    def __getattr__(self, name: str) -> Any:  # connect_unix_socket, sleep
        return getattr(self._inner, name)


class _NoReuseAfterStrayBytes(httpcore.AsyncConnectionInterface):
    """An httpcore connection that counts as expired when idle with bytes left over from the last response.

    h11 keeps whatever followed a response in the same read (an unsolicited second response) as the
    start of the next one; httpcore would hand it to the next request on that connection. The pool
    closes an expired connection instead of reusing it."""

    def __init__(self, inner: httpcore.AsyncConnectionInterface) -> None:
        self._inner = inner

    def has_expired(self) -> bool:
        if self._inner.has_expired():
            return True
        protocol = getattr(self._inner, "_connection", None)  # None until connected
        h11_state = getattr(protocol, "_h11_state", None)  # None for HTTP/2
        return h11_state is not None and self._inner.is_idle() and bool(h11_state.trailing_data[0])

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def info(self) -> str:
        return self._inner.info()

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return self._inner.can_handle_request(origin)

    def is_available(self) -> bool:
        return self._inner.is_available()

    def is_idle(self) -> bool:
        return self._inner.is_idle()

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def __repr__(self) -> str:
        return repr(self._inner)


class HttpxUpstreamClient:
    """An ``UpstreamClient`` (base.py): pooled httpx client for one deployment."""

    def __init__(self, dep: DeploymentConfig) -> None:
        self.deployment = dep
        self.base_url = dep.base_url
        self.host = host_of(dep.base_url)
        self.static_headers = static_headers(dep)
        self._client: httpx.AsyncClient | None = None
        self._backend: _CountingBackend | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        pool = self.deployment.pool
        limits = httpx.Limits(
            max_connections=pool.max_connections,
            max_keepalive_connections=pool.max_connections,
            keepalive_expiry=pool.keepalive_expiry_s,
        )
        timeout = httpx.Timeout(None, connect=self.deployment.timeouts.connect_ms / 1000.0)
        transport = httpx.AsyncHTTPTransport(
            limits=limits, trust_env=False, verify=tls_context(self.deployment) or True
        )
        pool_impl = transport._pool  # httpcore's pool: wrap its network backend to see connects
        self._backend = _CountingBackend(pool_impl._network_backend)
        pool_impl._network_backend = self._backend  # type: ignore[assignment]
        make_connection = pool_impl.create_connection
        pool_impl.create_connection = lambda origin: _NoReuseAfterStrayBytes(make_connection(origin))  # type: ignore[method-assign]
        self._client = httpx.AsyncClient(
            transport=transport, timeout=timeout, trust_env=False, follow_redirects=False
        )

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close_later(self, response: httpx.Response) -> None:
        """httpx closes asynchronously, release() and close() are sync: run the close as a task."""
        task = asyncio.get_running_loop().create_task(response.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def post(self, path: str, body: bytes, headers: dict[str, str], wire: AttemptWire) -> HttpxResponse:
        """Send a request and return once response headers arrived; the caller reads and releases/aborts."""
        assert self._client is not None, "client not started"
        token = CURRENT_WIRE.set(wire)
        wire.queued_at = now()
        try:
            request = self._client.build_request(
                "POST", endpoint_url(self.base_url, path), content=body, headers=headers
            )
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _translate(exc, self.host) from exc
        finally:
            CURRENT_WIRE.reset(token)
        if wire.connect_start is None:
            wire.reused = True
        fault = head_fault(response.status_code, response.headers.raw, self.deployment.response_limits)
        if fault is not None:
            await response.aclose()
            raise UpstreamProtocolError(fault)
        return HttpxResponse(response, self)

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        assert self._client is not None, "client not started"
        try:
            response = await self._client.get(
                endpoint_url(self.base_url, path), headers=self.static_headers, timeout=timeout_s
            )
        except httpx.TransportError as exc:
            raise _translate(exc, self.host) from exc
        return response.status_code, response.content

    # ------------------------------------------------------------ pool facts

    @property
    def connections_opened(self) -> int:
        return self._backend.opened if self._backend is not None else 0

    def pool_counts(self) -> dict[str, int]:
        """Connections by state: idle in the pool, or active (carrying a request)."""
        if self._client is None:
            return {"idle": 0, "active": 0}
        conns = self._client._transport._pool.connections  # type: ignore[attr-defined]
        idle = sum(1 for c in conns if c.is_idle())
        return {"idle": idle, "active": len(conns) - idle}

    async def warm(self, n: int, timeout_s: float) -> list[tuple[int, bytes] | BaseException]:
        """Open (or exercise) n connections at once: concurrent cheap requests take distinct connections."""
        if n <= 0:
            return []
        return await asyncio.gather(
            *(self.get("/models", timeout_s) for _ in range(n)), return_exceptions=True
        )
