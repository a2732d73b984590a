"""Graceful termination, as Kubernetes drives it: SIGTERM during a stream."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import httpx
import openai
import orjson
import pytest
from harness import dep, model


def _streaming_gateway(
    sims_factory: Any, gateways: Any, drain_timeout_s: int, ttft_ms: int, itl_ms: int, tokens: int
) -> Any:
    """A gateway that drains for ``drain_timeout_s`` in front of one provider streaming ``tokens`` tokens."""
    stream = {"ttft_ms": ttft_ms, "ttft_dist": "fixed", "itl_ms": itl_ms, "tokens": tokens, "tail_p": 0}
    sims = sims_factory({"sim-a": ("us-east", stream)})
    return gateways(
        {
            "server": {"drain_timeout_s": drain_timeout_s},
            "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
        }
    )


def _stream_request(gw: Any) -> Any:
    """A streamed chat request over plain HTTP, to read its bytes as they come (a context manager)."""
    return httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        timeout=30,
        json={"model": "chat", "stream": True, "messages": []},
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_drains_the_stream_refuses_new_connections_and_exits_zero(sims_factory, gateways, sig):
    """SIGHUP (a closed terminal, or a supervisor's reload) drains as SIGTERM does: it used to kill the
    gateway at once, every request in flight cut without a record (exit 129)."""
    gw = _streaming_gateway(sims_factory, gateways, drain_timeout_s=10, ttft_ms=50, itl_ms=100, tokens=20)
    result: dict = {}
    under_way = threading.Event()

    def stream() -> None:
        with _stream_request(gw) as r:
            result["status"] = r.status_code
            chunks = r.iter_bytes()
            body = [next(chunks)]  # the first token: the 2 s stream is under way
            under_way.set()
            body.extend(chunks)
            result["body"] = b"".join(body)

    t = threading.Thread(target=stream)
    t.start()
    assert under_way.wait(15)
    gw.proc.send_signal(sig)
    give_up = time.monotonic() + 10  # a hang guard: the listener closes as soon as the signal is handled
    while True:
        try:
            httpx.get(gw.url + "/healthz", timeout=1)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            # refused; or (a busy machine) in the listener's backlog when it closed: closed unanswered, or
            # reset by the kernel with the listening socket (ECONNRESET)
            assert "body" not in result, "refused only after the stream ended"
            break  # new connections are refused while the stream drains
        assert time.monotonic() < give_up, "new connections must be refused once draining"
        time.sleep(0.05)
    t.join(15)
    assert result["status"] == 200
    # the whole stream arrived: the gateway waited for it rather than cutting it
    assert result["body"].count(b'"content":"sim-a#') == 20 and result["body"].rstrip().endswith(b"[DONE]")
    code = gw.proc.wait(15)
    assert code == 0
    rec = gw.records(wait_for=1)[-1]
    assert rec["response_code"] == 200 and rec["response_flags"] == "-"


def test_sigterm_cuts_streams_still_open_at_the_drain_timeout_with_an_error_event(sims_factory, gateways):
    # Streams longer than the drain: at drain_timeout_s each gets a final SSE error event (the SDK raises an
    # APIError), is logged with the bytes it really got and flag LR; no traceback; exit 0.
    gw = _streaming_gateway(sims_factory, gateways, drain_timeout_s=2, ttft_ms=20, itl_ms=50, tokens=1000)
    started = [threading.Event() for _ in range(3)]
    results: dict[int, object] = {}

    def sdk_stream(i: int) -> None:
        texts = []
        try:
            for chunk in gw.client().chat.completions.create(model="chat", messages=[], stream=True):
                texts.append(chunk.choices[0].delta.content)
                started[i].set()
        except Exception as exc:  # the test is which one
            results[i] = (texts, exc)

    def raw_stream(i: int) -> None:
        with _stream_request(gw) as r:
            body = b""
            for part in r.iter_bytes():
                body += part
                started[i].set()
        results[i] = body

    threads = [
        threading.Thread(target=sdk_stream, args=(0,)),
        threading.Thread(target=sdk_stream, args=(1,)),
        threading.Thread(target=raw_stream, args=(2,)),
    ]
    for t in threads:
        t.start()
    assert all(e.wait(15) for e in started)
    gw.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert gw.proc.wait(15) == 0
    for i in (0, 1):
        texts, exc = results[i]
        assert texts and isinstance(exc, openai.APIError) and "shutting down" in str(exc), repr(exc)
    body = results[2]
    events = [e for e in body.decode().split("\n\n") if e]
    assert orjson.loads(events[-1][len("data: ") :])["error"]["code"] == "draining"
    assert all(orjson.loads(e[len("data: ") :]) for e in events)  # whole events, none glued
    recs = gw.records(wait_for=3)
    assert len(recs) == 3  # one record per client request
    assert all((r["response_code"], r["response_flags"]) == (200, "LR") and r["bytes_sent"] > 0 for r in recs)
    assert len(body) in [r["bytes_sent"] for r in recs]  # the real bytes, the final event included
    gw.assert_no_tracebacks()


def test_a_stream_to_a_client_that_stopped_reading_is_cut_at_the_drain_timeout_without_a_traceback(
    sims_factory, gateways
):
    # The client reads nothing: the gateway's writes wait for it, so even the final event cannot go out and
    # uvicorn's forced cancel ends the request. It is still logged once, and nothing is printed as a crash.
    gw = _streaming_gateway(sims_factory, gateways, drain_timeout_s=1, ttft_ms=5, itl_ms=0, tokens=1_000_000)
    body = orjson.dumps({"model": "chat", "stream": True, "messages": []})
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        first = s.recv(1024)
        assert first.startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # ... and read nothing more: the gateway's writes now wait for this client
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(15) == 0
    (rec,) = gw.records(wait_for=1)
    assert (rec["response_code"], rec["response_flags"]) == (200, "LR") and rec["bytes_sent"] > len(first)
    gw.assert_no_tracebacks()
