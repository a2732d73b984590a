"""The default upstream client (gateway/upstream/h1.py) against raw HTTP/1.1 servers on loopback.

What the shared client tests (test_upstream_clients.py) do not reach: bodies framed every way HTTP/1.1
allows, large bodies and a slow reader, the pool's limit, queue and expiry, TLS, and providers that
answer garbage or hang up.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from harness import self_signed_cert, tls_server_context

from gateway.config import ConfigError, DeploymentConfig, parse_config
from gateway.upstream.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamResetError,
)
from gateway.upstream.h1 import HIGH_WATER, H1UpstreamClient
from gateway.upstream.select import ClientKind, client_of_kind
from gateway.upstream.wire import AttemptWire

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(b":", 1) for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return lines[0], headers, body


@asynccontextmanager
async def raw_server(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[int]]]:
    """A server running ``handler`` per connection; yields its base URL and the list of connection numbers."""
    conns: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(len(conns))
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1", conns
    finally:
        server.close()


def keep_alive(respond: Callable[[bytes, bytes], bytes], gate: asyncio.Event | None = None) -> Handler:
    """A handler answering every request on the connection with ``respond(request_line, body)``,
    each answer held back until ``gate`` is set when there is one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _headers, body = await read_request(reader)
            if gate is not None:
                await gate.wait()
            writer.write(respond(line, body))
            await writer.drain()

    return handler


def client(base: str, **pool: float) -> H1UpstreamClient:
    return H1UpstreamClient(
        DeploymentConfig(id="p", base_url=base, api_key="sk-test", pool=pool, timeouts={"connect_ms": 300})
    )


async def fetch(c: H1UpstreamClient, wire: AttemptWire | None = None) -> tuple[int, bytes]:
    """One POST read to its end and released, as the engine does."""
    resp = await c.post("/x", b"{}", c.static_headers, wire or AttemptWire())
    data = await resp.read()
    resp.release()
    return resp.status, data


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def test_request_head_carries_path_host_auth_and_length() -> None:
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()

    async def scenario() -> None:
        async with raw_server(handler) as (base, _):
            c = client(base)
            await c.start()
            headers = {**c.static_headers, "x-request-id": "r1"}
            resp = await c.post("/chat/completions", b'{"a":1}', headers, AttemptWire())
            assert (resp.status, await resp.read()) == (200, b"{}")
            resp.release()
            await c.close()
        line, h, body = seen[0]
        assert line == b"POST /v1/chat/completions HTTP/1.1"
        assert h[b"host"] == base.split("//")[1].split("/")[0].encode()
        assert h[b"authorization"] == b"Bearer sk-test" and h[b"x-request-id"] == b"r1"
        assert h[b"content-length"] == b"7" and body == b'{"a":1}'

    run(scenario)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_large_body_arrives_whole_however_it_is_framed(framing: str) -> None:
    payload = bytes(range(256)) * (3 * HIGH_WATER // 256)  # past the pause threshold: must not stall

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 10_000):
                part = payload[i : i + 10_000]
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            writer.write(b"0\r\n\r\n")
        else:  # no length: the body ends when the connection does
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + payload)
            await writer.drain()
            writer.close()
            return
        await writer.drain()
        await reader.read()  # hold the connection open until the client closes it

    async def scenario() -> None:
        async with raw_server(handler) as (base, _):
            c = client(base)
            await c.start()
            resp = await c.post("/x", b"{}", c.static_headers, AttemptWire())
            assert await resp.read() == payload
            resp.release()
            assert c.pool_counts() == {"idle": 0 if framing == "close" else 1, "active": 0}
            await c.close()

    run(scenario)


def test_a_slow_reader_pauses_the_provider_instead_of_buffering_the_stream() -> None:
    total = 40 * HIGH_WATER

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def scenario() -> None:
        async with raw_server(handler) as (base, _):
            c = client(base)
            await c.start()
            resp = await c.post("/x", b"{}", c.static_headers, AttemptWire())
            got, biggest = 0, 0
            while chunk := await resp.content.readany():
                got += len(chunk)
                biggest = max(biggest, len(chunk))
                await asyncio.sleep(0.002)  # a client slower than its provider
            assert got == total
            # what piles up between two reads: the threshold plus at most one socket read (256 KiB)
            assert biggest <= 2 * HIGH_WATER
            resp.release()
            await c.close()

    run(scenario)


