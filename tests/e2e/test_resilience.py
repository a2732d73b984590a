"""Deadlines, timeouts, retries with a budget, Retry-After, outlier ejection, overload: real processes."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import redis
from harness import (
    REDIS_URL,
    Gateway,
    LogFrom,
    Sims,
    dep,
    metric_value,
    model,
    plain_gateway,
    post_chat,
    priority_model,
    shared_state,
    wait_until,
)

QUICK = {"ttft_ms": 20, "ttft_dist": "fixed", "itl_ms": 5, "tokens": 4, "tail_p": 0}


@pytest.fixture(scope="module")
def shared_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sims, Gateway]]:
    yield from plain_gateway(tmp_path_factory.mktemp("plain"), QUICK)


@pytest.fixture
def plain(shared_plain: tuple[Sims, Gateway]) -> tuple[Sims, LogFrom]:
    """One gateway with the default settings and its simulator for the module's tests of a single request
    each (a start costs seconds; none of them fails the deployment often enough to eject it): the simulator's
    knobs (QUICK) and counters as new, the access log from the test's first request on."""
    sims, gw = shared_plain
    sims.renew("sim-a", **QUICK)
    return sims, LogFrom(gw)


def test_thirty_percent_503s_all_client_requests_succeed(sims_factory, gateways):
    sims = sims_factory(
        {
            "sim-a": ("us-east", {**QUICK, "error_rate": 0.3}),
            "sim-b": ("us-east", {**QUICK, "error_rate": 0.3}),
        }
    )
    # Defaults only, fresh process: a 30 % error rate is a transient failure, retried free of the budget.
    gw = gateways(
        {
            "models": [
                model(
                    "chat",
                    [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                    outlier={"consecutive_failures": 50},
                )
            ]
        }
    )
    n = 40
    codes = [post_chat(gw).status_code for _ in range(n)]
    recs = gw.records(wait_for=n)
    assert codes == [200] * n, [
        (r["response_code"], r["response_flags"], r["retry_count"]) for r in recs if r["response_code"] != 200
    ]
    retries = sum(r["retry_count"] for r in recs)
    injected = sum(sum(sims.stats(s)["errors_injected"].values()) for s in ("sim-a", "sim-b"))
    assert retries == injected > 0
    assert all(r["attempts"] == r["retry_count"] + 1 for r in recs)


def test_connect_timeout_is_a_connect_failure_after_connect_ms(gateways):
    # A listener whose accept queue is full drops new SYNs, so connecting to it hangs until connect_ms.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    try:
        gw = gateways(
            {
                "models": [
                    model(
                        "chat",
                        [
                            dep(
                                "hung",
                                f"http://127.0.0.1:{port}/v1",
                                pool={
                                    "min_connections": 0,
                                    "validate_on_start": False,
                                    "keepwarm_interval_s": 0,
                                },
                                timeouts={"connect_ms": 200},
                            )
                        ],
                        retry={"max_retries": 0},
                    )
                ]
            }
        )
        t0 = time.monotonic()
        r = post_chat(gw)
        elapsed = time.monotonic() - t0
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
        assert 0.18 < elapsed < 1.5, elapsed
        rec = gw.records(wait_for=1)[-1]
        assert "UF" in rec["response_flags"] and rec["timeout_flag"] == "connect"
        assert rec["upstream_cluster"] == "hung"
    finally:
        for c in fillers:
            c.close()
        listener.close()


def test_retry_after_is_honoured(sims_factory, gateways):
    sims = sims_factory(
        {"sim-a": ("us-east", {**QUICK, "error_rate": 1.0, "error_status": 429, "retry_after": "1"})}
    )
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))], retry={"max_retries": 2})]})
    threading.Timer(0.3, lambda: sims.set("sim-a", error_rate=0.0)).start()
    t0 = time.monotonic()
    r = post_chat(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    recent = [x for x in sims.stats("sim-a")["recent"] if x["path"] == "/v1/chat/completions"]
    assert len(recent) == 2
    gap = recent[1]["started_at"] - recent[0]["started_at"]
    assert 0.95 <= gap <= 1.3 and elapsed >= 0.95
    assert gw.records(wait_for=1)[-1]["backoff_ms"] >= 950


def test_retry_after_beyond_the_deadline_answers_429_at_once(sims_factory, gateways):
    sims = sims_factory(
        {"sim-a": ("us-east", {**QUICK, "error_rate": 1.0, "error_status": 429, "retry_after": "30"})}
    )
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))], retry={"max_retries": 2})]})
    r = post_chat(gw, headers={"x-gateway-timeout-ms": "2000"})
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    assert r.json()["error"]
    assert len(sims.stats("sim-a")["recent"]) == 1
    # answered at once: no wait for the Retry-After, nor for the 2 s deadline, as the gateway logged it
    rec = gw.records(wait_for=1)[-1]
    assert rec["attempts"] == 1 and rec["backoff_ms"] == 0.0 and rec["duration_ms"] < 2000


