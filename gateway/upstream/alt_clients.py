"""Interchangeable upstream HTTP clients, chosen once at start-up by ``LLMGW_UPSTREAM_CLIENT``.

``h1`` (the default, ``gateway/upstream/h1.py``) is what the gateway ships with. The others exist so
the choice stays measurable inside the real gateway (docs/benchmarks.md, "Choosing the upstream
client"): ``aiohttp`` (``client.py``), ``httpx``, ``httpx2`` and ``httpx-aiohttp`` (httpx's API over
an aiohttp transport). They are drop-in: same attributes and methods as ``UpstreamClient``, a response that
reads like aiohttp's (``status``, ``headers``, ``content.readany()``, ``read()``, ``release()``,
``close()``), and transport failures raised as ``ConnectionError`` subclasses, which the engine
already classifies (refused/timed-out connect -> connect failure, anything later -> reset).

The httpx-family libraries are imported only when selected, so the default costs nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp

from gateway.config import DeploymentConfig, ResponseLimitsConfig
from gateway.telemetry.timing import now
from gateway.upstream.client import AttemptWire, UpstreamClient, tls_context
from gateway.upstream.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamResetError
from gateway.upstream.framing import body_fault, head_fault
from gateway.upstream.h1 import H1UpstreamClient

CLIENT_ENV = "LLMGW_UPSTREAM_CLIENT"

# The attempt whose request is being sent in this task: connection set-up runs inside the request's
# own task in every client here, so the connect hooks find the attempt's wire without plumbing.
_WIRE: contextvars.ContextVar[AttemptWire | None] = contextvars.ContextVar("llmgw_wire", default=None)


class ClientKind(StrEnum):
    H1 = "h1"
    AIOHTTP = "aiohttp"
    HTTPX = "httpx"
    HTTPX2 = "httpx2"
    HTTPX_AIOHTTP = "httpx-aiohttp"


def parse_kind(value: str | None) -> ClientKind:
    if not value:
        return ClientKind.H1
    try:
        return ClientKind(value.strip().lower())
    except ValueError:
        names = ", ".join(k.value for k in ClientKind)
        raise ValueError(f"{CLIENT_ENV}={value!r}: unknown upstream client (one of {names})") from None


@functools.cache
def selected_kind() -> ClientKind:
    """The client kind for this process, read from the environment once."""
    return parse_kind(os.environ.get(CLIENT_ENV))


def make_client(dep: DeploymentConfig) -> Any:
    """The upstream client for one deployment, of the kind ``LLMGW_UPSTREAM_CLIENT`` names."""
    return client_of_kind(selected_kind(), dep)


def client_of_kind(kind: ClientKind, dep: DeploymentConfig) -> Any:
    if kind is ClientKind.H1:
        return H1UpstreamClient(dep)
    if kind is ClientKind.AIOHTTP:
        return UpstreamClient(dep)
    return HttpxUpstreamClient(dep, kind)


# ------------------------------------------------------------------ httpx-family response adapter


@dataclass(frozen=True, slots=True)
class _Errors:
    connect: tuple[type[BaseException], ...]  # failures before the connection was open
    transport: type[BaseException]  # base class of every other transport failure
    protocol: tuple[type[BaseException], ...] = ()  # the provider's answer broke HTTP/1.1
    host: str = ""  # the upstream's address: kept out of messages, which reach clients


# httpcore/h11 report a provider that hung up early as a protocol error; like h1, count it as a reset (UC).
_CLOSED_EARLY = ("peer closed connection", "Server disconnected")


def _translate(exc: BaseException, errors: _Errors) -> OSError:
    text = f"{type(exc).__name__}: {exc}"
    if errors.host:
        text = text.replace(errors.host, "the provider")
    if isinstance(exc, errors.connect):
        return UpstreamConnectError(text)
    if isinstance(exc, errors.protocol) and not any(m in text for m in _CLOSED_EARLY):
        return UpstreamProtocolError(text)
    return UpstreamResetError(text)


class _Body:
    """aiohttp-style reader over an httpx response's raw byte iterator."""

    __slots__ = ("_it", "_buf", "_eof", "_errors", "_limits")

    def __init__(self, response: Any, errors: _Errors, limits: ResponseLimitsConfig) -> None:
        self._it = response.aiter_raw().__aiter__()
        self._buf = b""
        self._eof = False
        self._errors = errors
        self._limits = limits

    async def _next(self) -> bytes:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:  # httpx has closed the response and pooled its connection by now
            self._eof = True
            return b""
        except self._errors.transport as exc:
            self._eof = True
            raise _translate(exc, self._errors) from exc

    async def readany(self) -> bytes:
        """The next chunk as it arrived; b"" at the end of the body."""
        if self._buf:
            chunk, self._buf = self._buf, b""
            return chunk
        if self._eof:
            return b""
        return await self._next()

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all when n < 0), fewer only at the end of the body."""
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


class AltResponse:
    """The subset of ``aiohttp.ClientResponse`` the engine uses, over an httpx-family response."""

    __slots__ = ("_response", "_client", "status", "headers", "content")

    def __init__(self, response: Any, client: HttpxUpstreamClient) -> None:
        self._response = response
        self._client = client
        self.status: int = response.status_code
        self.headers = response.headers  # case-insensitive .get() and .items() with lower-case names
        self.content = _Body(response, client.errors, client.deployment.response_limits)

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


# ------------------------------------------------------------------ connection hooks


class _CountingBackend:
    """Wraps an httpcore network backend: counts connections and times their set-up for the attempt."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.opened = 0

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> Any:
        wire = _WIRE.get()
        if wire is not None:
            wire.connect_start = now()
        stream = await self._inner.connect_tcp(*args, **kwargs)
        self.opened += 1
        if wire is not None:
            wire.connect_end = now()
        return stream

    def __getattr__(self, name: str) -> Any:  # connect_unix_socket, sleep
        return getattr(self._inner, name)