@asynccontextmanager
async def one_connection_pool(
    answer: bytes,
) -> AsyncIterator[tuple[H1UpstreamClient, asyncio.Event, list[int]]]:
    """A client allowed one connection, to a provider whose answers wait until the yielded gate is set."""
    gate = asyncio.Event()
    async with raw_server(keep_alive(lambda _line, _body: answer, gate)) as (base, conns):
        c = client(base, max_connections=1, min_connections=0)
        await c.start()
        try:
            yield c, gate, conns
        finally:
            await c.close()


def test_the_pool_limit_queues_callers_and_hands_connections_on() -> None:
    async def scenario() -> None:
        async with one_connection_pool(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") as (c, gate, conns):

            async def call() -> AttemptWire:
                wire = AttemptWire()
                assert await fetch(c, wire) == (200, b"ok")
                return wire

            tasks = [asyncio.create_task(call()) for _ in range(3)]
            await asyncio.sleep(0.1)
            assert c.pool_counts() == {"idle": 0, "active": 1}
            gate.set()
            wires = await asyncio.gather(*tasks)
            assert len(conns) == 1 and c.connections_opened == 1
            waited = sorted(w.pool_wait_ms for w in wires)
            assert waited[0] < 5.0 and waited[-1] >= 50.0  # the last caller queued behind two responses
            assert [w.reused for w in wires].count(False) == 1

    run(scenario)


def test_a_cancelled_caller_does_not_lose_the_pool_slot() -> None:
    async def scenario() -> None:
        async with one_connection_pool(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as (c, gate, _):
            first = asyncio.create_task(c.post("/x", b"{}", c.static_headers, AttemptWire()))
            queued = asyncio.create_task(c.post("/x", b"{}", c.static_headers, AttemptWire()))
            await asyncio.sleep(0.05)
            first.cancel()  # closes its connection: the slot goes to the queued caller
            gate.set()
            resp = await asyncio.wait_for(queued, 2)
            assert resp.status == 200
            resp.release()
            assert c.pool_counts() == {"idle": 1, "active": 0}

    run(scenario)


def test_a_connection_lost_on_its_way_to_a_queued_caller_is_replaced() -> None:
    async def scenario() -> None:
        async with one_connection_pool(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") as (c, gate, conns):
            gate.set()
            resp = await c.post("/x", b"{}", c.static_headers, AttemptWire())
            await resp.read()
            queued = asyncio.create_task(fetch(c))
            await asyncio.sleep(0.02)
            conn = resp._conn
            assert conn is not None and conn.transport is not None
            resp.release()  # handed straight to the queued caller ...
            conn.transport.abort()  # ... and lost before that caller runs
            assert await asyncio.wait_for(queued, 2) == (200, b"ok")
            assert len(conns) == 2

    run(scenario)


@pytest.mark.parametrize(
    ("answer", "pool", "pauses", "idle_after"),
    [
        # expired: the first two calls share a connection, the third (after 0.1 s idle) opens a new one
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", {"keepalive_expiry_s": 0.05}, (0.0, 0.0, 0.1), 1),
        # the provider said it closes: each call opens its own
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", {}, (0.0, 0.0), 0),
    ],
    ids=["keepalive-expiry", "connection-close"],
)
def test_a_connection_is_not_reused_past_expiry_or_after_connection_close(
    answer: bytes, pool: dict[str, float], pauses: tuple[float, ...], idle_after: int
) -> None:
    async def scenario() -> None:
        async with raw_server(keep_alive(lambda _line, _body: answer)) as (base, conns):
            c = client(base, **pool)
            await c.start()
            for pause in pauses:
                await asyncio.sleep(pause)
                assert (await fetch(c))[0] == 200
            await asyncio.sleep(0.05)
            assert len(conns) == 2 and c.connections_opened == 2
            assert c.pool_counts() == {"idle": idle_after, "active": 0}
            await c.close()

    run(scenario)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", UpstreamResetError),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", UpstreamResetError),
        (b"NOT HTTP AT ALL\r\n\r\n", UpstreamProtocolError),  # the provider answered, not in HTTP: 502 UPE
    ],
)
def test_a_provider_that_hangs_up_is_a_reset_and_one_that_answers_garbage_a_protocol_error(
    answer: bytes, error: type[Exception]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def scenario() -> None:
        async with raw_server(handler) as (base, _):
            c = client(base)
            await c.start()
            with pytest.raises(error):
                resp = await c.post("/x", b"{}", c.static_headers, AttemptWire())
                await resp.read()  # a body cut short fails here, after the head
            assert c.pool_counts() == {"idle": 0, "active": 0}
            await c.close()

    run(scenario)


@pytest.mark.parametrize("head_ends", [True, False])
def test_too_many_response_headers_are_refused_by_count_whether_or_not_the_head_ends(head_ends: bool) -> None:
    # The count is checked once per head, not per header: when the head is complete, and while it is
    # still open (a provider trickling headers), before the byte limit is reached either way.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # ten: the parser hands on a header once the next one starts, so an open head shows nine
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(10))
        writer.write(head + b"content-length: 2\r\n\r\n{}" if head_ends else head)
        await writer.drain()
        await reader.read()  # held open until the client hangs up

    async def scenario() -> None:
        async with raw_server(handler) as (base, _):
            c = H1UpstreamClient(
                DeploymentConfig(id="p", base_url=base, api_key="sk-test", response_limits={"max_headers": 8})
            )
            await c.start()
            with pytest.raises(
                UpstreamProtocolError, match=r"more than 8 response headers \(response_limits"
            ):
                await c.post("/x", b"{}", c.static_headers, AttemptWire())
            assert c.pool_counts() == {"idle": 0, "active": 0}
            await c.close()

    run(scenario)