def test_stalled_upstream_times_out_on_time_and_retry_elsewhere_succeeds(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "stall_rate": 1.0}), "sim-b": ("us-east", QUICK)})
    gw = gateways(
        {
            "models": [
                priority_model(
                    "chat",
                    [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                    timeouts={"ttft_ms": 300},
                    retry={"backoff_base_ms": 1, "backoff_max_ms": 1},
                )
            ]
        }
    )
    t0 = time.monotonic()
    r = post_chat(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["x-gateway-upstream"] == "b"
    assert 0.3 <= elapsed < 0.5
    rec = gw.records(wait_for=1)[-1]
    assert rec["retry_count"] == 1 and rec["attempts"] == 2 and rec["upstream_cluster"] == "b"
    st = sims.stats("sim-a")
    assert st["cancelled"]["before_first_byte"] == 1  # the timed-out attempt was aborted, not left running
    assert metric_value(gw.metrics(), "llmgw_upstream_attempts_total", deployment="a", outcome="timeout") == 1


def test_budget_holds_upstream_requests_when_everything_fails(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "error_rate": 1.0, "error_status": 503})})
    gw = gateways(
        {
            "models": [
                model(
                    "chat",
                    [dep("a", sims.base_url("sim-a"))],
                    retry={
                        "max_retries": 3,
                        "budget_percent": 20,
                        "min_retry_concurrency": 3,
                        "backoff_base_ms": 1,
                        "backoff_max_ms": 2,
                    },
                    outlier={"consecutive_failures": 1000},
                )
            ]
        }
    )
    n = 50
    codes = [post_chat(gw).status_code for _ in range(n)]
    assert set(codes) == {503}
    upstream = len([x for x in sims.stats("sim-a")["recent"] if x["path"] == "/v1/chat/completions"])
    # Without the budget it would be n * 4 = 200. With it: the first failures are retried free until the
    # deployment has shown it fails (rate >= 50 %: 6 failures), then 20 % of requests plus the floor's
    # 10 s reservoir (min_retries_per_s: 1), until it is hopeless and gets none.
    assert upstream <= n * 1.2 + 10 + 6
    text = gw.metrics()
    assert metric_value(text, "llmgw_retry_budget_exhausted_total", model="chat") > 0
    recs = gw.records(wait_for=n)
    assert sum("URX" in r["response_flags"] for r in recs) == n


def test_total_deadline_holds_within_a_few_ms(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "stall_rate": 1.0})})
    gw = gateways(
        {"models": [model("chat", [dep("a", sims.base_url("sim-a"))], timeouts={"ttft_ms": 10000})]}
    )
    for limit_ms in (300, 600):
        t0 = time.monotonic()
        r = post_chat(gw, headers={"x-gateway-timeout-ms": str(limit_ms)})
        elapsed_ms = (time.monotonic() - t0) * 1000
        assert r.status_code == 504
        err = r.json()["error"]
        assert err["code"] == "timeout" and "x-gateway-timeout-ms" in err["message"]
        assert limit_ms - 5 <= elapsed_ms <= limit_ms + 60
    rec = gw.records(wait_for=2)[-1]
    assert "DT" in rec["response_flags"] and rec["timeout_flag"] == "total"


def test_sdk_timeout_header_is_the_clients_deadline(plain):
    sims, gw = plain
    sims.set("sim-a", stall_rate=1.0)
    r = post_chat(gw, headers={"x-stainless-timeout": "0.4"})
    # answered sdk_reply_margin_ms (100) before the SDK's own timer, so the SDK reads it; as the gateway
    # logged it (a busy test machine may deliver the answer later, the gateway answered in time)
    assert r.status_code == 504
    assert 290 <= gw.records(wait_for=1)[-1]["duration_ms"] < 400
    assert r.headers["x-should-retry"] == "false"
    msg = r.json()["error"]["message"]
    assert "x-stainless-timeout, answered 100 ms early" in msg and "(cut by the deadline)" in msg


def test_mid_stream_failure_ends_with_an_error_event(plain):
    sims, gw = plain
    sims.set("sim-a", tokens=10, reset_rate=1.0, reset_after_tokens=3)
    r = post_chat(gw, stream=True)
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert sum('"content":"sim-a#' in e for e in events) == 3
    assert '"error"' in events[-1] and "upstream_reset" in events[-1]
    rec = gw.records(wait_for=1)[-1]
    assert "UC" in rec["response_flags"] and rec["retry_count"] == 0  # never retried after bytes went out


def test_idle_timeout_between_chunks(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "tokens": 5, "itl_ms": 800})})
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))], timeouts={"idle_ms": 250})]})
    r = post_chat(gw, stream=True)
    assert '"code":"timeout"' in r.text.split("\n\n")[-2] or '"code": "timeout"' in r.text
    rec = gw.records(wait_for=1)[-1]
    assert rec["timeout_flag"] == "idle" and "UT" in rec["response_flags"]
    assert rec["duration_ms"] < 800  # cut before the next chunk (800 ms apart) would have come


