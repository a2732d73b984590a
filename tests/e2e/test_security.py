"""Tenancy and security through the real server: gateway keys, per-key limits, input hardening, SSRF,
hop-by-hop headers, the admin port, CORS, and provider keys that never leak."""

from __future__ import annotations

import contextlib
import gzip
import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
from harness import FRESH, REDIS_URL, Gateway, Sims, dep, free_port, metric_value, model, wait_until

from gateway.cli import main as cli_main
from gateway.security.keys import hash_key

FAST = {"ttft_ms": 20, "ttft_dist": "fixed", "itl_ms": 2, "tokens": 3, "tail_p": 0}
PROVIDER_KEY = "sk-provider-TOPSECRET-0123456789"
WRONG_PROVIDER_KEY = "sk-provider-WRONGSECRET-9876543210"
HEADER_SECRET = "hdr-secret-ABCDEF-424242"
MSG = [{"role": "user", "content": "hi"}]


def _keys_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", *args], capture_output=True, text=True, timeout=30
    )


def _keys(*args: str) -> subprocess.CompletedProcess:
    """`llmgw keys ...` through the same entry point, in this process (no interpreter start-up per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["keys", *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _error(r: httpx.Response) -> dict[str, Any]:
    """The body is an OpenAI error object, and nothing else."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _chat(
    base: str,
    key: str | None,
    /,
    model_name: str = "chat",
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return FRESH.post(
        base + "/v1/chat/completions",
        headers=h,
        timeout=10,
        json={"model": model_name, "messages": MSG, **body},
    )


def _scraped(gw: Gateway, name: str, **labels: str) -> float:
    """A metric of a gateway whose /metrics needs a key (protect_metrics), read with one."""
    text = FRESH.get(gw.url + "/metrics", headers={"authorization": f"Bearer {KEYS['all']}"}).text
    return metric_value(text, name, **labels)


def _records_of(gw: Gateway, key_id: str | None, n: int) -> list[dict[str, Any]]:
    """Access-log records of one key (None: no key), waiting until at least n were written."""
    end = time.monotonic() + 5
    while True:
        recs = [rec for rec in gw.records() if rec["api_key_id"] == key_id]
        if len(recs) >= n or time.monotonic() > end:
            return recs
        time.sleep(0.05)


def _purge(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    for k in r.scan_iter(match=prefix + "*"):
        r.delete(k)


# ---------------------------------------------------------------- a gateway with keys, shared by many tests

KEY_CACHE_TTL_S = 0.5  # the keyed gateway's auth.cache_ttl_s: how long a revoked Redis key may keep working
REVOKE_HANG_GUARD_S = (
    30.0  # only stops a key that is never revoked; the TTL is checked on logged arrival times
)
LOG_CLOCK_EPSILON_S = 0.005  # start_time is the arrival instant on the wall clock, written to the millisecond


def _epoch(start_time: str) -> float:
    return datetime.strptime(start_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


KEYS = {
    name: f"sk-gw-test-{name}-{i:04d}"
    for i, name in enumerate(["a", "rpm", "tpm", "conc", "all", "tpm-float"])
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sims, Gateway, str]]:
    """One gateway, auth.mode keys, Redis state; each test uses its own key so limits never collide."""
    prefix = f"llmgw-test-sec-{time.monotonic_ns()}:"
    sims = Sims(
        {
            "sim-a": ("us-east", {**FAST, "require_key": PROVIDER_KEY}),
            "sim-b": ("us-east", {**FAST, "require_key": PROVIDER_KEY}),
        }
    )
    keys = [
        {"id": "team-a", "hash": hash_key(KEYS["a"]), "models": ["chat*"]},
        {"id": "team-rpm", "hash": hash_key(KEYS["rpm"]), "rpm": 3},
        {"id": "team-tpm", "hash": hash_key(KEYS["tpm"]), "tpm": 300},
        {"id": "team-conc", "hash": hash_key(KEYS["conc"]), "max_concurrency": 2},
        {"id": "team-all", "hash": hash_key(KEYS["all"])},
        {"id": "team-tpm-float", "hash": hash_key(KEYS["tpm-float"]), "tpm": 2000},
    ]
    cfg = {
        "state": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix},
        "auth": {"mode": "keys", "keys": keys, "protect_metrics": True, "cache_ttl_s": KEY_CACHE_TTL_S},
        "models": [
            model(
                "chat",
                [
                    dep(
                        "a",
                        sims.base_url("sim-a"),
                        api_key=PROVIDER_KEY,
                        headers={
                            "x-api-key": HEADER_SECRET,
                            "ocp-apim-subscription-key": HEADER_SECRET,
                            "x-team": "voice",
                        },
                    )
                ],
            ),
            model("chat-mini", [dep("a-mini", sims.base_url("sim-a"), api_key=PROVIDER_KEY)]),
            model("embed", [dep("a-embed", sims.base_url("sim-a"), api_key=PROVIDER_KEY, model="sim-embed")]),
            # a deployment whose provider key is wrong: the provider answers 401 to every request
            model(
                "broken",
                [
                    dep(
                        "b-wrong",
                        sims.base_url("sim-b"),
                        api_key=WRONG_PROVIDER_KEY,
                        pool={"validate_on_start": False, "min_connections": 0},
                    )
                ],
                retry={"max_retries": 0},
            ),
        ],
    }
    gw = Gateway(cfg, tmp_path_factory.mktemp("keyed"), name="keyed")
    yield sims, gw, prefix
    gw.stop()
    sims.stop()
    _purge(prefix)


def test_key_lifecycle_through_the_cli(keyed):
    _, gw, prefix = keyed
    store = ["--redis-url", REDIS_URL, "--key-prefix", prefix]
    made = _keys_cli(
        "create", *store, "--id", "svc-x", "--models", "chat*", "--rpm", "5", "--meta", "team=voice"
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-gw-") and len(key) > 40
    assert "shown only now" in made.stderr

    again = _keys("create", *store, "--id", "svc-x")
    assert again.returncode == 2 and "exists" in again.stderr

    listed = _keys("list", *store)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("svc-x"))
    assert "chat*" in row and " 5 " in row and "voice" in row
    assert key not in listed.stdout and hash_key(key) not in listed.stdout and "sha256" not in listed.stdout

    r = gw.client(api_key=key).chat.completions.create(model="chat", messages=MSG)
    assert r.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(api_key=key).embeddings.create(model="embed", input="x")

    revoked = _keys("revoke", *store, "--id", "svc-x")
    assert revoked.returncode == 0, revoked.stderr
    revoked_at = time.time()  # the revocation is stored: no key lookup from now on finds the key
    passed_after = 0  # requests the key still authenticated (answered, or refused by its rpm limit)
    give_up = time.monotonic() + REVOKE_HANG_GUARD_S
    while (code := _chat(gw.url, key).status_code) != 401:
        assert code in (200, 429) and time.monotonic() < give_up, "a revoked key kept working"
        passed_after += 1
        time.sleep(0.1)
    r = _chat(gw.url, key)
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    # Only from the cached lookup: every request the revoked key still passed arrived (as the gateway
    # logged it) before the cache entry, read before the revocation, expired.
    passed = _records_of(gw, "svc-x", 2 + passed_after)  # with the chat and the refused embedding above
    assert len(passed) == 2 + passed_after
    assert all(
        _epoch(rec["start_time"]) < revoked_at + KEY_CACHE_TTL_S + LOG_CLOCK_EPSILON_S for rec in passed
    )
    assert _keys("revoke", *store, "--id", "svc-x").returncode == 1
    assert "svc-x" not in _keys("list", *store).stdout

    assert _records_of(gw, "svc-x", 1)
    assert key not in gw.log_path.read_text() and key not in gw.stderr()


