"""CORS for browser clients, off unless `server.cors_origins` lists origins.

A pure ASGI middleware: a preflight from a listed origin is answered here (204); a request from a
listed origin gets `access-control-allow-origin` added to its response; anything else passes through
untouched, so a browser page from an unlisted origin cannot read the gateway's answers, and the edge
refuses its proxy requests (preflights included) and logs them (``api/headers.py``). No
credentials mode: the gateway key travels in `Authorization`, which only needs to be an allowed
header, so `access-control-allow-credentials` is never sent.
"""

from __future__ import annotations

from gateway.api.headers import OriginPolicy
from gateway.api.types import ASGIApp, Message, Receive, Scope, Send

_METHODS = b"GET, POST, OPTIONS"
# Sent by the OpenAI SDKs and our own hints; the preflight echoes whatever else a page asks for only
# when it is one of these.
_ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "api-key",
        "content-type",
        "x-request-id",
        "traceparent",
        "tracestate",
        "x-gateway-timeout-ms",
        "x-gateway-hedge",
        "x-gateway-region",
        "openai-organization",
        "openai-project",
        "openai-beta",
    }
)
_EXPOSED = (  # what a browser SDK may read: x-should-retry tells it not to retry (the official SDKs honour it)
    b"x-request-id, x-gateway-upstream, x-gateway-upstream-service-time, retry-after, x-should-retry, server-timing"
)
_MAX_AGE = b"600"


class CORSMiddleware:
    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.policy = OriginPolicy(origins)

    def _allowed(self, origin: bytes) -> bool:
        return self.policy.listed(origin.decode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = None
        request_method = None
        request_headers = b""
        for k, v in scope["headers"]:
            if k == b"origin":
                origin = v
            elif k == b"access-control-request-method":
                request_method = v
            elif k == b"access-control-request-headers":
                request_headers = v
        if origin is None or not self._allowed(origin):
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS" and request_method is not None:
            return await self._preflight(send, origin, request_headers)

        async def send_with_cors(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", []))
                headers += [
                    (b"access-control-allow-origin", origin),
                    (b"vary", b"Origin"),
                    (b"access-control-expose-headers", _EXPOSED),
                ]
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, send: Send, origin: bytes, request_headers: bytes) -> None:
        asked = [h.strip().lower() for h in request_headers.decode("latin-1").split(",") if h.strip()]
        allowed = [h for h in asked if h in _ALLOWED_HEADERS or h.startswith(("x-stainless-", "openai-"))]
        headers = [
            (b"access-control-allow-origin", origin),
            (b"vary", b"Origin"),
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-max-age", _MAX_AGE),
        ]
        if allowed:
            headers.append((b"access-control-allow-headers", ", ".join(allowed).encode("latin-1")))
        await _respond(send, 204, headers, b"")


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = headers + [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