class _CountingConnector(aiohttp.TCPConnector):
    """aiohttp connector for the httpx-aiohttp transport: counts and times connections like the others."""

    opened = 0

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        wire = _WIRE.get()
        if wire is not None:
            wire.connect_start = now()
        proto = await super()._create_connection(req, traces, timeout)
        self.opened += 1
        if wire is not None:
            wire.connect_end = now()
        return proto


class _NoReuseAfterStrayBytes:
    """An httpcore connection that counts as expired when idle with bytes left over from the last response.

    h11 keeps whatever followed a response in the same read (an unsolicited second response) as the
    start of the next one; httpcore would hand it to the next request on that connection. The pool
    closes an expired connection instead of reusing it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def has_expired(self) -> bool:
        if self._inner.has_expired():
            return True
        h11_conn = getattr(self._inner._connection, "_h11_state", None)  # None until connected, or HTTP/2
        return h11_conn is not None and self._inner.is_idle() and bool(h11_conn.trailing_data[0])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ------------------------------------------------------------------ the client


class HttpxUpstreamClient:
    """Pooled client for one deployment over httpx, httpx2, or httpx with the aiohttp transport."""

    def __init__(self, dep: DeploymentConfig, kind: ClientKind) -> None:
        base = UpstreamClient(dep)  # same URL, host and pre-built headers as the default client
        self.deployment = dep
        self.kind = kind
        self.base_url = base.base_url
        self.host = base.host
        self.static_headers = base.static_headers
        self._client: Any = None
        self._backend: _CountingBackend | None = None
        self._connector: _CountingConnector | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._lib: Any = None
        self.errors = _Errors((), OSError)

    async def start(self) -> None:
        if self.kind is ClientKind.HTTPX2:
            import httpx2 as lib
        else:
            import httpx as lib
        self._lib = lib
        self.errors = _Errors((lib.ConnectError, lib.ConnectTimeout, lib.PoolTimeout), lib.TransportError,
                              (lib.RemoteProtocolError,), self.host)
        pool = self.deployment.pool
        limits = lib.Limits(max_connections=pool.max_connections, max_keepalive_connections=pool.max_connections,
                            keepalive_expiry=pool.keepalive_expiry_s)
        timeout = lib.Timeout(None, connect=self.deployment.timeouts.connect_ms / 1000.0)
        if self.kind is ClientKind.HTTPX_AIOHTTP:
            from httpx_aiohttp import AiohttpTransport

            self._connector = _CountingConnector(limit=pool.max_connections, limit_per_host=0,
                                                 keepalive_timeout=pool.keepalive_expiry_s, ttl_dns_cache=300,
                                                 family=socket.AF_UNSPEC, ssl=tls_context(self.deployment) or True)
            session = aiohttp.ClientSession(connector=self._connector, auto_decompress=False,
                                            cookie_jar=aiohttp.DummyCookieJar(),
                                            skip_auto_headers=("User-Agent", "Accept-Encoding"))
            transport: Any = AiohttpTransport(client=session, limits=limits, trust_env=False)
        else:
            transport = lib.AsyncHTTPTransport(limits=limits, trust_env=False,
                                               verify=tls_context(self.deployment) or True)
            pool_impl = transport._pool  # httpcore's pool: wrap its network backend to see connects
            self._backend = _CountingBackend(pool_impl._network_backend)
            pool_impl._network_backend = self._backend
            make_connection = pool_impl.create_connection
            pool_impl.create_connection = lambda origin: _NoReuseAfterStrayBytes(make_connection(origin))
        self._client = lib.AsyncClient(transport=transport, timeout=timeout, trust_env=False,
                                       follow_redirects=False)

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close_later(self, response: Any) -> None:
        """httpx closes asynchronously; aiohttp's release()/close() are sync, so run it as a task."""
        task = asyncio.get_running_loop().create_task(response.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def post(self, path: str, body: bytes, headers: dict[str, str], wire: AttemptWire) -> AltResponse:
        """Send a request and return once response headers arrived; the caller reads and releases/aborts."""
        assert self._client is not None, "client not started"
        token = _WIRE.set(wire)
        try:
            request = self._client.build_request("POST", self.base_url + path, content=body, headers=headers)
            response = await self._client.send(request, stream=True)
        except self.errors.transport as exc:
            raise _translate(exc, self.errors) from exc
        finally:
            _WIRE.reset(token)
        fault = head_fault(response.status_code, response.headers.raw, self.deployment.response_limits)
        if fault is not None:
            await response.aclose()
            raise UpstreamProtocolError(fault)
        return AltResponse(response, self)

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        assert self._client is not None, "client not started"
        try:
            response = await self._client.get(self.base_url + path, headers=self.static_headers, timeout=timeout_s)
        except self.errors.transport as exc:
            raise _translate(exc, self.errors) from exc
        return response.status_code, response.content

    # ------------------------------------------------------------ pool facts

    @property
    def connections_opened(self) -> int:
        counter = self._backend or self._connector
        return counter.opened if counter is not None else 0

    def pool_counts(self) -> dict[str, int]:
        """Connections by state: idle in the pool, or active (carrying a request)."""
        if self._connector is not None:
            c = self._connector
            return {"idle": sum(len(v) for v in c._conns.values()), "active": len(c._acquired)}
        if self._client is None:
            return {"idle": 0, "active": 0}
        conns = self._client._transport._pool.connections
        idle = sum(1 for c in conns if c.is_idle())
        return {"idle": idle, "active": len(conns) - idle}

    async def warm(self, n: int, timeout_s: float) -> list[tuple[int, bytes] | BaseException]:
        """Open (or exercise) n connections at once: concurrent cheap requests take distinct connections."""
        if n <= 0:
            return []
        return await asyncio.gather(*(self.get("/models", timeout_s) for _ in range(n)), return_exceptions=True)