def test_config_key_made_with_keys_hash(keyed):
    _, gw, _ = keyed
    out = _keys("hash", KEYS["all"])
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == hash_key(KEYS["all"])
    # Bearer (OpenAI SDK) and api-key (Azure-style clients) both work
    r = gw.client(api_key=KEYS["all"]).chat.completions.create(model="chat", messages=MSG)
    assert r.choices[0].message.content
    r = FRESH.post(
        gw.url + "/v1/chat/completions",
        headers={"api-key": KEYS["all"]},
        json={"model": "chat", "messages": MSG},
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer sk-gw-not-a-key"},
        {"authorization": f"Basic {KEYS['all']}"},
        {"authorization": "Bearer"},
        {"api-key": "nope"},
    ],
)
def test_missing_or_invalid_key_is_401(keyed, headers):
    sims, gw, _ = keyed
    before = sims.stats("sim-a")["served"]["chat"]
    n = len(_records_of(gw, None, 0))
    r = FRESH.post(gw.url + "/v1/chat/completions", headers=headers, json={"model": "chat", "messages": MSG})
    assert r.status_code == 401
    err = _error(r)
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert sims.stats("sim-a")["served"]["chat"] == before  # refused at the edge
    rec = _records_of(gw, None, n + 1)[-1]
    assert rec["response_code"] == 401 and rec["response_flags"] == "UAEX" and rec["api_key_id"] is None


def test_two_different_keys_in_authorization_and_api_key_are_400(keyed):
    """Authorization won silently over api-key: a proxy in front that checked one key passed a request the
    gateway served on the other. Two different keys are refused, logged and counted; one key in both is
    served."""
    sims, gw, _ = keyed
    auth = {"authorization": f"Bearer {KEYS['all']}"}

    def refused() -> float:
        return _scraped(gw, "llmgw_input_limits_total", limit="ambiguous_credentials")

    before, served = refused(), sims.stats("sim-a")["served"]["chat"]
    cases = [
        {**auth, "api-key": "sk-gw-someone-else"},
        {"authorization": "Bearer sk-gw-someone-else", "api-key": KEYS["all"]},
    ]
    ids = [f"two-keys-{i}" for i in range(len(cases))]
    for rid, headers in zip(ids, cases, strict=True):
        r = _chat(gw.url, None, headers={**headers, "x-request-id": rid})
        assert r.status_code == 400, r.text
        assert _error(r)["code"] == "ambiguous_credentials"
    assert sims.stats("sim-a")["served"]["chat"] == served
    recs = _records_by_id(gw, ids)
    assert {(x["response_code"], x["response_flags"], x["api_key_id"]) for x in recs} == {(400, "DPE", None)}
    assert refused() == before + len(cases)
    assert _chat(gw.url, None, headers={**auth, "api-key": KEYS["all"]}).status_code == 200


def test_a_valid_api_key_beside_a_basic_authorization_is_400_saying_what_to_drop(keyed):
    """An Azure-style client (the key in api-key) behind a front proxy's Basic login, or a caller who also
    sent Basic credentials: the gateway answered 401 "Missing API key" though the key was there. Now a
    400 that says which credential it does not take, logged (DPE) and counted like two different keys;
    nothing reaches the provider, and the key alone is served."""
    sims, gw, _ = keyed

    def refused() -> float:
        return _scraped(gw, "llmgw_input_limits_total", limit="ambiguous_credentials")

    before, served = refused(), sims.stats("sim-a")["served"]["chat"]
    r = FRESH.post(
        gw.url + "/v1/chat/completions",
        auth=("alice", "front-proxy-password"),  # httpx sends Authorization: Basic ...
        headers={"api-key": KEYS["all"], "x-request-id": "basic-beside-api-key"},
        json={"model": "chat", "messages": MSG},
    )
    assert r.request.headers["authorization"].startswith("Basic ")
    assert r.status_code == 400 and "www-authenticate" not in r.headers, r.text
    err = _error(r)
    assert (err["type"], err["code"], err["param"]) == (
        "invalid_request_error",
        "ambiguous_credentials",
        None,
    )
    assert "'Basic' credential in 'Authorization'" in err["message"], err
    assert sims.stats("sim-a")["served"]["chat"] == served
    (rec,) = _records_by_id(gw, ["basic-beside-api-key"])
    assert (rec["response_code"], rec["response_flags"], rec["error_type"], rec["api_key_id"]) == (
        400,
        "DPE",
        "ambiguous_credentials",
        None,
    )
    assert refused() == before + 1
    ok = FRESH.post(
        gw.url + "/v1/chat/completions",
        headers={"api-key": KEYS["all"]},
        json={"model": "chat", "messages": MSG},
    )
    assert ok.status_code == 200, ok.text


def test_sdk_sees_401_as_authentication_error(keyed):
    _, gw, _ = keyed
    with pytest.raises(openai.AuthenticationError) as exc:
        gw.client(api_key="sk-gw-wrong").chat.completions.create(model="chat", messages=MSG)
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"


def test_model_not_allowed_is_403(keyed):
    sims, gw, _ = keyed
    c = gw.client(api_key=KEYS["a"])
    assert c.chat.completions.create(model="chat-mini", messages=MSG).choices  # glob chat* matches
    before = sims.stats("sim-a")["served"]["chat"]
    with pytest.raises(openai.PermissionDeniedError) as exc:
        c.embeddings.create(model="embed", input="x")
    assert exc.value.status_code == 403
    assert exc.value.body["code"] == "model_not_allowed" and exc.value.body["param"] == "model"
    assert "team-a" in exc.value.body["message"]
    assert sims.stats("sim-a")["served"]["chat"] == before
    rec = _records_of(gw, "team-a", 2)[-1]
    assert rec["response_code"] == 403 and rec["api_key_id"] == "team-a"


