"""Connection-level limits of the public listener: how big a request head may grow, how long it may
take to arrive, and how long a fresh connection may stay silent.

They act in the HTTP protocol (``api/protocol.py``), before a request exists for the app: a 64 MB
header is refused after its first 64 KiB instead of being buffered whole, and a client sending its
head one byte a second (slowloris) is cut off after ``request_headers_timeout_s``, as Envoy does.
The app hands an ``EdgeLimits`` to the protocol through the lifespan state (``scope["state"]``), so
every connection of a worker finds it without a global, and a plain uvicorn simply has none.

Timeouts are checked by one sweep per worker over its open connections, not by a timer per request:
a request pays only for storing when its head began, which the protocol reads anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from gateway.config import ServerConfig
from gateway.errors import GatewayError
from gateway.flags import ResponseFlag
from gateway.telemetry.timing import now

EDGE_KEY = "llmgw.edge"


class EdgeConnection(Protocol):
    def expire(self, t: float, limits: EdgeLimits) -> None: ...


def head_too_large(limit: int) -> GatewayError:
    return GatewayError(
        431,
        f"Request head (request line and headers) exceeds the gateway's limit of {limit} bytes.",
        "invalid_request_error",
        "headers_too_large",
        flag=ResponseFlag.BAD_REQUEST,
    )


def too_many_headers(limit: int) -> GatewayError:
    return GatewayError(
        431,
        f"Request has more than {limit} headers (server.max_headers).",
        "invalid_request_error",
        "too_many_headers",
        flag=ResponseFlag.BAD_REQUEST,
    )


def too_many_connections(limit: int) -> GatewayError:
    return GatewayError(
        503,
        f"The gateway worker has {limit} open connections, its limit (server.max_connections); retry shortly.",
        "server_error",
        "too_many_connections",
        flag=ResponseFlag.OVERFLOW,
    )


def head_timeout(timeout_s: float) -> GatewayError:
    return GatewayError(
        408,
        f"Request head not received within {timeout_s:g} s (server.request_headers_timeout_s).",
        "invalid_request_error",
        "request_timeout",
        flag=ResponseFlag.REQUEST_HEADERS_TIMEOUT,
    )


def request_timeout(timeout_s: float) -> GatewayError:
    return GatewayError(
        408,
        f"Request body not received within {timeout_s:g} s of the request's first byte (server.request_timeout_s).",
        "invalid_request_error",
        "request_timeout",
        flag=ResponseFlag.REQUEST_HEADERS_TIMEOUT,
    )


def malformed_http() -> GatewayError:
    return GatewayError(
        400,
        "Malformed HTTP/1.1 request: the gateway could not parse it.",
        "invalid_request_error",
        "invalid_http",
        flag=ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
    )


def unsupported_upgrade(protocol: str) -> GatewayError:
    return GatewayError(
        400,
        f"Upgrade to {protocol[:40]!r} is not supported: the gateway speaks HTTP/1.1 (WebSocket APIs such as "
        "Realtime are not proxied). Send the request without an Upgrade header (curl: --http1.1).",
        "invalid_request_error",
        "unsupported_upgrade",
        flag=ResponseFlag.BAD_REQUEST,
    )


def response_bytes(err: GatewayError) -> bytes:
    """A whole HTTP/1.1 response closing the connection, written by the protocol itself."""
    body = err.body()
    reason = {
        400: b"Bad Request",
        408: b"Request Timeout",
        431: b"Request Header Fields Too Large",
        503: b"Service Unavailable",
    }.get(err.status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (err.status, reason, len(body))
    ) + body


class EdgeLimits:
    """One worker's connection limits, its open connections, and the sweep that times them out."""

    def __init__(
        self,
        srv: ServerConfig,
        on_refused: Callable[[GatewayError, str, str, str | None, float, int], None],
        on_limit: Callable[[str], None],
    ) -> None:
        self.max_head_bytes = srv.max_header_bytes
        self.max_headers = srv.max_headers
        self.max_connections = srv.max_connections
        self.head_timeout_s = srv.request_headers_timeout_s
        self.request_timeout_s = srv.request_timeout_s
        self.idle_timeout_s = srv.idle_timeout_s
        self.send_timeout_s = srv.send_timeout_s
        # (error, method, path, client, started, body bytes sent) -> log and count as a request
        self.on_refused = on_refused
        self.on_limit = on_limit  # (limit name) -> count; idle closes are not requests, so only counted
        self.connections: set[EdgeConnection] = set()
        # The sweep's period bounds how late a timeout fires: a quarter of the shortest, at most 1 s.
        self.sweep_s = max(
            0.02,
            min(
                1.0,
                self.head_timeout_s / 4,
                self.request_timeout_s / 4,
                self.idle_timeout_s / 4,
                self.send_timeout_s / 4,
            ),
        )
        self._task: asyncio.Task[None] | None = None

    def install(self, state: dict[str, Any] | None) -> None:
        """Start the sweep and offer the limits to the protocol through the lifespan state."""
        if state is not None:
            state[EDGE_KEY] = self
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            t = now()
            for conn in list(self.connections):
                conn.expire(t, self)