def test_connect_failures_are_connect_errors() -> None:
    async def scenario() -> None:
        async with raw_server(keep_alive(lambda _l, _b: b"")) as (base, _):
            pass  # closed: its port now refuses
        c = client(base)
        await c.start()
        with pytest.raises(UpstreamConnectError):
            await c.post("/x", b"{}", c.static_headers, AttemptWire())
        assert c.pool_counts() == {"idle": 0, "active": 0}
        # a listener whose accept queue is full drops new SYNs: the connect timeout applies
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        for f in fillers:
            f.setblocking(False)
            try:
                f.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        try:
            c2 = client(f"http://127.0.0.1:{port}/v1")
            await c2.start()
            with pytest.raises(UpstreamConnectTimeout, match="connect_ms"):
                await c2.post("/x", b"{}", c2.static_headers, AttemptWire())
            assert c2.pool_counts() == {"idle": 0, "active": 0}
        finally:
            for f in [*fillers, listener]:
                f.close()

    run(scenario)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("kind", list(ClientKind), ids=[k.value for k in ClientKind])
def test_tls_upstreams_are_verified_with_the_deployments_ca_file(
    tls_files: tuple[Path, Path], kind: ClientKind
) -> None:
    cert, key = tls_files
    server_ctx = tls_server_context(cert, key)

    async def scenario() -> None:
        ok = keep_alive(
            lambda _line, body: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with raw_server(ok, tls=server_ctx) as (base, conns):
            untrusted = client_of_kind(kind, DeploymentConfig(id="u", base_url=base))
            await untrusted.start()
            with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.post("/x", b"{}", untrusted.static_headers, AttemptWire())
            await untrusted.close()
            trusted = client_of_kind(kind, DeploymentConfig(id="t", base_url=base, ca_file=str(cert)))
            await trusted.start()
            opened_before = len(conns)
            for _ in range(2):
                resp = await trusted.post("/x", b"hello", trusted.static_headers, AttemptWire())
                assert await resp.read() == b"hello"
                resp.release()
            await asyncio.sleep(0.05)
            assert len(conns) - opened_before == 1 and trusted.connections_opened == 1
            await trusted.close()

    run(scenario)


def test_a_ca_file_that_does_not_load_fails_at_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(
        ConfigError, match=r"models\[0\]\.deployments\[0\]\.ca_file: cannot load CA certificates"
    ):
        parse_config(
            {
                "models": [
                    {
                        "name": "m",
                        "deployments": [{"id": "d", "base_url": "https://h/v1", "ca_file": str(bad)}],
                    }
                ]
            },
            env={},
        )


def test_bytes_on_an_idle_connection_retire_it() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await asyncio.sleep(0.05)  # then, unasked, what some load balancers send before they hang up
        writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()  # ... but this one keeps the connection open

    async def scenario() -> None:
        async with raw_server(handler) as (base, conns):
            c = client(base)
            await c.start()
            for pause in (0.0, 0.15):
                await asyncio.sleep(pause)
                assert (await fetch(c))[0] == 200
            assert len(conns) == 2
            await c.close()

    run(scenario)