def test_rpm_limit_is_429_with_retry_after_and_logged_by_key_id(keyed):
    sims, gw, _ = keyed
    for _ in range(3):
        assert _chat(gw.url, KEYS["rpm"]).status_code == 200
    before = sims.stats("sim-a")["served"]["chat"]
    r = _chat(gw.url, KEYS["rpm"])
    assert r.status_code == 429
    err = _error(r)
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    wait = int(r.headers["retry-after"])  # OpenAI's headers too: the limit, none left, and when it resets
    assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == (
        "3",
        "0",
    )
    assert r.headers["x-ratelimit-reset-requests"] == (f"{wait}s" if wait < 60 else "1m0s")
    assert sims.stats("sim-a")["served"]["chat"] == before
    with pytest.raises(openai.RateLimitError):
        gw.client(api_key=KEYS["rpm"]).chat.completions.create(model="chat", messages=MSG)
    recs = _records_of(gw, "team-rpm", 5)
    assert [rec["response_code"] for rec in recs] == [200, 200, 200, 429, 429]
    assert recs[-1]["response_flags"] == "RL"
    assert KEYS["rpm"] not in gw.log_path.read_text()
    text = FRESH.get(gw.url + "/metrics", headers={"authorization": f"Bearer {KEYS['all']}"}).text
    assert metric_value(text, "llmgw_rate_limited_total", key="team-rpm", limit="rpm") == 2
    assert KEYS["rpm"] not in text
    # other keys are not affected
    assert _chat(gw.url, KEYS["all"]).status_code == 200


def test_tpm_limit_charges_the_completion_allowance(keyed):
    _, gw, _ = keyed
    assert _chat(gw.url, KEYS["tpm"], max_tokens=200).status_code == 200  # ~20 + 200 of 300
    r = _chat(gw.url, KEYS["tpm"], max_tokens=200)
    assert (
        r.status_code == 429 and _error(r)["code"] == "rate_limit_exceeded" and "tpm" in _error(r)["message"]
    )
    assert r.headers["x-ratelimit-limit-tokens"] == "300" and r.headers["x-ratelimit-remaining-tokens"] == "0"
    # an absurd allowance costs the whole window, not more, and does not break the accounting (10**18: the
    # widest integers fit; a wider one is refused before any limit, as integer_out_of_range)
    r = _chat(gw.url, KEYS["tpm"], max_tokens=10**18)
    assert r.status_code == 429 and int(r.headers["retry-after"]) <= 60
    r = _chat(gw.url, KEYS["tpm"], max_tokens=10**30)
    assert r.status_code == 400 and _error(r)["code"] == "integer_out_of_range"


def test_tpm_charges_a_completion_allowance_written_as_a_float_or_a_string(keyed):
    """A lenient provider reads 2000.0 and "2000" as 2000: before, they were charged the default 256, so
    seven such requests fitted a 2,000-token minute."""
    _, gw, _ = keyed
    first = _chat(gw.url, KEYS["tpm-float"], max_tokens=2000.0)
    assert first.status_code != 429  # (the simulator then refuses a float as OpenAI does: 400)
    for asked in (2000.0, "2000"):
        r = _chat(gw.url, KEYS["tpm-float"], max_tokens=asked)
        assert r.status_code == 429 and "tpm" in _error(r)["message"], r.text


def test_concurrency_cap_per_key(keyed):
    _, gw, _ = keyed

    def slow(_: int) -> httpx.Response:
        return _chat(gw.url, KEYS["conc"], headers={"x-sim-ttft-ms": "700"})

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(slow, range(5)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429, 429], codes
    refused = next(r for r in results if r.status_code == 429)
    assert _error(refused)["code"] == "rate_limit_exceeded" and refused.headers["retry-after"] == "1"
    # slots are given back when requests end, streams included
    for _ in range(3):
        with FRESH.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            timeout=10,
            headers={"authorization": f"Bearer {KEYS['conc']}"},
            json={"model": "chat", "stream": True, "messages": MSG},
        ) as r:
            assert r.status_code == 200
            b"".join(r.iter_bytes())
    with ThreadPoolExecutor(2) as pool:
        assert [r.status_code for r in pool.map(slow, range(2))] == [200, 200]


def test_protect_metrics_also_protects_admin(keyed):
    _, gw, _ = keyed
    auth = {"authorization": f"Bearer {KEYS['all']}"}

    def refused() -> float:
        return _scraped(gw, "llmgw_requests_total", code="401")

    before = refused()
    ids = []
    for path in ("/metrics", "/admin/config", "/admin/deployments"):
        ids.append(f"refused-read-{path}-{time.monotonic_ns()}")
        r = FRESH.get(gw.url + path, headers={"x-request-id": ids[-1]})
        assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key", path
        assert FRESH.get(gw.url + path, headers=auth).status_code == 200
    for path in ("/healthz", "/readyz"):  # probes stay open
        assert FRESH.get(gw.url + path).status_code == 200
    # each refusal is logged and counted like a proxy route's (a scraper with a wrong key shows up)
    recs = _records_by_id(gw, ids)
    assert [(r["path"], r["response_code"], r["response_flags"]) for r in recs] == [
        (p, 401, "UAEX") for p in ("/metrics", "/admin/config", "/admin/deployments")
    ]
    assert refused() - before == 3


def test_provider_keys_never_leak(keyed):
    sims, gw, _ = keyed
    auth = {"authorization": f"Bearer {KEYS['all']}"}
    seen: list[str] = []
    n = len(_records_of(gw, "team-all", 0))
    r = _chat(gw.url, KEYS["all"])
    assert r.status_code == 200
    seen.append(r.text)
    assert sims.stats("sim-a")["recent"][-1]["authorization_present"] is True
    r = _chat(gw.url, KEYS["all"], model_name="broken")  # the provider refuses the deployment's key
    assert r.status_code == 401 and sims.stats("sim-b")["unauthorized"] >= 1
    seen.append(r.text)
    r = _chat(gw.url, KEYS["all"], model_name="broken", stream=True)
    seen.append(r.text)
    seen.append(FRESH.get(gw.url + "/v1/models", headers=auth).text)
    seen.append(FRESH.get(gw.url + "/v1/models/chat", headers=auth).text)
    config = FRESH.get(gw.url + "/admin/config", headers=auth)
    assert config.status_code == 200
    dep_cfg = config.json()["models"][0]["deployments"][0]
    assert dep_cfg["api_key"] == "***" and dep_cfg["headers"] == {
        "x-api-key": "***",
        "ocp-apim-subscription-key": "***",
        "x-team": "***",
    }  # every value: an allow-list
    seen.append(config.text)
    seen.append(FRESH.get(gw.url + "/admin/deployments", headers=auth).text)
    seen.append(FRESH.get(gw.url + "/metrics", headers=auth).text)
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "-v", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    seen += [checked.stdout, checked.stderr]
    _records_of(gw, "team-all", n + 3)  # the access log is written by a background thread
    seen += [gw.log_path.read_text(), gw.stderr()]
    for secret in (PROVIDER_KEY, WRONG_PROVIDER_KEY, HEADER_SECRET, "TOPSECRET", "WRONGSECRET"):
        for i, text in enumerate(seen):
            assert secret not in text, (secret, i, text[:500])
    for key in KEYS.values():  # nor the gateway keys
        assert all(key not in text for text in seen)


# ---------------------------------------------------------------- limits across processes, and without Redis


