"""Every selectable upstream client (LLMGW_UPSTREAM_CLIENT) obeys the contract of gateway/upstream/base.py.

A tiny aiohttp server on loopback plays the provider; each client kind must relay chunks as they
arrive, reuse its connection, read error bodies whole up to the bound however they were chunked,
abort so the provider sees the close, and raise a refused connection as an ``UpstreamConnectError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import DeploymentConfig
from gateway.upstream.errors import UpstreamConnectError
from gateway.upstream.select import CLIENT_ENV, ClientKind, client_of_kind, parse_kind
from gateway.upstream.wire import AttemptWire

KINDS = list(ClientKind)


class Provider:
    """What the fake provider saw."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()
        self.release = asyncio.Event()  # the slow stream's second chunk waits for this


def _app(seen: Provider) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Ratelimit-Remaining": "9"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        slow = request.query.get("slow") == "1"
        try:
            if slow:
                for _ in range(200):  # until the client goes away (bounded: 2 s)
                    await asyncio.sleep(0.01)
                    await resp.write(b"data: tick\n\n")
            else:
                await seen.release.wait()
                await resp.write(b"data: two\n\n")
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            seen.aborted.set()
            return resp
        await resp.write_eof()
        return resp

    async def error(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=429, headers={"Retry-After": "1"})
        await resp.prepare(request)
        for _ in range(5):  # five separate chunks: a read must wait for what it asked for
            await resp.write(b"x" * 1000)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_post("/v1/stream", stream)
    app.router.add_post("/v1/error", error)
    app.router.add_get("/v1/models", models)
    return app


@asynccontextmanager
async def provider() -> AsyncIterator[tuple[Provider, str]]:
    seen = Provider()
    runner = web.AppRunner(_app(seen), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield seen, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def _client(kind: ClientKind, base_url: str) -> Any:
    dep = DeploymentConfig(id="p", base_url=base_url, api_key="sk-test")
    return client_of_kind(kind, dep)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_stream_chunks_arrive_as_sent_and_the_connection_is_reused(kind: ClientKind) -> None:
    async def scenario() -> None:
        async with provider() as (seen, base):
            client = _client(kind, base)
            await client.start()
            try:
                for _ in range(2):
                    seen.release.clear()
                    resp = await client.post("/stream", b"{}", dict(client.static_headers), AttemptWire())
                    assert resp.status == 200
                    assert resp.headers.get("content-type") == "text/event-stream"
                    assert resp.headers.get("X-RATELIMIT-REMAINING") == "9"
                    # the first chunk is readable while the provider still holds back the second
                    assert await asyncio.wait_for(resp.content.readany(), 2) == b"data: one\n\n"
                    assert not resp.content.at_eof  # more is coming
                    seen.release.set()
                    rest = b""
                    while chunk := await resp.content.readany():
                        rest += chunk
                    assert rest == b"data: two\n\n"
                    assert resp.content.at_eof
                    assert await resp.content.readany() == b""
                    resp.release()
                await asyncio.sleep(0.05)
                assert client.connections_opened == 1
                assert client.pool_counts() == {"idle": 1, "active": 0}
            finally:
                await client.close()

    run(scenario)


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_error_body_is_read_bounded(kind: ClientKind) -> None:
    async def scenario() -> None:
        async with provider() as (_seen, base):
            client = _client(kind, base)
            await client.start()
            try:
                resp = await client.post("/error", b"{}", dict(client.static_headers), AttemptWire())
                assert resp.status == 429
                assert resp.headers.get("retry-after") == "1"
                assert await resp.content.read(1500) == b"x" * 1500  # spans chunks: never cut short
                assert await resp.content.read() == b"x" * 3500  # the rest, to the end
                assert await resp.content.read(10) == b""
                resp.release()
            finally:
                await client.close()

    run(scenario)


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_close_mid_stream_is_seen_by_the_provider(kind: ClientKind) -> None:
    async def scenario() -> None:
        async with provider() as (seen, base):
            client = _client(kind, base)
            await client.start()
            try:
                resp = await client.post("/stream?slow=1", b"{}", dict(client.static_headers), AttemptWire())
                assert await resp.content.readany()
                resp.close()
                await asyncio.wait_for(seen.aborted.wait(), 3)
            finally:
                await client.close()

    run(scenario)


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_refused_connection_is_a_connect_failure(kind: ClientKind) -> None:
    async def scenario() -> None:
        async with provider() as (_seen, base):
            dead = base  # the port is closed once the provider has stopped
        client = _client(kind, dead)
        await client.start()
        try:
            with pytest.raises(UpstreamConnectError):
                await client.post("/stream", b"{}", dict(client.static_headers), AttemptWire())
            results = await client.warm(1, 2.0)
            assert isinstance(results[0], UpstreamConnectError)
        finally:
            await client.close()

    run(scenario)


def test_client_kind_comes_from_the_environment_value() -> None:
    assert parse_kind(None) is ClientKind.H1
    assert parse_kind(" HTTPX ") is ClientKind.HTTPX
    for gone in (
        "aiohttp",
        "httpx2",
        "httpx-aiohttp",
        "requests",
    ):  # removed (docs/benchmarks.md) or never there
        with pytest.raises(ValueError, match=CLIENT_ENV):
            parse_kind(gone)
