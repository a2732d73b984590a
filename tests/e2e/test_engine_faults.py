"""Failures the client must be able to read, and the access log and metrics must tell exactly (issue 19).

Broken providers are raw asyncio servers in a thread; the client is the real openai SDK. Every test
checks that the gateway logged one record per client request and no traceback.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import openai
import orjson
import pytest
from harness import dead_model, dep, metric_value, model, wait_until

RAW_POOL = {"min_connections": 0, "validate_on_start": False}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawProvider:
    """A provider that answers every request with ``handler`` (raw bytes), served from a thread of its own."""

    def __init__(self, handler: Handler) -> None:
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(ln.split(b":")[1])
                        for ln in head.lower().split(b"\r\n")
                        if ln.startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                self.requests += 1
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def serve() -> None:
            self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            try:
                await self.server.serve_forever()
            except asyncio.CancelledError:  # stop(): the server was closed
                pass

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(serve(),), daemon=True)
        self.thread.start()
        assert ready.wait(5)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


@pytest.fixture
def raw_provider():
    made: list[RawProvider] = []

    def make(handler: Handler) -> RawProvider:
        p = RawProvider(handler)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def _event(text: str) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": text}}],
            }
        )
        + b"\n\n"
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
HALF_EVENT = b'data: {"id":"x","obj'


def _stream_until_error(client, **kw) -> tuple[list[str], BaseException]:
    texts: list[str] = []
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the test is which one
        for chunk in client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True, **kw
        ):
            texts.append(chunk.choices[0].delta.content or "")
    return texts, caught.value


def test_a_stream_cut_mid_event_reaches_the_sdk_as_an_api_error(raw_provider, gateways):
    async def cut_mid_event(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + _chunk(_event("one")))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(_chunk(HALF_EVENT))  # ... and the provider closes in the middle of the line
        await writer.drain()

    p = raw_provider(cut_mid_event)
    gw = gateways(
        {"models": [model("chat", [dep("a", p.base_url, pool=RAW_POOL)], retry={"max_retries": 0})]}
    )
    texts, exc = _stream_until_error(gw.client())
    assert texts == ["one"]
    assert isinstance(exc, openai.APIError), repr(exc)  # not a bare JSONDecodeError on a glued event
    assert "broke the stream" in str(exc) and "unfinished event" in str(exc)
    (rec,) = gw.records(wait_for=1)
    assert (rec["response_code"], rec["response_flags"]) == (200, "UC")
    assert metric_value(gw.metrics(), "llmgw_upstream_attempts_total", outcome="reset") == 1
    gw.assert_no_tracebacks()


def test_a_slow_stream_cut_at_per_try_mid_event_reaches_the_sdk_as_an_api_error(raw_provider, gateways):
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + _chunk(_event("one")) + _chunk(HALF_EVENT))
        await writer.drain()
        await reader.read()  # nothing more, until the gateway gives up and closes

    p = raw_provider(slow)
    gw = gateways(
        {
            "models": [
                model(
                    "chat",
                    [dep("a", p.base_url, pool=RAW_POOL)],
                    retry={"max_retries": 0},
                    timeouts={"ttft_ms": 1000, "per_try_ms": 1500, "idle_ms": 30000},
                )
            ]
        }
    )
    texts, exc = _stream_until_error(gw.client())
    assert texts == ["one"]
    assert isinstance(exc, openai.APIError) and "per_try_ms=1500" in str(exc), repr(exc)
    (rec,) = gw.records(wait_for=1)
    assert (rec["response_code"], rec["response_flags"], rec["timeout_flag"]) == (200, "UT", "per_try")
    assert metric_value(gw.metrics(), "llmgw_upstream_attempts_total", outcome="timeout") == 1
    gw.assert_no_tracebacks()


BODY = orjson.dumps({"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


def _send_and_leave(
    port: int, head_extra: bytes = b"", body: bytes = BODY, length: int | None = None
) -> None:
    """A request (maybe only part of its body), then the client is gone at once."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n%s"
            b"content-length: %d\r\n\r\n%s" % (head_extra, len(body) if length is None else length, body)
        )


def _all_left(recs: list[dict], n: int, *, before_upstream: bool) -> None:
    assert len(recs) == n, recs
    for r in recs:
        assert (r["response_code"], r["response_flags"], r["bytes_sent"]) == (499, "DC", 0), r
        if before_upstream:
            assert r["attempts"] == 0, r


def test_a_client_that_leaves_right_after_sending_is_logged_and_never_relayed(sims_factory, gateways):
    sims = sims_factory(
        {"sim-a": ("us-east", {"ttft_ms": 3000, "ttft_dist": "fixed", "tokens": 5, "tail_p": 0})}
    )
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]})
    n = 5
    before = sims.stats("sim-a")["requests"]  # the start-up check's GET /v1/models
    for _ in range(n):  # gone while the gateway reads, checks or has just sent it: seen wherever it is
        _send_and_leave(gw.port)
    recs = gw.records(wait_for=n)
    _all_left(recs, n, before_upstream=False)
    # Whatever reached the provider was abandoned at once, not held until its first token (3 s).
    end = time.monotonic() + 10
    while time.monotonic() < end and sims.stats("sim-a")["in_flight"]:
        time.sleep(0.05)
    st = sims.stats("sim-a")
    assert st["in_flight"] == 0 and st["served"]["chat"] == 0 and st["requests"] - before <= n, st
    assert all(r["duration_ms"] < 2500 for r in recs)  # the provider's 3 s first token was never waited for
    m = gw.metrics()  # every attempt that started is counted once, as cancelled
    attempts = sum(r["attempts"] for r in recs)
    assert metric_value(m, "llmgw_upstream_attempts_total") == attempts
    assert metric_value(m, "llmgw_upstream_attempts_total", outcome="cancelled") == attempts
    gw.assert_no_tracebacks()


