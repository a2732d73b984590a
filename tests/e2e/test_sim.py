"""The simulated provider over real sockets: OpenAI wire shapes, timing, faults on demand, and its counters."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.sim.profile import SimProfile, sample_ttft_ms
from gateway.sim.runner import SimThread

FAST = {"ttft_ms": 0, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 4, "tail_p": 0}
TOKEN = re.compile(r"(sim-a)#(\d+):(\d+) ")
MSG = [{"role": "user", "content": "hi"}]


class Sim:
    """One simulator, `sim-a`, in a background thread; spoken to over real sockets with a pooled client."""

    def __init__(self, http: httpx.Client) -> None:
        profile = SimProfile()
        profile.update(FAST)
        self.thread = SimThread([("sim-a", "us-east", profile)])
        self.port = self.thread.start()["sim-a"]
        self.server = self.thread.servers["sim-a"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.http = http

    def post(self, path: str, body: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        return self.http.post(
            self.url + path, json=body if body is not None else {"model": "m", "messages": MSG}, **kw
        )

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(self.url + path, **kw)

    def stats(self) -> dict[str, Any]:
        return self.get("/sim/stats").json()

    def set(self, **knobs: Any) -> None:
        r = self.post("/sim/profile", knobs)
        assert r.status_code == 200, r.text

    def reset(self) -> None:
        assert self.post("/sim/reset").status_code == 200


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=10) as client:  # one client: building one costs ~100 ms (TLS context)
        yield client


@pytest.fixture
def sim(http):
    s = Sim(http)
    yield s
    s.thread.stop()


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            raw = line[6:]
            out.append(raw if raw == "[DONE]" else orjson.loads(raw))
    return out


def wait_for(fn, timeout: float = 2.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.01)


# -- wire shapes ---------------------------------------------------------------------------------------------
def test_chat_non_stream_shape_and_usage(sim):
    r = sim.post(
        "/v1/chat/completions",
        {"model": "sim-large", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": "rid-1"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "rid-1"
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "sim-large"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "sim-a#1:0 sim-a#1:1 sim-a#1:2 sim-a#1:3 "
    usage = body["usage"]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


def test_chat_stream_shape_with_usage_chunk(sim):
    with sim.http.stream(
        "POST",
        sim.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked" and r.headers["cache-control"] == "no-cache"
        text = r.read().decode()
    events = sse_data(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:5]]
    assert contents == [f"sim-a#1:{i} " for i in range(4)]
    assert chunks[5]["choices"][0]["finish_reason"] == "stop" and chunks[5]["choices"][0]["delta"] == {}
    assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:6])
    # without include_usage: no usage chunk and no usage key
    r = sim.post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True})
    events = sse_data(r.text)
    assert len(events) == 1 + 4 + 1 + 1 and "usage" not in events[0]


def test_completions_stream_non_stream_and_token_caps(sim):
    body = sim.post("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0] == {
        "text": "sim-a#1:0 sim-a#1:1 ",
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
    }
    assert body["usage"]["completion_tokens"] == 2
    events = sse_data(sim.post("/v1/completions", {"model": "m", "prompt": "x", "stream": True}).text)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts == [f"sim-a#2:{i} " for i in range(4)] + [""]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    chat = sim.post(
        "/v1/chat/completions", {"model": "m", "messages": MSG, "max_completion_tokens": 1}
    ).json()
    assert (
        chat["choices"][0]["message"]["content"] == "sim-a#3:0 "
        and chat["choices"][0]["finish_reason"] == "length"
    )


def test_embeddings_float_and_base64(sim):
    body = sim.post("/v1/embeddings", {"model": "sim-embed", "input": ["a", "b", "a"]}).json()
    assert body["object"] == "list" and body["model"] == "sim-embed"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    vecs = [d["embedding"] for d in body["data"]]
    assert len(vecs[0]) == 16 and vecs[0] == vecs[2] != vecs[1]  # deterministic per input
    assert abs(sum(x * x for x in vecs[0]) - 1) < 1e-3
    b64 = sim.post(
        "/v1/embeddings", {"model": "e", "input": "a", "encoding_format": "base64", "dimensions": 8}
    ).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert len(struct.unpack("<8f", raw)) == 8 and b64["usage"]["prompt_tokens"] >= 1


def test_responses_non_stream_and_stream_events(sim):
    body = sim.post("/v1/responses", {"model": "m", "input": "hi"}).json()
    assert body["object"] == "response" and body["status"] == "completed" and body["model"] == "m"
    out = body["output"][0]
    assert out["type"] == "message" and out["content"][0]["type"] == "output_text"
    assert out["content"][0]["text"] == "sim-a#1:0 sim-a#1:1 sim-a#1:2 sim-a#1:3 "
    assert body["usage"]["output_tokens"] == 4
    r = sim.post("/v1/responses", {"model": "m", "input": "hi", "stream": True})
    blocks = [b for b in r.text.split("\n\n") if b]
    kinds = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4
    datas = [orjson.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert [d["type"] for d in datas] == kinds
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert datas[-1]["response"]["output"][0]["content"][0]["text"].startswith("sim-a#2:0 ")


def test_models_list(sim):
    r = sim.get("/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert "sim-large" in [m["id"] for m in r.json()["data"]]
    assert sim.get("/v1/models/anything").json()["id"] == "anything"
    assert sim.stats()["served"]["models"] == 2
    assert sim.stats()["recent"] == []  # pings are counted, not listed with generation requests


def test_openai_sdk_against_the_simulator(sim):
    client = openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0)
    r = client.chat.completions.create(model="sim-large", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content.startswith("sim-a#1:0 ") and r.usage.completion_tokens == 4
    parts = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(
            model="sim-large",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        if c.choices and c.choices[0].delta.content
    ]
    assert parts == [f"sim-a#2:{i} " for i in range(4)]
    emb = client.embeddings.create(model="sim-embed", input="hello")  # the SDK asks for base64
    assert len(emb.data[0].embedding) == 16
    assert client.responses.create(model="m", input="hi").output_text.startswith("sim-a#4:0 ")
    assert client.completions.create(model="m", prompt="x").choices[0].text.startswith("sim-a#5:0 ")


# -- timing --------------------------------------------------------------------------------------------------
# The simulator never writes early (its timers fire at or after their due time), so lower bounds are exact.
# Upper bounds only tell "on schedule" from "ignores the schedule": they allow LATE_S on top, what a busy
# machine can delay the simulator's loop by, and still well under one of the profile's inter-token gaps.
LATE_S = 0.2


def test_timing_follows_a_fixed_profile(sim):
    ttft, itl = 0.3, 0.25
    sim.set(ttft_ms=ttft * 1000, itl_ms=itl * 1000, tokens=4)
    t0 = time.monotonic()
    r = sim.post("/v1/chat/completions")
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    due = ttft + 3 * itl  # a non-stream answer is written when its last token is due
    assert due <= elapsed < due + LATE_S
    assert due * 1000 - 1 <= int(r.headers["openai-processing-ms"]) < (due + LATE_S) * 1000
    arrivals = []
    t0 = time.monotonic()
    with sim.http.stream(
        "POST", sim.url + "/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True}
    ) as r:
        for line in r.iter_lines():
            if '"content":"sim-a' in line:
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 4
    # token i at ttft + i * itl: spread out (not batched at the end), on an absolute schedule (no drift)
    for i, at in enumerate(arrivals):
        assert ttft + i * itl <= at < ttft + i * itl + LATE_S, arrivals
    rec = sim.stats()["recent"][-1]
    assert (
        rec["ttft_ms"] == ttft * 1000
        and ttft - 0.001 <= rec["first_byte_at"] - rec["started_at"] < ttft + LATE_S
    )


def test_ttft_distribution_and_tail():
    rng = random.Random(7)
    prof = SimProfile(ttft_ms=200, ttft_dist="lognormal", ttft_sigma=0.4, tail_p=0.1, tail_ms=3000)
    draws = [sample_ttft_ms(prof, rng) for _ in range(4000)]
    tails = sum(d == 3000 for d in draws)
    assert 300 <= tails <= 500
    body = sorted(d for d in draws if d != 3000)
    assert 185 <= body[len(body) // 2] <= 215 and body[0] < 120 and body[-1] > 400
    assert {sample_ttft_ms(SimProfile(ttft_ms=80, ttft_dist="fixed"), rng) for _ in range(5)} == {80}


# -- overrides and faults ------------------------------------------------------------------------------------
def test_per_request_override_headers(sim):
    r = sim.post("/v1/chat/completions", headers={"x-sim-tokens": "2", "x-sim-ttft-ms": "0"})
    assert r.json()["choices"][0]["message"]["content"] == "sim-a#1:0 sim-a#1:1 "
    r = sim.post("/v1/chat/completions", headers={"x-sim-ttft-ms": "200", "x-sim-tokens": "1"})
    assert r.status_code == 200 and int(r.headers["openai-processing-ms"]) >= 199
    assert sim.stats()["recent"][-1]["ttft_ms"] == 200
    r = sim.post("/v1/chat/completions", headers={"x-sim-error-rate": "1", "x-sim-error-status": "429"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    bad = sim.post("/v1/chat/completions", headers={"x-sim-tokens": "many"})
    assert bad.status_code == 400 and "x-sim-tokens" in bad.json()["error"]["message"]
    unknown = sim.post("/v1/chat/completions", headers={"x-sim-speed": "1"})
    assert unknown.status_code == 400 and "x-sim-speed" in unknown.json()["error"]["message"]
    assert sim.get("/sim/profile").json()["tokens"] == 4  # the profile itself is untouched
    assert sim.post("/v1/chat/completions").json()["usage"]["completion_tokens"] == 4


def test_injected_errors_are_openai_shaped_with_retry_after(sim):
    sim.set(error_rate=1.0, error_status=503, retry_after="1")
    for _ in range(3):
        r = sim.post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    sdk = openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="m", messages=[])
    sim.set(error_rate=0.5, retry_after=None)
    codes = [sim.post("/v1/chat/completions").status_code for _ in range(40)]
    assert 5 <= codes.count(503) <= 35 and codes.count(200) == 40 - codes.count(503)
    st = sim.stats()
    assert st["errors_injected"] == {"503": 4 + codes.count(503)}
    assert [r["outcome"] for r in st["recent"][:4]] == ["error"] * 4 and st["recent"][0]["status"] == 503
    assert st["served"]["chat"] == codes.count(200)


def test_client_disconnect_mid_stream_is_counted_at_once(sim):
    sim.set(tokens=200, itl_ms=20)
    with sim.http.stream(
        "POST", sim.url + "/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True}
    ) as r:
        lines = r.iter_lines()
        while '"content":"sim-a' not in next(lines):
            pass
    closed_at = time.time()
    st = wait_for(lambda: (s := sim.stats())["cancelled"]["mid_stream"] and s)
    assert st["cancelled"] == {"before_first_byte": 0, "mid_stream": 1}
    rec = st["recent"][-1]
    assert (
        rec["outcome"] == "cancelled" and rec["ended_at"] - closed_at < LATE_S
    )  # not at the stream's end, 4 s on
    assert st["in_flight"] == 0 and st["served"]["chat"] == 0
    # a non-stream request abandoned before its answer
    sim.set(ttft_ms=3000)
    with pytest.raises(httpx.ReadTimeout):
        sim.post("/v1/chat/completions", timeout=0.2)
    st = wait_for(lambda: (s := sim.stats())["cancelled"]["before_first_byte"] and s)
    assert st["cancelled"]["before_first_byte"] == 1 and st["recent"][-1]["first_byte_at"] is None


def test_stall_never_answers_until_the_client_leaves(sim):
    sim.set(stall_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):  # nothing came in 0.4 s; the stats below show it never would
        sim.post("/v1/chat/completions", {"model": "m", "messages": MSG, "stream": True}, timeout=0.4)
    st = wait_for(lambda: (s := sim.stats())["cancelled"]["before_first_byte"] and s)
    assert st["stalled"] == 1 and st["in_flight"] == 0
    rec = st["recent"][-1]
    assert rec["outcome"] == "stalled" and rec["first_byte_at"] is None and rec["ended_at"] is not None


def test_reset_closes_the_stream_after_n_tokens(sim):
    sim.set(reset_rate=1.0, reset_after_tokens=2, tokens=6, itl_ms=5)
    got = []
    with pytest.raises(httpx.RemoteProtocolError):  # noqa: SIM117 - the error is raised while reading
        with sim.http.stream(
            "POST", sim.url + "/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True}
        ) as r:
            for line in r.iter_lines():
                got.extend(TOKEN.findall(line))
    assert [int(g[2]) for g in got] == [0, 1]
    with pytest.raises(httpx.RemoteProtocolError):
        sim.post("/v1/chat/completions")  # non-stream: the connection closes when the answer was due
    st = sim.stats()
    assert st["resets"] == 2 and [r["outcome"] for r in st["recent"]] == ["reset", "reset"]
    assert st["cancelled"] == {"before_first_byte": 0, "mid_stream": 0}
    r = sim.post(
        "/v1/chat/completions",
        {"model": "m", "messages": MSG, "stream": True},
        headers={"x-sim-reset-rate": "0"},
    )
    assert r.status_code == 200 and sse_data(r.text)[-1] == "[DONE]"


def test_cold_schema_is_paid_once_per_schema(sim):
    sim.set(cold_schema_ms=400)

    def ask(schema: dict[str, Any]) -> int:
        """The sim's own processing time (ms) for a request with this schema."""
        r = sim.post(
            "/v1/chat/completions",
            {
                "model": "m",
                "messages": MSG,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "strict": True, "schema": schema},
                },
            },
        )
        assert r.status_code == 200
        return int(r.headers["openai-processing-ms"])

    a = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    a_reordered = {"required": ["x"], "properties": {"x": {"type": "string"}}, "type": "object"}
    assert ask(a) >= 399
    ask(a_reordered)  # same schema in canonical form: already compiled (its ttft_ms below is 0)
    assert ask({"type": "object"}) >= 399
    # the Responses API's text.format shares the compiled schema
    sim.post(
        "/v1/responses",
        {"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": a}}},
    )
    assert sim.post("/v1/chat/completions").status_code == 200  # no response_format: no cost, not counted
    st = sim.stats()
    assert st["cold_schema_hits"] == 2 and st["schemas_seen"] == 2
    assert [r["cold_schema"] for r in st["recent"]] == [True, False, True, False, False]
    assert [r["ttft_ms"] for r in st["recent"]] == [400, 0, 400, 0, 0]  # the compile wait is the only delay


