"""Typed shapes at the ASGI edge (after Starlette's ``types.py``) and the worker lifecycle the edge drives.

ASGI scopes and messages are plain dicts filled by the server; their values are heterogeneous by
specification, so a key's type is the ASGI spec's, not the mapping's. Aliases only: no runtime cost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.engine.exchange import Exchange
    from gateway.upstream.reachability import ReachabilityBoard

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JsonObject = dict[str, object]  # a decoded JSON object (a request or response body)


class Lifecycle(Protocol):
    """What the edge needs of the worker's lifecycle (``app.Lifecycle``): start/stop, drain, readiness."""

    draining: bool
    open: set[Exchange]  # requests in flight: the edge adds and removes them
    reachability: ReachabilityBoard  # each deployment's last check, for /admin/deployments

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def begin_drain(self) -> None: ...

    def readiness(self) -> tuple[bool, dict[str, object]]: ...

    def refresh_gauges(self) -> None: ...
