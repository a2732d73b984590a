"""The library upstream client: httpx (over httpcore), selectable with ``LLMGW_UPSTREAM_CLIENT=httpx``.

Kept beside the default ``h1.py`` as the well-kept reference it is measured and tested against
(docs/benchmarks.md, "Choosing the upstream client"; tests/e2e/test_upstream_clients.py). It obeys the
read contract of ``base.py`` and maps every httpx failure into ``errors.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.config import DeploymentConfig
from gateway.telemetry.timing import now
from gateway.upstream.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamResetError,
)
from gateway.upstream.wire import CURRENT_WIRE, AttemptWire, host_of, static_headers, tls_context

_CONNECT_FAILURES = (httpx.ConnectError, httpx.PoolTimeout)


def _translate(exc: httpx.TransportError) -> Exception:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamConnectTimeout(text)
    if isinstance(exc, _CONNECT_FAILURES):
        return UpstreamConnectError(text)
    if isinstance(exc, httpx.RemoteProtocolError) and "peer closed" not in str(exc).lower():
        return UpstreamProtocolError(text)
    return UpstreamResetError(text)


class _Body:
    """A ``ResponseBody`` (base.py) over an httpx response's raw byte iterator."""

    __slots__ = ("_it", "_buf", "_eof")

    def __init__(self, response: httpx.Response) -> None:
        self._it = response.aiter_raw().__aiter__()
        self._buf = b""
        self._eof = False

    async def _next(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:  # httpx has closed the response and pooled its connection by now
            self._eof = True
            return b""
        except httpx.TransportError as exc:
            self._eof = True
            raise _translate(exc) from exc

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

    async def read(self, n: int = -1) -> bytes:
        """Exactly n bytes (all when n < 0), fewer only at the end of the body."""
        parts = [self._buf] if self._buf else []
        have = len(self._buf)
        self._buf = b""
        while (n < 0 or have < n) and not self._eof:
            chunk = await self._next()
            parts.append(chunk)
            have += len(chunk)
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
        self.content = _Body(response)

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
        limits = httpx.Limits(max_connections=pool.max_connections, max_keepalive_connections=pool.max_connections,
                              keepalive_expiry=pool.keepalive_expiry_s)
        timeout = httpx.Timeout(None, connect=self.deployment.timeouts.connect_ms / 1000.0)
        transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False,
                                             verify=tls_context(self.deployment) or True)
        pool_impl = transport._pool  # httpcore's pool: wrap its network backend to see connects
        self._backend = _CountingBackend(pool_impl._network_backend)
        pool_impl._network_backend = self._backend  # type: ignore[assignment]
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False,
                                         follow_redirects=False)

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
            request = self._client.build_request("POST", self.base_url + path, content=body, headers=headers)
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _translate(exc) from exc
        finally:
            CURRENT_WIRE.reset(token)
        if wire.connect_start is None:
            wire.reused = True
        return HttpxResponse(response, self)

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        assert self._client is not None, "client not started"
        try:
            response = await self._client.get(self.base_url + path, headers=self.static_headers, timeout=timeout_s)
        except httpx.TransportError as exc:
            raise _translate(exc) from exc
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
        return await asyncio.gather(*(self.get("/models", timeout_s) for _ in range(n)), return_exceptions=True)
