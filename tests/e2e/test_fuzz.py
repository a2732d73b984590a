"""Property-based fuzzing of the real gateway process: malformed bodies and headers.

Whatever arrives, the answer is a success or a well-formed OpenAI error (never a 500, never a hang),
the process logs no traceback, and it keeps serving. Bounded: a few hundred requests, well under 40 s.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from harness import REDIS_URL, Gateway, Sims, dep, model
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from gateway.security.keys import hash_key

KEY = "sk-gw-fuzz-0000000000000000"
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/chat/completions"]
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, httpx.Client]]:
    prefix = f"llmgw-test-fuzz-{time.monotonic_ns()}:"
    sims = Sims(
        {"sim-a": ("us-east", {"ttft_ms": 2, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 2, "tail_p": 0})}
    )
    cfg = {
        "server": {"max_body_bytes": 65536, "max_json_depth": 32, "max_messages": 64},
        "state": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix},
        "auth": {
            "mode": "keys",
            "keys": [
                {
                    "id": "fuzz",
                    "hash": hash_key(KEY),
                    "models": ["chat", "embed"],
                    "rpm": 100000,
                    "tpm": 10**9,
                    "max_concurrency": 50,
                }
            ],
        },
        "models": [
            model("chat", [dep("a", sims.base_url("sim-a"))], retry={"max_retries": 0}),
            model("embed", [dep("a-embed", sims.base_url("sim-a"), model="sim-embed")]),
        ],
    }
    gw = Gateway(cfg, tmp_path_factory.mktemp("fuzz"), name="fuzz")
    client = httpx.Client(base_url=gw.url, timeout=httpx.Timeout(5.0))
    yield gw, client
    client.close()
    gw.stop()
    sims.stop()
    r = redis.Redis.from_url(REDIS_URL)
    for k in r.scan_iter(match=prefix + "*"):
        r.delete(k)


def _check(r: httpx.Response) -> None:
    """A success, or an OpenAI-shaped error; never a 500."""
    assert r.status_code != 500 and r.status_code < 600, (r.status_code, r.text[:500])
    ctype = r.headers.get("content-type", "")
    if r.status_code == 200:
        if ctype.startswith("text/event-stream"):
            assert r.text.rstrip().endswith(("[DONE]", "}")), r.text[-300:]
        else:
            assert isinstance(r.json(), dict)
        return
    assert ctype.startswith("application/json"), (r.status_code, ctype, r.text[:300])
    body = r.json()
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), body
    assert isinstance(err["message"], str) and err["message"], body


def _post(client: httpx.Client, path: str, content: bytes, headers: dict[str, Any] | None = None) -> None:
    h = {"content-type": "application/json", "authorization": f"Bearer {KEY}", **(headers or {})}
    try:
        r = client.post(path, content=content, headers=h)
    except httpx.LocalProtocolError:  # httpx itself refuses to send it (e.g. an illegal header)
        reject()
    _check(r)


def _alive(gw: Gateway, client: httpx.Client) -> None:
    r = client.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "chat", "messages": [{"role": "user", "content": "still there?"}]},
    )
    assert r.status_code == 200, r.text
    err = gw.stderr()
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err[-3000:]


# ---------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values},
        optional={"content": json_values, "name": json_values, "tool_calls": json_values},
    ),
    max_size=5,
)
fields = {
    "model": st.sampled_from(["chat", "embed", "nope", "", "chat\u0000", "ch*t", "../chat"]) | json_values,
    "stream": st.booleans() | json_values,
    "messages": messages | json_values,
    "prompt": json_values,
    "input": json_values,
    "max_tokens": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
    "max_completion_tokens": st.integers() | json_values,
    "n": st.integers(min_value=-5, max_value=10**9) | json_values,
    "temperature": json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["json_schema", "json_object", "text"])},
        optional={"json_schema": json_values},
    )
    | json_values,
    "tools": json_values,
    "base_url": st.just("http://127.0.0.1:1/v1"),
}
requests_ = st.fixed_dictionaries({}, optional=fields)
nested = st.integers(min_value=1, max_value=5000).map(
    lambda d: b'{"model": "chat", "x": ' + b"[" * d + b"]" * d + b"}"
)
odd_json = st.sampled_from(
    [
        b"",
        b" ",
        b"null",
        b"[]",
        b"{}",
        b'"\\ud800"',
        b'{"model": "chat", "messages": [], "x": 1e400}',
        b'{"model": "chat"',
        b'{"model": "chat",}',
        b"\xff\xfe{}",
        b'{"model": "chat", "model": 5}',
        b'\xef\xbb\xbf{"model": "chat", "messages": []}',
        b'{"model": "\xc3\x28"}',
        b"NaN",
        b'{"model": NaN}',
    ]
)
header_names = st.sampled_from(
    [
        "x-request-id",
        "traceparent",
        "tracestate",
        "x-gateway-timeout-ms",
        "x-stainless-timeout",
        "x-gateway-hedge",
        "x-gateway-region",
        "x-gateway-deployment",
        "authorization",
        "api-key",
        "content-type",
        "accept",
        "accept-encoding",
        "expect",
        "cookie",
        "origin",
        "x-forwarded-for",
        "forwarded",
        "user-agent",
    ]
) | st.from_regex(r"\A[a-z][a-z0-9\-]{0,20}\Z").filter(
    lambda n: (
        not n.startswith("x-sim-") and n not in ("content-length", "transfer-encoding", "host", "connection")
    )
)
header_values = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60)
    | st.sampled_from(
        [
            "0",
            "-1",
            "1e309",
            "nan",
            "inf",
            "0.0001",
            "99999999999999999999",
            "off",
            "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
            "Bearer " + KEY,
            "application/json",
            "100-continue",
            "gzip",
        ]
    )
).map(lambda v: v.strip().encode("latin-1"))


# ---------------------------------------------------------------- properties


def test_random_bytes_and_odd_json_bodies(target):
    gw, client = target

    @settings(FUZZ, max_examples=60)
    @given(path=st.sampled_from(PATHS), body=st.binary(max_size=512) | odd_json | nested)
    def run(path: str, body: bytes) -> None:
        _post(client, path, body)

    run()
    _alive(gw, client)


def test_random_json_requests(target):
    gw, client = target

    @settings(FUZZ, max_examples=150)
    @given(path=st.sampled_from(PATHS), body=requests_ | json_values)
    def run(path: str, body: Any) -> None:
        _post(client, path, json.dumps(body).encode())  # stdlib json: ints beyond 64 bits included

    run()
    _alive(gw, client)


def test_random_headers(target):
    gw, client = target

    @settings(FUZZ, max_examples=80)
    @given(headers=st.dictionaries(header_names, header_values, max_size=5), stream=st.booleans())
    def run(headers: dict[str, bytes], stream: bool) -> None:
        body = json.dumps({"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "x"}]})
        _post(client, "/v1/chat/completions", body.encode(), headers)

    run()
    _alive(gw, client)


def test_garbage_on_the_socket_never_hangs_the_server(target):
    """Below HTTP: whatever bytes arrive, the server answers or closes within the timeout."""
    gw, client = target

    @settings(FUZZ, max_examples=30)
    @given(
        data=st.binary(min_size=1, max_size=300)
        | st.builds(
            lambda line, rest: line + b"\r\n" + rest,
            st.sampled_from(
                [
                    b"POST /v1/chat/completions HTTP/1.1",
                    b"GET / HTTP/1.0",
                    b"POST * HTTP/1.1",
                    b"POST http://127.0.0.1:1/v1/chat/completions HTTP/1.1",
                    b"BREW /pot HTCPCP/1.0",
                ]
            ),
            st.binary(max_size=200),
        )
    )
    def run(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=3) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # no more bytes: a complete answer or a close must follow
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail(f"no answer and no close within 3 s for {data[:80]!r}")

    run()
    _alive(gw, client)
