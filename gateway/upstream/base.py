"""The seam between the engine and any upstream HTTP client: three Protocols and one read contract.

The engine (``engine/attempt.py``, ``engine/relay.py``) depends on these and on ``errors.py`` only;
it never imports a client library. ``h1.py`` (the default) and ``httpx_client.py`` implement them,
``select.py`` picks one per process, and the unit tests' scripted upstream implements them in memory.

The read contract (every implementation obeys it; the shared client tests check it):

- ``readany()`` returns the bytes that have arrived since the last read, waiting only until at least
  one byte is there; ``b""`` means the body has ended (and only that).
- ``read(n)`` returns exactly ``n`` bytes, waiting for them, fewer only when the body ends first;
  ``read()`` (``n < 0``) waits for the whole body. Bytes past ``n`` stay buffered for the next read.
  So an error body read with ``read(MAX_ERROR_BODY)`` is never cut short by how it was chunked.
- A failure is raised as an ``errors.UpstreamError``; bytes that arrived before it are returned first.
- ``at_eof`` is True once the body has ended and every byte was read (the next ``readany()`` is ``b""``);
  False while that is not known yet, so a client that learns of the end only by reading again may say False.
"""

from __future__ import annotations

from collections.abc import Awaitable, ItemsView
from typing import Protocol

from gateway.config import DeploymentConfig
from gateway.upstream.wire import AttemptWire


class ResponseHeaders(Protocol):
    """Response header fields with lower-case names; ``get`` and ``items`` are all the engine uses."""

    def get(self, key: str, default: str | None = None, /) -> str | None: ...

    def items(self) -> ItemsView[str, str]: ...


class ResponseBody(Protocol):
    def readany(self) -> Awaitable[bytes]: ...

    def read(self, n: int = -1) -> Awaitable[bytes]: ...

    @property
    def at_eof(self) -> bool: ...


class UpstreamResponse(Protocol):
    """A response whose head has arrived; the body keeps arriving through ``content``."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> ResponseHeaders: ...

    @property
    def content(self) -> ResponseBody: ...

    def read(self) -> Awaitable[bytes]:
        """The whole body (``content.read()``)."""
        ...

    def release(self) -> None:
        """Done with the response: a connection whose body was read to its end goes back to the pool."""
        ...

    def close(self) -> None:
        """Abort: close the connection now, so the provider sees the client leave and stops generating."""
        ...


class UpstreamClient(Protocol):
    """A pooled HTTP client for one deployment."""

    deployment: DeploymentConfig
    host: str
    static_headers: dict[str, str]

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], wire: AttemptWire
    ) -> UpstreamResponse:
        """Send a request; return once the response head arrived (the caller reads, then releases or closes)."""
        ...

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]: ...

    @property
    def connections_opened(self) -> int: ...

    def pool_counts(self) -> dict[str, int]:
        """Connections by state: ``idle`` in the pool, ``active`` carrying a request."""
        ...

    async def warm(self, n: int, timeout_s: float) -> list[tuple[int, bytes] | BaseException]: ...