def test_a_limit_shared_by_two_gateways_holds_in_total(sims_factory, gateways, redis_prefix):
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    cfg = {
        "state": {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": redis_prefix},
        "auth": {"mode": "keys", "keys": [{"id": "shared", "hash": hash_key(KEYS["all"]), "rpm": 6}]},
        "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
    }
    gw1, gw2 = gateways(cfg, wait_ready=False), gateways(cfg, wait_ready=False)  # start side by side
    gw1.wait_ready()
    gw2.wait_ready()
    codes = {gw1.url: [], gw2.url: []}
    for i in range(12):
        url = (gw1.url, gw2.url)[i % 2]
        codes[url].append(_chat(url, KEYS["all"]).status_code)
    every = codes[gw1.url] + codes[gw2.url]
    assert every.count(200) == 6 and every.count(429) == 6, codes
    assert codes[gw1.url].count(200) == 3 and codes[gw2.url].count(200) == 3  # each admitted some: shared
    assert sims.stats("sim-a")["served"]["chat"] == 6
    _purge(redis_prefix)


def test_redis_down_falls_back_to_local_limits(sims_factory, gateways, private_redis):
    port, proc = private_redis
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    cfg = {
        "state": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0", "sync_interval_ms": 100},
        "auth": {"mode": "keys", "keys": [{"id": "team-a", "hash": hash_key(KEYS["a"]), "rpm": 4}]},
        "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
    }
    gw = gateways(cfg)
    assert [_chat(gw.url, KEYS["a"]).status_code for _ in range(3)] == [200] * 3  # 3 of 4, counted in Redis
    proc.kill()
    proc.wait()
    # The shared window is gone with Redis; the process now counts on its own, from zero, to the same limit.
    codes, slowest = [], 0.0
    for _ in range(6):
        t0 = time.monotonic()
        codes.append(_chat(gw.url, KEYS["a"]).status_code)
        slowest = max(slowest, time.monotonic() - t0)
    assert codes == [200, 200, 200, 200, 429, 429], codes
    assert slowest < 1.0  # nobody waits on the dead Redis
    assert gw.stderr().count("enforcing limits locally") == 1
    # the log says which decisions were not shared: admitted ones RLL, refused ones RL,RLL
    flags = [r["response_flags"] for r in gw.records(wait_for=9)]
    assert flags == ["-"] * 3 + ["RLL"] * 4 + ["RL,RLL"] * 2, flags
    # Redis is still dead: the local seconds are counted while it lasts, not only once it is back
    scrape = FRESH.get(gw.url + "/metrics", headers={"authorization": f"Bearer {KEYS['a']}"}, timeout=5).text
    assert metric_value(scrape, "llmgw_state_local_only_seconds_total") > 0


# ---------------------------------------------------------------- input hardening


class _Recorder:
    """A minimal OpenAI-compatible upstream that records every request's raw headers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                # hop-by-hop and odd headers the gateway must not pass back to its client
                self.send_header("keep-alive", "timeout=99, canary")
                self.send_header("proxy-authenticate", "Basic realm=canary")
                self.send_header("upgrade", "canary/1.0")
                self.send_header("x-upstream-hop", "canary")
                self.send_header("connection", "keep-alive, x-upstream-hop")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                recorder.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                self._send(b'{"object": "list", "data": []}')

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n)
                recorder.requests.append(
                    {
                        "method": "POST",
                        "path": self.path,
                        "body": body,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                )
                self._send(
                    orjson.dumps(
                        {
                            "id": "rec-1",
                            "object": "chat.completion",
                            "created": 0,
                            "model": "rec",
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": "ok"},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        }
                    )
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sims, Gateway, _Recorder]]:
    """auth off, small input limits; a recorder upstream; a canary provider the config never names."""
    sims = Sims({"sim-a": ("us-east", FAST), "canary": ("us-east", FAST)})
    rec = _Recorder()
    cfg = {
        "server": {
            "max_header_bytes": 2048,
            "max_json_depth": 16,
            "max_messages": 4,
            "max_body_bytes": 8192,
            "allowed_hosts": ["gw.test"],
        },
        "models": [
            model("chat", [dep("a", sims.base_url("sim-a"))]),
            model(
                "rec",
                [dep("rec", f"http://127.0.0.1:{rec.port}/v1", pool={"keepwarm_interval_s": 0})],
                retry={"max_retries": 0},
            ),
        ],
    }
    gw = Gateway(cfg, tmp_path_factory.mktemp("hardened"), name="hardened")
    yield sims, gw, rec
    gw.stop()
    sims.stop()
    rec.stop()


def _raw(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are; read the response until the server closes or a full body arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and len(body) >= int(value):
                        return data


def test_header_size_limit_is_431(hardened):
    sims, gw, _ = hardened
    before = sims.stats("sim-a")["served"]["chat"]
    r = _chat(gw.url, None, headers={"x-pad": "a" * 3000})
    assert r.status_code == 431 and _error(r)["code"] == "headers_too_large"
    r = _chat(gw.url, None, headers={f"x-pad-{i}": "a" * 50 for i in range(60)})  # many small ones add up
    assert r.status_code == 431
    assert _chat(gw.url, None, headers={"x-pad": "a" * 500}).status_code == 200
    assert sims.stats("sim-a")["served"]["chat"] == before + 1


def _nested(depth: int) -> Any:
    v: Any = "leaf"
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


def test_json_nesting_depth_limit(hardened):
    _, gw, _ = hardened
    assert _chat(gw.url, None, metadata=_nested(10)).status_code == 200
    r = _chat(gw.url, None, metadata=_nested(20))
    assert r.status_code == 400 and _error(r)["code"] == "too_deep"
    # deeper than the JSON parser itself goes: still a clean 400 (fits the body limit)
    deep = b'{"model": "chat", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    r = FRESH.post(
        gw.url + "/v1/chat/completions", content=deep, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and _error(r)["code"] in ("too_deep", "invalid_request")


def test_integers_beyond_64_bits_are_refused_not_rounded(hardened):
    """orjson reads an integer wider than 64 bits as a float: the body written again for the provider
    would carry another value. The widest integers that fit go through digit for digit; wider ones are
    refused (400, BR), before the provider sees anything."""
    _, gw, rec = hardened
    n = len(rec.requests)
    fits = {"seed": 2**64 - 1, "metadata": {"low": str(-(2**63)), "ticket": "1" * 30}}
    r = _chat(gw.url, None, "rec", headers={"x-request-id": "int-fits"}, **fits)
    assert r.status_code == 200, r.text
    sent = rec.requests[n]["body"]
    assert b":%d" % (2**64 - 1) in sent and b'"%s"' % (b"1" * 30) in sent, sent
    ids = []
    for i, wide in enumerate((2**64, -(2**63) - 1, 10**400)):
        ids.append(f"int-wide-{i}")
        r = _chat(gw.url, None, "rec", headers={"x-request-id": ids[-1]}, seed=wide)
        assert r.status_code == 400 and _error(r)["code"] == "integer_out_of_range", r.text
        assert str(wide)[:20] in _error(r)["message"] and len(_error(r)["message"]) < 200
    assert len(rec.requests) == n + 1  # nothing refused reached the provider
    assert [r["response_flags"] for r in _records_by_id(gw, ids)] == ["BR"] * 3


def test_too_many_messages(hardened):
    _, gw, _ = hardened
    four = [{"role": "user", "content": str(i)} for i in range(4)]
    assert (
        FRESH.post(gw.url + "/v1/chat/completions", json={"model": "chat", "messages": four}).status_code
        == 200
    )
    r = FRESH.post(gw.url + "/v1/chat/completions", json={"model": "chat", "messages": four + four[:1]})
    assert r.status_code == 400
    err = _error(r)
    assert err["code"] == "too_many_messages" and err["param"] == "messages"


@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; b=x",
        "application/xml",
        "application/jsonx",  # not a prefix match
        "application/json-patch+json",
    ],
)
def test_non_json_content_type_is_415(hardened, ctype):
    _, gw, _ = hardened
    r = FRESH.post(
        gw.url + "/v1/chat/completions",
        content=b'{"model": "chat", "messages": []}',
        headers={"content-type": ctype},
    )
    assert r.status_code == 415 and _error(r)["code"] == "unsupported_media_type"
    for ok in ("application/json; charset=utf-8", "Application/JSON", "application/json ;charset=UTF-8"):
        r = FRESH.post(
            gw.url + "/v1/chat/completions",
            content=b'{"model": "chat", "messages": []}',
            headers={"content-type": ok},
        )
        assert r.status_code == 200, ok


def test_a_compressed_request_body_is_415_and_the_encoding_never_reaches_the_provider(hardened):
    """The body is parsed and re-encoded on its way: a gzip body cannot be read (it got a 400 about UTF-8),
    and a plain one sent with Content-Encoding: gzip went on with the header, which a provider would honour."""
    _, gw, recorder = hardened
    body = b'{"model": "rec", "messages": [{"role": "user", "content": "hi"}]}'
    for data in (gzip.compress(body), body):
        r = FRESH.post(
            gw.url + "/v1/chat/completions",
            content=data,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        assert r.status_code == 415 and _error(r)["code"] == "unsupported_content_encoding", r.text
        assert _error(r)["param"] == "content-encoding"
    ok = FRESH.post(
        gw.url + "/v1/chat/completions",
        content=body,
        headers={
            "content-type": "application/json",
            "content-encoding": "identity",
            "x-request-id": "enc-ok",
        },
    )
    assert ok.status_code == 200
    (seen,) = [r for r in recorder.requests if r["headers"].get("x-request-id") == "enc-ok"]
    assert "content-encoding" not in {k.lower() for k in seen["headers"]}, seen


def test_a_request_id_that_is_not_printable_ascii_is_replaced_everywhere_alike(hardened):
    """The id is echoed in a response header: latin-1 there, UTF-8 in the log would name two ids."""
    _, gw, _ = hardened
    r = FRESH.post(
        gw.url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": "caf\xe9".encode("latin-1")},
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid.isascii() and rid != "caf\xe9"
    wait_until("its record", lambda: any(x["request_id"] == rid for x in gw.records()))


def test_body_limit_holds_without_content_length(hardened):
    _, gw, _ = hardened
    big = b'{"model": "chat", "pad": "' + b"x" * 20000 + b'"}'

    def chunks() -> Iterator[bytes]:  # chunked: the size is only known while reading
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = FRESH.post(
        gw.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"


def test_hop_by_hop_headers_are_never_forwarded(hardened):
    _, gw, rec = hardened
    body = b'{"model": "rec", "messages": [{"role": "user", "content": "hi"}]}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"Connection: keep-alive, X-Hop-Canary\r\nX-Hop-Canary: canary\r\n"
        b"Keep-Alive: timeout=5, canary\r\nTE: trailers, canary\r\nTrailer: x-canary\r\n"
        b"Proxy-Authorization: Basic Y2FuYXJ5\r\nProxy-Connection: canary\r\nUpgrade: canary/1.0\r\n"
        b"X-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    n = len(rec.requests)
    resp = _raw(gw.port, request)
    head, _, payload = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), resp[:300]
    sent = rec.requests[n]
    assert sent["method"] == "POST" and orjson.loads(sent["body"])["messages"][0]["content"] == "hi"
    got = sent["headers"]
    assert got.get("x-kept") == "yes"  # ordinary x- headers do go through
    for name in (
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
        "x-hop-canary",
    ):
        assert "canary" not in got.get(name, "").lower(), (name, got)
    assert "x-hop-canary" not in got and "transfer-encoding" not in got and "proxy-authorization" not in got
    assert int(got["content-length"]) == len(sent["body"])  # re-framed, not relayed chunked
    # ... and the upstream's hop-by-hop response headers are not passed back either
    lower = head.lower()
    for name in (b"keep-alive:", b"proxy-authenticate:", b"upgrade:", b"x-upstream-hop:"):
        assert name not in lower, head


def test_the_gateway_only_calls_configured_upstreams(hardened):
    """No client-controlled upstream: headers, absolute-URI targets and body fields cannot redirect."""
    sims, gw, _ = hardened
    canary = sims.url("canary")
    canary_host = canary.removeprefix("http://")
    before = sims.stats("sim-a")["served"]["chat"]
    opened = sims.stats("canary")["connections_opened"]  # our own /sim/stats calls count as connections
    hostile = {
        "x-forwarded-host": canary_host,
        "forwarded": f"host={canary_host};proto=http",
        "x-original-url": canary + "/v1/chat/completions",
        "x-rewrite-url": canary + "/v1",
        "x-forwarded-proto": "http",
        "x-forwarded-port": str(sims.ports["canary"]),
        "x-gateway-deployment": "canary",
        "x-gateway-region": canary,
    }
    for name, value in hostile.items():
        r = _chat(gw.url, None, headers={name: value})
        assert r.status_code in (200, 400, 404), (name, r.status_code, r.text)
    for field in ("base_url", "api_base", "url", "endpoint", "azure_endpoint"):
        assert _chat(gw.url, None, **{field: canary + "/v1"}).status_code == 200
    body = b'{"model": "chat", "messages": []}'
    for target in (
        canary.encode() + b"/v1/chat/completions",
        b"//" + canary_host.encode() + b"/v1/chat/completions",
    ):
        _raw(
            gw.port,
            b"POST "
            + target
            + b" HTTP/1.1\r\nHost: "
            + canary_host.encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
            + body,
        )
    st = sims.stats("canary")
    assert st["requests"] == 0 and st["connections_opened"] == opened + 1, st
    assert sims.stats("sim-a")["served"]["chat"] > before


REC_BODY = b'{"model": "rec", "messages": [{"role": "user", "content": "hi"}]}'
_CHAT_BODY = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'


def _records_by_id(gw: Gateway, ids: list[str]) -> list[dict[str, Any]]:
    """The access-log records of these request ids, in their order, once all are written."""

    def logged() -> dict[str, dict[str, Any]] | None:
        by_id = {r["request_id"]: r for r in gw.records()}
        return by_id if all(i in by_id for i in ids) else None

    found = wait_until(f"records of {ids}", logged)
    return [found[i] for i in ids]


def test_a_foreign_web_page_cannot_make_a_local_gateway_spend(hardened):
    """With auth.mode none on loopback, as the demo runs, any web page the user opened could POST to the
    gateway from the browser (a fetch with a Blob body sends no Content-Type and needs no CORS
    preflight), and the gateway spent the provider quota. Browsers always send Origin on such a request:
    one not in server.cors_origins (unset here) is refused before anything else, logged and counted,
    and the answer carries no CORS header, so the page cannot even read it."""
    _, gw, rec = hardened
    n = len(rec.requests)
    before = metric_value(gw.metrics(), "llmgw_input_limits_total", limit="origin_not_allowed")
    browser = {"sec-fetch-mode": "cors", "sec-fetch-site": "cross-site", "accept": "*/*"}
    cases = [
        {"origin": "https://evil.example", **browser},  # the Blob fetch: no Content-Type at all
        {"origin": "https://evil.example", "content-type": "application/json"},
        {"origin": "null", **browser},  # a sandboxed iframe, a data: URL page
        # DNS rebinding: the page's own name resolved to the gateway, so the browser thinks it same-origin
        {"origin": f"http://rebound.example:{gw.port}", "host": f"rebound.example:{gw.port}"},
        {"origin": f"http://127.0.0.1:{gw.port + 1}"},  # a page of another local server
        {"origin": f"http://app.localhost:{gw.port + 1}", "host": f"app.localhost:{gw.port}"},
        # another name under localhost is another origin, though the same server answers it
        {"origin": f"http://app.localhost:{gw.port}", "host": f"localhost:{gw.port}"},
        # a name in server.allowed_hosts (gw.test) at another port is another server's page
        {"origin": f"http://gw.test:{gw.port + 1}", "host": f"gw.test:{gw.port}"},
    ]
    ids = [f"foreign-origin-{i}" for i in range(len(cases))]
    for rid, headers in zip(ids, cases, strict=True):
        r = FRESH.post(
            gw.url + "/v1/chat/completions", content=REC_BODY, headers={**headers, "x-request-id": rid}
        )
        assert r.status_code == 403, (headers, r.text)
        assert _error(r)["code"] == "origin_not_allowed" and "server.cors_origins" in _error(r)["message"]
        assert not any(k.startswith("access-control-") for k in r.headers)
    preflight = {
        "origin": "https://evil.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization",
        "x-request-id": "foreign-origin-preflight",
    }
    r = FRESH.options(gw.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 403 and _error(r)["code"] == "origin_not_allowed"
    assert not any(k.startswith("access-control-") for k in r.headers)
    assert len(rec.requests) == n  # nothing reached the provider
    recs = _records_by_id(gw, [*ids, "foreign-origin-preflight"])
    assert {(x["response_code"], x["response_flags"], x["error_type"]) for x in recs} == {
        (403, "UAEX", "origin_not_allowed")
    }
    assert [x["method"] for x in recs] == ["POST"] * len(cases) + ["OPTIONS"]
    m = gw.metrics()
    assert metric_value(m, "llmgw_input_limits_total", limit="origin_not_allowed") == before + len(cases) + 1


def test_the_gateways_own_pages_and_clients_without_an_origin_are_served(hardened):
    """The API docs' "Try it out" posts from the gateway's own origin (an address, localhost or a name
    under it, or a name in server.allowed_hosts, at its port), which no foreign page can pose as; SDKs
    and curl send no Origin at all."""
    _, gw, _ = hardened
    port = gw.port
    hosts = (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"[::1]:{port}",
        f"LOCALHOST:{port}",
        f"app.localhost:{port}",
        f"gw.test:{port}",  # the operator's own name (allowed_hosts)
        f"GW.Test:{port}",
    )
    for host in hosts:
        for scheme in ("http", "https"):  # https: behind a TLS-terminating proxy at the same address
            r = _chat(gw.url, None, headers={"origin": f"{scheme}://{host.lower()}", "host": host})
            assert r.status_code == 200, (scheme, host, r.text)
            assert "access-control-allow-origin" not in r.headers  # same-origin needs none
    reply = gw.client().chat.completions.create(model="chat", messages=MSG)
    assert reply.choices[0].message.content
    assert _chat(gw.url, None).status_code == 200


REBOUND_READS = (
    "/metrics",
    "/admin/config",
    "/admin/deployments",
    "/v1/models",
    "/models",
    "/v1/models/chat",
    "/openapi.json",
    "/docs",
    "/nowhere",
)


def test_a_page_rebound_to_a_local_gateway_cannot_read_it(hardened):
    """DNS rebinding: a page on a foreign name points that name at 127.0.0.1, so the browser deems the
    gateway same-origin, sends the foreign name as Host and, on a GET, no Origin: with auth none it read
    /metrics, /admin/* and /v1/models. A Host that is not an address, localhost or a name listed in
    server.allowed_hosts is now refused, logged and counted, on every route but the probes; the gateway's
    addresses, localhost and the listed names are served."""
    _, gw, rec = hardened
    n = len(rec.requests)
    before = metric_value(gw.metrics(), "llmgw_input_limits_total", limit="host_not_allowed")
    rebound = f"rebound.example:{gw.port}"
    ids = [f"rebound-{i}" for i in range(len(REBOUND_READS))]
    for rid, path in zip(ids, REBOUND_READS, strict=True):
        r = httpx.get(gw.url + path, headers={"host": rebound, "x-request-id": rid})
        assert r.status_code == 403, (path, r.text)
        err = _error(r)
        assert err["code"] == "host_not_allowed" and "server.allowed_hosts" in err["message"], err
    # a proxy request without Origin (a browser that sends none on a same-origin POST)
    headers = {"host": rebound, "content-type": "application/json", "x-request-id": "rebound-post"}
    r = httpx.post(gw.url + "/v1/chat/completions", content=REC_BODY, headers=headers)
    assert r.status_code == 403 and _error(r)["code"] == "host_not_allowed", r.text
    assert len(rec.requests) == n
    recs = _records_by_id(gw, [*ids, "rebound-post"])
    assert {(x["response_code"], x["response_flags"], x["error_type"]) for x in recs} == {
        (403, "UAEX", "host_not_allowed")
    }
    after = metric_value(gw.metrics(), "llmgw_input_limits_total", limit="host_not_allowed")
    assert after == before + len(REBOUND_READS) + 1
    for path in ("/healthz", "/readyz"):  # probes come by address or by a Service's name
        assert httpx.get(gw.url + path, headers={"host": rebound}).status_code == 200, path
    port = gw.port
    for host in (
        f"127.0.0.1:{port}",
        f"[::1]:{port}",
        f"localhost:{port}",
        f"app.localhost:{port}",
        "GW.test",
    ):
        assert httpx.get(gw.url + "/v1/models", headers={"host": host}).status_code == 200, host
        assert _chat(gw.url, None, headers={"host": host}).status_code == 200, host
    assert _raw(port, b"GET /v1/models HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")  # no Host: no browser


def test_a_post_without_content_type_is_415(hardened):
    """No Content-Type is what a browser's preflight-free POST sends; every SDK sends application/json."""
    _, gw, rec = hardened
    n = len(rec.requests)
    r = FRESH.post(gw.url + "/v1/chat/completions", content=REC_BODY, headers={"x-request-id": "no-ctype"})
    assert "content-type" not in r.request.headers
    assert r.status_code == 415 and _error(r)["code"] == "unsupported_media_type", r.text
    assert "has none" in _error(r)["message"]
    assert len(rec.requests) == n
    (logged,) = _records_by_id(gw, ["no-ctype"])
    assert (logged["response_code"], logged["response_flags"]) == (415, "BR")


def _head_with(port: int, name: str, values: tuple[str, ...], rid: str, body: bytes = REC_BODY) -> bytes:
    """A whole request whose head gives header ``name`` once per value (and what else it needs once)."""
    lines = [f"{name}: {v}" for v in values]
    needed = {
        "host": f"127.0.0.1:{port}",
        "content-type": "application/json",
        "content-length": str(len(body)),
    }
    lines += [f"{k}: {v}" for k, v in needed.items() if k != name.lower()]
    lines += [f"x-request-id: {rid}", "connection: close"]
    return ("POST /v1/chat/completions HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("Authorization", ("Bearer sk-first", "Bearer sk-second")),
        ("api-key", ("sk-first", "sk-second")),
        ("Host", ("127.0.0.1", "internal.example")),
        ("Content-Type", ("text/plain", "application/json")),  # last-one-wins read it as JSON
        ("Content-Type", ("application/json", "application/json")),
        ("Content-Encoding", ("gzip", "identity")),
        ("Origin", ("https://evil.example", "http://localhost")),
        # the gateway's own controls: two instructions, one of them perhaps a proxy's
        ("x-gateway-deployment", ("a", "b")),
        ("x-gateway-region", ("us-east", "eu-west")),
        ("x-gateway-hedge", ("off", "50")),
        ("x-gateway-timeout-ms", ("100", "60000")),
    ],
)
def test_a_security_relevant_header_given_twice_is_400(hardened, name, values):
    """The edge read headers last-one-wins, where a proxy in front may read the first: two Authorization
    or Host headers are how requests are smuggled past it. Each such header takes one value."""
    _, gw, rec = hardened
    n = len(rec.requests)
    before = metric_value(gw.metrics(), "llmgw_input_limits_total", limit="duplicate_header")
    rid = f"dup-{name}-{'-'.join(values)}"
    answer = _raw(gw.port, _head_with(gw.port, name, values, rid))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert (err["code"], err["param"]) == ("duplicate_header", name.lower())
    assert len(rec.requests) == n
    (logged,) = _records_by_id(gw, [rid])
    assert (logged["response_code"], logged["response_flags"], logged["error_type"]) == (
        400,
        "DPE",
        "duplicate_header",
    )
    assert metric_value(gw.metrics(), "llmgw_input_limits_total", limit="duplicate_header") == before + 1


def test_a_repeated_header_that_may_repeat_is_accepted_and_content_length_twice_is_refused(hardened):
    """Only single-value headers are refused when repeated: a client may well send two Accept headers. A
    second Content-Length never reaches the app: the HTTP parser refuses it (DPE invalid_http)."""
    _, gw, _ = hardened
    for name, values in (("Accept", ("application/json", "*/*")), ("x-trace-note", ("a", "b"))):
        answer = _raw(gw.port, _head_with(gw.port, name, values, f"repeat-{name}"))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    size = str(len(REC_BODY))
    answer = _raw(gw.port, _head_with(gw.port, "Content-Length", (size, size), "dup-cl"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and orjson.loads(body)["error"]["code"] == "invalid_http"


# ---------------------------------------------------------------- admin port and CORS


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    """Keys with protect_metrics, an admin port, and CORS for two origins."""
    sims = Sims({"sim-a": ("us-east", FAST)})
    admin_port = free_port()
    cfg = {
        "server": {
            "admin_port": admin_port,
            "cors_origins": ["https://app.example", "http://localhost:3000/"],
        },
        "auth": {
            "mode": "keys",
            "keys": [{"id": "ops", "hash": hash_key(KEYS["all"])}],
            "protect_metrics": True,
        },
        "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
    }
    gw = Gateway(cfg, tmp_path_factory.mktemp("ops"), name="ops")
    admin_url = f"http://127.0.0.1:{admin_port}"
    yield gw, admin_url
    assert gw.stop() == 0  # both listeners shut down cleanly
    sims.stop()
    with pytest.raises(httpx.ConnectError):  # the admin listener closed with the process
        FRESH.get(admin_url + "/healthz", timeout=1)


def test_admin_port_serves_ops_endpoints_and_main_port_does_not(ops):
    gw, admin_url = ops
    key = KEYS["all"]
    auth = {"authorization": f"Bearer {key}"}
    assert _chat(gw.url, key).status_code == 200
    for path in ("/metrics", "/healthz", "/readyz", "/admin/config", "/admin/deployments"):
        r = FRESH.get(gw.url + path, headers=auth)
        assert r.status_code == 404 and _error(r)["code"] == "unknown_url", path
    assert FRESH.get(admin_url + "/healthz").status_code == 200
    assert FRESH.get(admin_url + "/readyz").json()["pools_ready"] is True
    assert FRESH.get(admin_url + "/metrics").status_code == 401  # protect_metrics holds on the admin port
    text = FRESH.get(admin_url + "/metrics", headers=auth).text
    assert metric_value(text, "llmgw_requests_total", code="200") >= 1
    # protect_metrics: a page rebound to the port cannot pass the key check, so its Host is not checked
    assert FRESH.get(admin_url + "/metrics", headers={**auth, "host": "rebound.example"}).status_code == 200
    assert FRESH.get(admin_url + "/admin/deployments").status_code == 401
    assert (
        FRESH.get(admin_url + "/admin/deployments", headers=auth).json()["deployments"][0]["deployment"]
        == "a"
    )
    r = FRESH.post(admin_url + "/v1/chat/completions", headers=auth, json={"model": "chat", "messages": MSG})
    assert r.status_code == 404  # the proxy is not on the admin port
    assert FRESH.get(gw.url + "/openapi.json", headers=auth).status_code == 200  # API docs stay with the API
    assert FRESH.get(gw.url + "/openapi.json").status_code == 401  # ... behind a key when keys are on


def test_cors_for_listed_origins_only(ops):
    gw, _ = ops
    key = KEYS["all"]
    pre = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os, x-evil",
    }
    r = FRESH.options(gw.url + "/v1/chat/completions", headers={"origin": "https://app.example", **pre})
    assert r.status_code == 204  # preflights carry no key; they are answered before auth
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed and "x-evil" not in allowed
    assert "access-control-allow-credentials" not in r.headers
    r = FRESH.options(gw.url + "/v1/chat/completions", headers={"origin": "http://localhost:3000", **pre})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "http://localhost:3000"

    r = FRESH.options(gw.url + "/v1/chat/completions", headers={"origin": "https://evil.example", **pre})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert _error(r)["code"] == "origin_not_allowed"

    r = _chat(gw.url, key, headers={"origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    exposed = r.headers["access-control-expose-headers"]
    assert "x-request-id" in exposed and "x-should-retry" in exposed and "Origin" in r.headers["vary"]
    r = _chat(gw.url, None, headers={"origin": "https://app.example"})  # the page can read why it failed
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    with FRESH.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={"origin": "https://app.example", **{"authorization": f"Bearer {key}"}},
        json={"model": "chat", "stream": True, "messages": MSG},
    ) as st:
        assert st.headers["access-control-allow-origin"] == "https://app.example"
        assert b"".join(st.iter_bytes()).rstrip().endswith(b"[DONE]")
    # an unlisted origin spends nothing, even with a valid key (a page could hold one a user pasted in)
    r = _chat(gw.url, key, headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert _error(r)["code"] == "origin_not_allowed"
    r = _chat(gw.url, key, headers={"origin": gw.url})  # the gateway's own page (its API docs)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in _chat(gw.url, key).headers  # no Origin, no CORS


@pytest.mark.parametrize("auth", ["none", "keys"])
def test_the_admin_listeners_views_need_a_known_host_unless_a_key_guards_them(tmp_path, auth):
    """The admin port answers /metrics and /admin/* without a key (auth none, or keys without
    auth.protect_metrics): a page rebound to it read them. Its probes answer whatever the Host; with keys the
    main port's answers need a key, but for the model list, which names no deployment, key or traffic."""
    sims = Sims({"sim-a": ("us-east", FAST)})
    cfg: dict[str, Any] = {
        "server": {"admin_port": "auto"},
        "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
    }
    if auth == "keys":
        cfg["auth"] = {"mode": "keys", "keys": [{"id": "ops", "hash": hash_key(KEYS["all"])}]}
    gw = Gateway(cfg, tmp_path, name=f"admin-{auth}")
    try:
        rebound = {"host": "rebound.example", "authorization": f"Bearer {KEYS['all']}"}
        for path in ("/metrics", "/admin/config"):
            r = httpx.get(gw.admin_url + path, headers=rebound)
            assert r.status_code == 403 and _error(r)["code"] == "host_not_allowed", (path, r.text)
        for path in ("/healthz", "/readyz"):
            assert httpx.get(gw.admin_url + path, headers=rebound).status_code == 200, path
        assert httpx.get(gw.admin_url + "/metrics").status_code == 200  # at its address
        r = httpx.get(gw.url + "/v1/models", headers=rebound)
        assert r.status_code == (403 if auth == "none" else 200), r.text
        recs = gw.records(wait_for=2)
        assert [(x["path"], x["response_flags"], x["error_type"]) for x in recs][:2] == [
            ("/metrics", "UAEX", "host_not_allowed"),
            ("/admin/config", "UAEX", "host_not_allowed"),
        ]
        refused = metric_value(gw.metrics(), "llmgw_input_limits_total", limit="host_not_allowed")
        assert refused == (3 if auth == "none" else 2)
    finally:
        gw.stop()
        sims.stop()


@pytest.mark.parametrize("order", ["valid-first", "valid-last"])
def test_two_authorization_headers_are_400_whichever_holds_the_valid_key(ops, order):
    """Auth confusion: a proxy in front checking the first Authorization, the gateway the last one."""
    gw, _ = ops
    keys = (f"Bearer {KEYS['all']}", "Bearer sk-gw-someone-else")
    values = keys if order == "valid-first" else keys[::-1]
    answer = _raw(gw.port, _head_with(gw.port, "Authorization", values, f"two-keys-{order}", _CHAT_BODY))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert orjson.loads(body)["error"]["code"] == "duplicate_header"
    (logged,) = _records_by_id(gw, [f"two-keys-{order}"])
    assert (logged["response_code"], logged["response_flags"], logged["api_key_id"]) == (400, "DPE", None)


def test_credentials_in_a_base_url_are_refused_without_echoing_them(tmp_path: Path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "models:\n  - name: m\n    deployments:\n"
        f"      - {{id: d, base_url: 'https://user:{PROVIDER_KEY}@api.example/v1'}}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "models[0].deployments[0].base_url: credentials in the URL" in r.stderr
    assert PROVIDER_KEY not in r.stdout + r.stderr


def test_keys_cli_reports_an_unreachable_redis(tmp_path: Path):
    r = _keys("list", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert r.returncode == 1 and "Redis failed the command" in r.stderr and "Traceback" not in r.stderr


def test_a_key_can_be_revoked_on_a_full_redis(tmp_path: Path):
    """maxmemory with noeviction refuses writes but takes deletes: a leaked key must still be revocable (the
    revocation wrote an empty value with a 1 ms expiry, which a full Redis refused)."""
    from redis_servers import RedisProc

    server = RedisProc(tmp_path, "full", "--save", "", "--appendonly", "no")
    url = f"redis://{server.address}/0"
    try:
        made = _keys("create", "--redis-url", url, "--id", "leaked")
        assert made.returncode == 0, made.stderr
        admin = redis.Redis.from_url(url)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("probe", b"x")  # it is full indeed
        revoked = _keys("revoke", "--redis-url", url, "--id", "leaked")
        assert revoked.returncode == 0, revoked.stderr
        assert "leaked" not in _keys("list", "--redis-url", url).stdout
        assert admin.dbsize() == 0  # the key's record and its index entry are gone
    finally:
        server.kill()


def test_a_full_redis_still_authenticates_keys_and_limits_each_request_locally(tmp_path: Path):
    """A Redis at maxmemory (noeviction) refuses the limits script but still reads keys: a valid key not yet
    cached got 401 "Incorrect API key" for the second after each refusal, Redis being taken for gone."""
    from redis_servers import RedisProc

    server = RedisProc(tmp_path, "full-gw", "--save", "", "--appendonly", "no")
    url = f"redis://{server.address}/0"
    sims = Sims({"sim-a": ("us-east", FAST)})
    gw = None
    try:
        keys = []
        for i in range(3):
            made = _keys("create", "--redis-url", url, "--id", f"svc-{i}", "--rpm", "100")
            assert made.returncode == 0, made.stderr
            keys.append(made.stdout.strip())
        cfg = {
            "state": {"backend": "redis", "redis_url": url},
            "auth": {"mode": "keys"},
            "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
        }
        gw = Gateway(cfg, tmp_path, name="full-redis")
        admin = redis.Redis.from_url(url)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        for key in keys:  # one after the other: each new to the key cache, each after a refused script
            r = _chat(gw.url, key)
            assert r.status_code == 200, r.text
        recs = gw.records(wait_for=3)[-3:]
        assert [(r["response_code"], r["response_flags"]) for r in recs] == [(200, "RLL")] * 3
    finally:
        if gw is not None:
            gw.stop()
        sims.stop()
        server.kill()