def test_idle_keep_alive_connections_are_closed_like_a_load_balancer(sim):
    sim.server.profile.update({"idle_close_s": 0.3})  # set and read in-process: no admin connections to count
    busy = sim.http
    with httpx.Client(timeout=5) as lazy:
        assert lazy.get(sim.url + "/v1/models").status_code == 200
        for _ in range(7):  # a request every 0.1 s keeps this connection alive
            assert busy.get(sim.url + "/v1/models").status_code == 200
            time.sleep(0.1)
        st = sim.server.stats()
        assert st["idle_closed"] == 1 and st["connections_open"] == 1
        assert lazy.get(sim.url + "/v1/models").status_code == 200  # httpx notices and reconnects
    st = sim.server.stats()
    assert st["connections_opened"] == 3 and st["idle_closed"] == 1 and st["served"]["models"] == 9


def test_require_key_answers_401_like_openai(sim):
    sim.set(require_key="right")
    r = sim.post("/v1/chat/completions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert sim.post("/v1/chat/completions", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert sim.get("/v1/models", headers={"api-key": "nope"}).status_code == 401
    assert sim.post("/v1/chat/completions", headers={"authorization": "Bearer right"}).status_code == 200
    assert sim.post("/v1/chat/completions", headers={"api-key": "right"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sim.base_url, api_key="wrong", max_retries=0).models.list()
    st = sim.stats()
    assert st["unauthorized"] == 4
    assert [(r["outcome"], r["authorization_present"]) for r in st["recent"]] == [
        ("unauthorized", False),
        ("unauthorized", True),
        ("ok", True),
        ("ok", True),
    ]
    assert "right" not in str(st["recent"])


# -- admin API and counters ----------------------------------------------------------------------------------
def test_admin_profile_update_and_bad_knobs(sim):
    url = sim.url + "/sim/profile"
    r = sim.http.post(url, json={"tokens": 2, "ttft_dist": "lognormal", "retry_after": 3})
    assert r.status_code == 200 and r.json()["tokens"] == 2 and r.json()["retry_after"] == "3"
    assert sim.http.get(url).json() == r.json()
    assert sim.post("/v1/chat/completions").json()["usage"]["completion_tokens"] == 2
    for patch, named in [
        ({"tokenz": 1}, "tokenz"),
        ({"tokens": "many"}, "tokens"),
        ({"error_rate": 2}, "error_rate"),
        ({"ttft_dist": "gaussian"}, "ttft_dist"),
        ({"itl_ms": -1}, "itl_ms"),
        ({"tokens": 1, "stall_rate": True}, "stall_rate"),
    ]:
        bad = sim.http.post(url, json=patch)
        assert bad.status_code == 400 and named in bad.json()["error"]["message"], bad.text
    assert (
        sim.http.get(url).json()["tokens"] == 2
    )  # a rejected patch changes nothing, not even its valid part
    assert sim.http.post(url, content=b"{nope").status_code == 400


def test_stats_record_what_the_provider_saw(sim):
    sim.set(ttft_ms=100, itl_ms=0)
    headers = {
        "x-request-id": "r-1",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "app=1",
        "user-agent": "ua/1",
        "x-custom": "c",
        "openai-organization": "org",
        "x-sim-tokens": "3",
        "authorization": "Bearer secret-value",
        "x-api-key": "also-secret",
    }
    sim.post("/v1/chat/completions", {"model": "sim-large", "messages": MSG, "stream": True}, headers=headers)
    with cf.ThreadPoolExecutor(4) as pool:  # four requests in flight at once, over four connections
        codes = list(
            pool.map(lambda _: sim.post("/v1/embeddings", {"model": "e", "input": "x"}).status_code, range(4))
        )
    assert codes == [200] * 4
    sim.post("/v1/responses", {"model": "m", "input": "x"})
    st = sim.stats()
    rec = st["recent"][0]
    assert rec["serial"] == 1 and rec["path"] == "/v1/chat/completions" and rec["model"] == "sim-large"
    assert (
        rec["stream"] is True and rec["request_id"] == "r-1" and rec["traceparent"] == headers["traceparent"]
    )
    assert (
        rec["tracestate"] == "app=1" and rec["user_agent"] == "ua/1" and rec["authorization_present"] is True
    )
    assert rec["headers_seen"] == {
        "x-request-id": "r-1",
        "x-custom": "c",
        "openai-organization": "org",
        "x-api-key": "***",
    }
    assert rec["outcome"] == "ok" and rec["ttft_ms"] == 100 and rec["cold_schema"] is False
    assert rec["started_at"] < rec["first_byte_at"] <= rec["ended_at"]
    assert "secret" not in str(st)
    assert st["served"] == {"chat": 1, "completions": 0, "embeddings": 4, "responses": 1, "models": 0}
    assert st["requests"] == 6 and st["streams"] == 1 and st["max_in_flight"] >= 2 and st["in_flight"] == 0
    assert st["name"] == "sim-a" and st["region"] == "us-east"
    assert st["connections_opened"] >= st["max_in_flight"]  # one request at a time per connection
    assert [r["serial"] for r in st["recent"]] == [1, 2, 3, 4, 5, 6]
    sim.reset()
    st = sim.stats()
    assert st["recent"] == [] and st["requests"] == 0 and st["served"]["embeddings"] == 0
    assert st["connections_open"] >= 1  # live gauges survive a reset
    assert sim.post("/v1/chat/completions").json()["choices"][0]["message"]["content"].startswith("sim-a#7:")


def test_bad_input_never_breaks_the_server(sim):
    for content, code in [
        (b"{not json", "invalid_json"),
        (b"[1]", "invalid_request"),
        (b"{}", "missing_required_parameter"),
        (b'{"model": "m", "stream": "yes"}', "invalid_type"),
    ]:
        r = sim.http.post(sim.url + "/v1/chat/completions", content=content)
        assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert sim.post("/v1/embeddings", {"model": "e", "input": []}).status_code == 400
    assert sim.post("/v2/nothing").status_code == 404
    assert sim.get("/v1/chat/completions").status_code == 405
    port = sim.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # not HTTP at all
        s.sendall(b"\x16\x03\x01 garbage\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # two pipelined requests, in order
        req = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
        body = b'{"model": "m", "messages": []}'
        s.sendall(req % (len(body), body) * 2)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            data += s.recv(65536)
        assert data.index(b"#") < data.rindex(b"#") and b"sim-a#" in data
    assert sim.post("/v1/chat/completions").status_code == 200
    assert sim.stats()["bad_requests"] == 5


def test_command_line_runs_one_simulator():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.sim",
            "--port",
            "0",
            "--name",
            "cli-sim",
            "--region",
            "eu-west",
            "--ttft-ms",
            "5",
            "--ttft-dist",
            "fixed",
            "--tokens",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+", line).group(0)
        r = httpx.post(url + "/chat/completions", json={"model": "m", "messages": MSG}, timeout=5)
        assert r.json()["choices"][0]["message"]["content"] == "cli-sim#1:0 cli-sim#1:1 "
        assert httpx.get(url.removesuffix("/v1") + "/sim/stats").json()["region"] == "eu-west"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "gateway.sim", "--tail-p", "3"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "--tail-p" in bad.stderr
