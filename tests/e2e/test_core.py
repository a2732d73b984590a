"""The core proxy through the real server: every endpoint, streaming without buffering, errors."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from harness import FRESH, Gateway, LogFrom, Sims, dead_model, dep, model

FAST = {"ttft_ms": 30, "ttft_dist": "fixed", "itl_ms": 5, "tokens": 8, "tail_p": 0}


@pytest.fixture(scope="module")
def shared_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sims, Gateway]]:
    sims = Sims({"sim-a": ("us-east", FAST)})
    cfg = {
        "server": {"region": "us-east", "max_body_bytes": 4096},
        "models": [
            model("chat", [dep("a", sims.base_url("sim-a"))]),
            model("embed", [dep("a-embed", sims.base_url("sim-a"), model="sim-embed")]),
            dead_model(),
        ],
    }
    gw = Gateway(cfg, tmp_path_factory.mktemp("core"), name="core")
    yield sims, gw
    gw.stop()
    sims.stop()


@pytest.fixture
def core(shared_core: tuple[Sims, Gateway]) -> tuple[Sims, LogFrom]:
    """One gateway and simulator for the module (a start costs seconds), as each test needs them: the
    simulator's knobs and counters as new, the access log from the test's first request on."""
    sims, gw = shared_core
    sims.renew("sim-a", **FAST)
    return sims, LogFrom(gw)


def test_chat_non_stream_through_the_sdk(core):
    sims, gw = core
    r = gw.client().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content.startswith("sim-a#")
    assert r.model == "sim-large"  # the upstream model answered; the client-facing name was rewritten
    seen = sims.stats("sim-a")["recent"][-1]
    assert seen["model"] == "sim-large" and seen["path"] == "/v1/chat/completions"
    rec = gw.records(wait_for=1)[-1]
    assert rec["model"] == "chat" and rec["response_code"] == 200 and rec["upstream_cluster"] == "a"
    assert rec["response_flags"] == "-" and rec["prompt_tokens"] and rec["completion_tokens"] == 8


def test_stream_first_chunk_arrives_before_generation_ends(core):
    sims, gw = core
    sims.set("sim-a", tokens=20, itl_ms=60)  # ~1.2 s of generation after the first token
    t0 = time.monotonic()
    first = None
    parts = []
    stream = gw.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.monotonic() - t0
            parts.append(chunk.choices[0].delta.content)
    total = time.monotonic() - t0
    assert len(parts) == 20
    assert first is not None and first < 0.5 and total > 1.0
    assert total - first > 0.9  # the rest kept arriving after the first chunk: nothing was buffered


def test_stream_headers_are_sse_and_unbuffered(core):
    _, gw = core
    with FRESH.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={"model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        body = b"".join(r.iter_bytes())
    assert body.rstrip().endswith(b"data: [DONE]")


def test_completions_embeddings_responses_and_models(core):
    _, gw = core
    c = gw.client()
    comp = c.completions.create(model="chat", prompt="hello")
    assert comp.choices[0].text.startswith("sim-a#")
    streamed = "".join(
        ch.choices[0].text for ch in c.completions.create(model="chat", prompt="x", stream=True) if ch.choices
    )
    assert streamed.startswith("sim-a#")
    emb = c.embeddings.create(model="embed", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    resp = c.responses.create(model="chat", input="hi")
    assert resp.output_text.startswith("sim-a#")
    events = [e.type for e in c.responses.create(model="chat", input="hi", stream=True)]
    assert "response.output_text.delta" in events and events[-1] == "response.completed"
    ids = [m.id for m in c.models.list()]
    assert ids == ["chat", "embed", "dead"]


def test_request_id_round_trip_and_generated_when_absent(core):
    sims, gw = core
    r = FRESH.post(
        gw.url + "/v1/chat/completions",
        headers={"x-request-id": "req-abc-123"},
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.headers["x-request-id"] == "req-abc-123"
    assert sims.stats("sim-a")["recent"][-1]["request_id"] == "req-abc-123"
    r2 = FRESH.post(gw.url + "/v1/chat/completions", json={"model": "chat", "messages": []})
    generated = r2.headers["x-request-id"]
    assert len(generated) == 32 and sims.stats("sim-a")["recent"][-1]["request_id"] == generated
    recs = gw.records(wait_for=2)
    assert {rec["request_id"] for rec in recs} >= {"req-abc-123", generated}


def test_client_authorization_is_never_forwarded(core):
    sims, gw = core
    FRESH.post(
        gw.url + "/v1/chat/completions",
        headers={"authorization": "Bearer client-secret"},
        json={"model": "chat", "messages": []},
    )
    seen = sims.stats("sim-a")["recent"][-1]
    assert seen["authorization_present"] is True  # the deployment's own key was sent...
    assert "client-secret" not in str(seen)  # ...never the client's


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("content", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_request", None),
        (b'{"messages": []}', 400, "missing_required_parameter", "model"),
        (b'{"model": 42}', 400, "invalid_value", "model"),
        (b"[1, 2]", 400, "invalid_request", None),
        (b'{"model": "chat", "stream": "yes"}', 400, "invalid_type", "stream"),
        (b'{"model": "nope"}', 404, "model_not_found", "model"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(core, content, status, code, param):
    _, gw = core
    r = FRESH.post(
        gw.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    err = _error(r)
    assert err["code"] == code and err["param"] == param and err["message"]
    rec = gw.records(wait_for=1)[-1]
    assert rec["response_code"] == status and rec["response_flags"] in ("BR", "NR")


def test_body_over_limit_is_413_and_wrong_method_405(core):
    _, gw = core
    big = b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    r = FRESH.post(gw.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    r = FRESH.get(gw.url + "/v1/chat/completions")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed" and r.headers["allow"] == "POST"
    for method, path in (("POST", "/v1/models"), ("DELETE", "/v1/models/chat")):  # nothing to delete here
        r = FRESH.request(method, gw.url + path)
        assert r.status_code == 405 and r.headers["allow"] == "GET", (method, path, r.text)
    assert FRESH.get(gw.url + "/v1/models/chat").json()["id"] == "chat"
    r = FRESH.post(gw.url + "/v2/whatever", json={})
    assert r.status_code == 404 and _error(r)["code"] == "unknown_url"


def test_openai_sdk_raises_its_own_errors(core):
    _, gw = core
    with pytest.raises(openai.NotFoundError) as exc:
        gw.client().chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["code"] == "model_not_found"


def test_unreachable_upstream_is_502_with_flag(core):
    _, gw = core
    r = FRESH.post(gw.url + "/v1/chat/completions", json={"model": "dead", "messages": []})
    assert r.status_code == 502
    assert _error(r)["code"] == "upstream_unreachable"
    rec = gw.records(wait_for=1)[-1]
    assert "UF" in rec["response_flags"] and rec["upstream_cluster"] == "nowhere"


def test_upstream_http_error_passes_through_with_status_and_body(core):
    _, gw = core
    r = FRESH.post(
        gw.url + "/v1/chat/completions",
        headers={"x-sim-error-rate": "1", "x-sim-error-status": "400"},
        json={"model": "chat", "messages": []},
    )
    assert r.status_code == 400
    assert _error(r)["message"]  # the provider's own error body
    assert gw.records(wait_for=1)[-1]["attempts"] == 1  # 400 is never retried


def _leave_mid_stream(sims, gw) -> dict:
    """Read two chunks of a long stream and hang up; wait until sim-a sees it; its stats after."""
    with FRESH.stream(
        "POST", gw.url + "/v1/chat/completions", json={"model": "chat", "stream": True, "messages": []}
    ) as r:
        it = r.iter_bytes()
        next(it)
        next(it)
    # the client closed the connection; the provider must see its request abandoned quickly
    end = time.monotonic() + 2
    while time.monotonic() < end and sims.stats("sim-a")["cancelled"]["mid_stream"] < 1:
        time.sleep(0.02)
    return sims.stats("sim-a")


def test_client_disconnect_mid_stream_aborts_upstream(core):
    sims, gw = core
    sims.set("sim-a", tokens=100, itl_ms=50)
    st = _leave_mid_stream(sims, gw)
    assert st["cancelled"]["mid_stream"] == 1
    assert st["in_flight"] == 0
    rec = gw.records(wait_for=1)[-1]
    assert "DC" in rec["response_flags"]


def test_client_disconnect_is_seen_under_a_stock_asgi_server(sims_factory, gateways):
    # `llmgw serve` learns of a lost client from its own protocol; served by plain uvicorn (h11 here),
    # the app falls back to a pending receive(). Both must abort the upstream at once.
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]}, stock_uvicorn="h11")
    r = gw.client().chat.completions.create(model="chat", messages=[])
    assert r.choices[0].message.content.startswith("sim-a#")
    sims.set("sim-a", tokens=100, itl_ms=50)  # a long stream to leave (the answer above is a short one)
    assert _leave_mid_stream(sims, gw)["cancelled"]["mid_stream"] == 1
    recs = gw.records(wait_for=2)
    assert (
        recs[0]["response_code"] == 200 and recs[0]["response_flags"] == "-"
    )  # a finished one is no disconnect
    assert "DC" in recs[1]["response_flags"]


def test_health_and_readiness(core):
    _, gw = core
    assert FRESH.get(gw.url + "/healthz").status_code == 200
    r = FRESH.get(gw.url + "/readyz")
    assert r.status_code == 200 and r.json()["pools_ready"] is True


def _check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_good_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        "models:\n  - name: m\n    deployments:\n      - {id: d, base_url: 'http://127.0.0.1:1/v1', "
        "api_key: 'sk-very-secret', model: up}\n"
    )
    r = _check_config(good)
    assert r.returncode == 0, r.stderr
    assert (
        "config OK" in r.stdout and "sk-very-secret" not in r.stdout and "http://127.0.0.1:1/v1" in r.stdout
    )

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "models:\n  - name: m\n    deployments:\n      - {id: d, base_url: 'http://x/v1'}\n"
        "      - {id: e, base_url: 'not a url'}\n"
    )
    r = _check_config(bad)
    assert r.returncode == 2
    assert "models[0].deployments[1].base_url: not a URL" in r.stderr
    assert "Traceback" not in r.stderr

    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "models:\n  - name: m\n    deployments: [{id: d, base_url: 'http://x/v1'}]\n    retyr: {}\n"
    )
    r = _check_config(typo)
    assert r.returncode == 2 and "models[0].retyr: unknown key" in r.stderr


def test_bad_config_fails_serve_at_startup(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 99999}\nmodels: []\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "server.port" in r.stderr and "models" in r.stderr and "Traceback" not in r.stderr