def test_a_client_that_leaves_during_the_body_read_is_logged_499(sims_factory, gateways):
    sims = sims_factory(
        {"sim-a": ("us-east", {"ttft_ms": 20, "ttft_dist": "fixed", "tokens": 5, "tail_p": 0})}
    )
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]})
    before = sims.stats("sim-a")["requests"]  # the start-up check's GET /v1/models
    _send_and_leave(gw.port, body=BODY[:10], length=len(BODY))
    _all_left(gw.records(wait_for=1), 1, before_upstream=True)
    assert sims.stats("sim-a")["requests"] == before
    gw.assert_no_tracebacks()


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP taken), as /proc tells."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "T"


def test_a_refusal_decided_after_the_client_left_is_logged_with_dc(gateways, private_redis):
    """The key lookup waits on Redis (stopped), so the 401 comes after an await. The client sends its request
    and closes its side before reading; once the gateway's own close reaches it (the gateway has seen the
    disconnect), Redis answers and the key is refused. The 401 went nowhere: it was logged 401 UAEX as if
    answered, and is now 401 UAEX,DC with no byte sent."""
    port, redis_proc = private_redis
    gw = gateways(
        {
            # long enough that only Redis's answer, never the timeout, ends the lookup
            "state": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0", "timeout_ms": 60000},
            "auth": {"mode": "keys"},  # no config keys: every key is looked up in Redis
            "models": [dead_model("chat")],
        }
    )
    redis_proc.send_signal(signal.SIGSTOP)
    try:
        wait_until("redis stopped", lambda: _stopped(redis_proc.pid))
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"authorization: Bearer sk-gw-nobody\r\nx-request-id: left-before-401\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
            )
            s.shutdown(socket.SHUT_WR)
            s.settimeout(30)  # a bound for the close event, not a measurement
            assert s.recv(4096) == b""  # closed by the gateway, with nothing answered yet
    finally:
        redis_proc.send_signal(signal.SIGCONT)
    (rec,) = gw.records(wait_for=1, timeout=30)
    assert rec["request_id"] == "left-before-401", rec
    assert (rec["response_code"], rec["response_flags"], rec["error_type"], rec["bytes_sent"]) == (
        401,
        "UAEX,DC",
        "invalid_api_key",
        0,
    )
    gw.assert_no_tracebacks()


def test_a_client_that_leaves_during_the_redis_rate_limit_check_sends_nothing_upstream(
    sims_factory, gateways, private_redis
):
    from gateway.security.keys import hash_key

    port, redis_proc = private_redis
    sims = sims_factory(
        {"sim-a": ("us-east", {"ttft_ms": 20, "ttft_dist": "fixed", "tokens": 5, "tail_p": 0})}
    )
    key = "sk-gw-test-leaver-0001"
    gw = gateways(
        {
            "state": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0"},
            "auth": {"mode": "keys", "keys": [{"id": "leaver", "hash": hash_key(key), "rpm": 1000}]},
            "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
        }
    )
    before = sims.stats("sim-a")["requests"]  # the start-up check's GET /v1/models
    redis_proc.send_signal(signal.SIGSTOP)  # the rate-limit check now waits on Redis
    try:
        for _ in range(3):
            _send_and_leave(gw.port, head_extra=b"authorization: Bearer %s\r\n" % key.encode())
        recs = gw.records(wait_for=3, timeout=15)
    finally:
        redis_proc.send_signal(signal.SIGCONT)
    _all_left(recs, 3, before_upstream=True)
    assert all(r["api_key_id"] == "leaver" for r in recs)
    assert sims.stats("sim-a")["requests"] == before
    gw.assert_no_tracebacks()


def test_a_client_cancel_mid_stream_logs_its_bytes_and_counts_the_attempt_cancelled(sims_factory, gateways):
    sims = sims_factory(
        {
            "sim-a": (
                "us-east",
                {"ttft_ms": 20, "ttft_dist": "fixed", "itl_ms": 50, "tokens": 200, "tail_p": 0},
            )
        }
    )
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]})
    client = gw.client()
    with client.chat.completions.with_streaming_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as resp:
        got = b""
        for part in resp.iter_bytes():
            got += part
            if got.count(b"\n\n") >= 3:
                break  # the client hangs up after three events
    (rec,) = gw.records(wait_for=1)
    assert rec["response_flags"] == "DC" and rec["response_code"] == 200
    assert rec["bytes_sent"] >= len(got) > 0  # what was sent (the client may not have read all of it)
    m = gw.metrics()
    assert metric_value(m, "llmgw_upstream_attempts_total", outcome="cancelled") == 1
    assert metric_value(m, "llmgw_upstream_attempts_total") == 1  # counted once, not also as a success
    gw.assert_no_tracebacks()
