"""What every upstream client shares (``AttemptWire``, ``static_headers``), and aiohttp's client.

The default client is ``h1.py``; this aiohttp one stays selectable (``LLMGW_UPSTREAM_CLIENT=aiohttp``)
as the reference it is measured against (docs/benchmarks.md). Connection set-up and reuse are
observed per request by the connector, so the access log can say whether a request paid for a cold
connection (``upstream_connect_ms``) or waited for a pooled one (``pool_wait_ms``).
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
from typing import Any

import aiohttp

from gateway.config import DeploymentConfig
from gateway.telemetry.timing import now, round3

_JSON = "application/json"


class AttemptWire:
    """What the connection layer saw for one attempt (filled by the trace hooks)."""

    __slots__ = ("queued_at", "dequeued_at", "connect_start", "connect_end", "reused")

    def __init__(self) -> None:
        self.queued_at: float | None = None
        self.dequeued_at: float | None = None
        self.connect_start: float | None = None
        self.connect_end: float | None = None
        self.reused = False

    @property
    def connect_ms(self) -> float:
        if self.connect_start is None or self.connect_end is None:
            return 0.0
        return round3((self.connect_end - self.connect_start) * 1000.0)

    @property
    def pool_wait_ms(self) -> float:
        if self.queued_at is None or self.dequeued_at is None:
            return 0.0
        return round3((self.dequeued_at - self.queued_at) * 1000.0)


# The attempt whose request is being sent on this task: the connector writes what it saw into it.
# A context variable instead of aiohttp's trace hooks, which build several objects and coroutines per
# request even when nothing listens.
CURRENT_WIRE: contextvars.ContextVar[AttemptWire | None] = contextvars.ContextVar("llmgw_wire", default=None)


class _ObservedConnector(aiohttp.TCPConnector):
    """Counts connections opened and tells each attempt whether it paid for one or waited for one."""

    opened = 0

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        wire = CURRENT_WIRE.get()
        if wire is None:
            return await super().connect(req, traces, timeout)
        t0 = now()
        conn = await super().connect(req, traces, timeout)
        t1 = now()
        wire.queued_at = t0
        if wire.connect_start is None:
            wire.reused = True
            wire.dequeued_at = t1
        else:  # time in connect() beyond the handshake itself was spent waiting for a pool slot
            wire.dequeued_at = t1 - (wire.connect_end - wire.connect_start)
        return conn

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        wire = CURRENT_WIRE.get()
        t0 = now()
        proto = await super()._create_connection(req, traces, timeout)
        self.opened += 1
        if wire is not None:
            wire.connect_start, wire.connect_end = t0, now()
        return proto


def static_headers(dep: DeploymentConfig) -> dict[str, str]:
    """The headers every request to ``dep`` carries: content type, identity encoding, auth, configured."""
    headers: dict[str, str] = {"content-type": _JSON, "accept-encoding": "identity"}
    if dep.api_key and dep.auth_header == "authorization":
        headers["authorization"] = f"Bearer {dep.api_key}"
    elif dep.api_key and dep.auth_header == "api-key":
        headers["api-key"] = dep.api_key
    headers.update(dep.headers)
    return headers


def tls_context(dep: DeploymentConfig) -> ssl.SSLContext | None:
    """Verification for an https:// deployment: the system CA store, plus ``ca_file`` when set."""
    if not dep.base_url.startswith("https://"):
        return None
    ctx = ssl.create_default_context()
    if dep.ca_file:
        ctx.load_verify_locations(cafile=dep.ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class UpstreamClient:
    """Pooled HTTP client for one deployment; auth and static headers pre-built once."""

    def __init__(self, dep: DeploymentConfig) -> None:
        self.deployment = dep
        self.base_url = dep.base_url
        self.host = dep.base_url.split("://", 1)[1].split("/", 1)[0]
        self.static_headers = static_headers(dep)
        self._session: aiohttp.ClientSession | None = None
        self._connector: _ObservedConnector | None = None

    async def start(self) -> None:
        pool = self.deployment.pool
        self._connector = _ObservedConnector(
            limit=pool.max_connections,
            limit_per_host=0,
            keepalive_timeout=pool.keepalive_expiry_s,
            ttl_dns_cache=300,
            family=socket.AF_UNSPEC,
            ssl=tls_context(self.deployment) or True,
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.deployment.timeouts.connect_ms / 1000.0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, path: str, body: bytes, headers: dict[str, str], wire: AttemptWire) -> aiohttp.ClientResponse:
        """Send a request and return once response headers arrived; the caller reads and releases/aborts."""
        assert self._session is not None, "client not started"
        token = CURRENT_WIRE.set(wire)
        try:
            return await self._session.post(self.base_url + path, data=body, headers=headers)
        finally:
            CURRENT_WIRE.reset(token)

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        assert self._session is not None, "client not started"
        async with self._session.get(self.base_url + path, headers=self.static_headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status, await resp.read()

    # ------------------------------------------------------------ pool facts

    @property
    def connections_opened(self) -> int:
        return self._connector.opened if self._connector else 0

    def pool_counts(self) -> dict[str, int]:
        """Connections by state: idle in the pool, or active (carrying a request)."""
        c = self._connector
        if c is None:
            return {"idle": 0, "active": 0}
        idle = sum(len(v) for v in c._conns.values())  # aiohttp keeps idle connections per key here
        active = len(c._acquired)
        return {"idle": idle, "active": active}

    async def warm(self, n: int, timeout_s: float) -> list[tuple[int, bytes] | BaseException]:
        """Open (or exercise) n connections at once: concurrent cheap requests take distinct connections."""
        if n <= 0:
            return []
        return await asyncio.gather(*(self.get("/models", timeout_s) for _ in range(n)), return_exceptions=True)