def test_overflow_answers_503_at_once(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "ttft_ms": 800})})
    gw = gateways(
        {"server": {"max_inflight": 2}, "models": [model("chat", [dep("a", sims.base_url("sim-a"))])]}
    )
    with cf.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(post_chat, gw) for _ in range(2)]
        time.sleep(0.3)
        r = post_chat(gw)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        assert [f.result().status_code for f in slow] == [200, 200]
    refused = [rec for rec in gw.records(wait_for=3) if rec["response_flags"] == "UO"]
    # at once: no upstream attempt, and no wait for a slot (the others held theirs for 800 ms)
    assert len(refused) == 1 and refused[0]["attempts"] == 0 and refused[0]["duration_ms"] < 800


def test_ejection_is_shared_through_redis_and_readmitted(sims_factory, gateways, redis_prefix):
    sims = sims_factory(
        {"sim-a": ("us-east", {**QUICK, "error_rate": 1.0, "error_status": 503}), "sim-b": ("us-east", QUICK)}
    )
    cfg = {
        "state": shared_state(redis_prefix),
        "models": [
            priority_model(
                "chat",
                [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                outlier={"consecutive_failures": 3, "base_ejection_s": 2, "max_ejection_percent": 50},
                retry={"backoff_base_ms": 1, "budget_percent": 100},
            )
        ],
    }
    gw1 = gateways(cfg)
    gw2 = gateways(cfg)
    for _ in range(3):
        assert post_chat(gw1).status_code == 200  # a fails, the retry on b answers
    assert metric_value(gw1.metrics(), "llmgw_ejections_total", deployment="a") == 1
    wait_until("gw2 to learn of the ejection (a sync round or two)", lambda: _ejected(gw2, "a") == 1)
    before = len(sims.stats("sim-a")["recent"])
    for _ in range(5):
        r = post_chat(gw2)
        assert r.status_code == 200 and r.headers["x-gateway-upstream"] == "b"
    assert len(sims.stats("sim-a")["recent"]) == before  # gw2 never touched the ejected deployment
    sims.set("sim-a", error_rate=0.0)
    wait_until("the ejection (2 s) to end", lambda: _ejected(gw2, "a") == 0)
    r = post_chat(gw2)
    assert r.status_code == 200 and r.headers["x-gateway-upstream"] == "a"


def test_a_replica_that_stopped_leaves_no_fields_in_redis(sims_factory, gateways, redis_prefix):
    """Every replica writes its view into one hash per deployment, which lives on while any replica
    writes it: the fields of a replica gone (restarted, scaled in) are deleted by the others, so the
    hash every replica reads every round does not grow with each restart."""
    sims = sims_factory({"sim-a": ("us-east", QUICK)})
    cfg = {
        "state": shared_state(redis_prefix, key_ttl_s=30),
        "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
    }
    key = f"{redis_prefix}stats:a"
    r = redis.Redis.from_url(REDIS_URL)
    try:
        gone = {f"gone-{i}": orjson.dumps([300.0, 5, 0.0, 0, time.time() - 31 - i]) for i in range(50)}
        gone |= {f"gone-{i}#age": orjson.dumps([0.0, None]) for i in range(50)}
        live = {"live": orjson.dumps([300.0, 5, 0.0, 0, time.time() + 3600])}  # written an hour ahead: kept
        r.hset(key, mapping={**gone, **live})
        gw = gateways(cfg)
        assert post_chat(gw).status_code == 200
        wait_until(
            "the stopped replicas' fields to be deleted",
            lambda: not any(f.startswith(b"gone-") for f in r.hkeys(key)),
        )
        fields = set(r.hkeys(key))
        assert b"live" in fields and len(fields) == 3, fields  # and the gateway's own two
    finally:
        r.delete(key)
        r.close()


def _ejected(gw: Gateway, deployment: str) -> float:
    return metric_value(gw.metrics(), "llmgw_deployment_ejected", deployment=deployment)


@pytest.mark.parametrize("stream", [False, True])
def test_four_hundreds_are_not_retried(plain, stream):
    sims, gw = plain
    sims.set("sim-a", error_rate=1.0, error_status=422)
    r = post_chat(gw, stream=stream)
    assert r.status_code == 422
    assert len(sims.stats("sim-a")["recent"]) == 1


def test_deadline_during_a_stream_ends_it_with_an_error_event_on_time(plain):
    sims, gw = plain
    sims.set("sim-a", tokens=40, itl_ms=50)  # ~2 s of tokens
    t0 = time.monotonic()
    r = post_chat(gw, stream=True, headers={"x-gateway-timeout-ms": "600"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and 0.59 <= elapsed < 0.75
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert 5 <= sum('"content":"sim-a#' in e for e in events) < 40
    assert '"code":"timeout"' in events[-1] and "deadline" in events[-1]
    rec = gw.records(wait_for=1)[-1]
    assert "DT" in rec["response_flags"] and rec["timeout_flag"] == "total"
    wait_until("the provider to stop generating", lambda: sims.stats("sim-a")["cancelled"]["mid_stream"])
    assert sims.stats("sim-a")["cancelled"]["mid_stream"] == 1
