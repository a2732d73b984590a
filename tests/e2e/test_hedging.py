"""Hedging through the real server: first usable token wins, the loser is cancelled, within a budget."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from harness import HTTP, dep, metric_value, model

TAILED = {"ttft_ms": 80, "ttft_dist": "fixed", "itl_ms": 5, "tokens": 6, "tail_p": 0.15, "tail_ms": 2000}
TOKEN = re.compile(r"(sim-[ab])#(\d+):(\d+) ")
# A hedge's win cancels the loser at once; a busy machine delays that by tens of milliseconds, while a loser
# left to run would end at its 2 s tail, over 1.5 s after the win.
CANCEL_SLACK_S = 0.5


def _gw(sims_factory, gateways, hedging, b_tail_p=0.0):
    # Primary attempts go to a (priority 0) whose TTFT has a 2 s tail; hedges go to b.
    sims = sims_factory({"sim-a": ("us-east", TAILED), "sim-b": ("eu-west", {**TAILED, "tail_p": b_tail_p})})
    gw = gateways(
        {
            "server": {"region": "us-east"},
            "models": [
                model(
                    "chat",
                    [
                        dep("a", sims.base_url("sim-a"), region="us-east", priority=0),
                        dep("b", sims.base_url("sim-b"), region="eu-west", priority=1),
                    ],
                    routing={"strategy": "priority", "locality": "off"},
                    hedging=hedging,
                )
            ],
        }
    )
    return sims, gw


def test_hedged_streams_carry_one_attempts_content_and_losers_are_cancelled(sims_factory, gateways):
    sims, gw = _gw(sims_factory, gateways, {"enabled": True, "delay_ms": 300, "budget_percent": 100})
    client = gw.client()
    n = 40
    for i in range(n):
        text = ""
        for chunk in client.chat.completions.create(
            model="chat",
            stream=True,
            extra_headers={"x-request-id": f"h{i}"},
            messages=[{"role": "user", "content": "x"}],
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        producers = {(m.group(1), m.group(2)) for m in TOKEN.finditer(text)}
        assert len(producers) == 1, text  # exactly one attempt's tokens reached the client
        assert [int(m.group(3)) for m in TOKEN.finditer(text)] == list(range(6))
    recs = {r["request_id"]: r for r in gw.records(wait_for=n)}
    hedged = [r for r in recs.values() if r["hedge_count"] == 1]
    assert hedged, "with a 15% tail some requests must have been hedged"
    assert all(r["ttft_ms"] < 1000 for r in recs.values())  # no client waited for the 2 s tail
    seen = sims.stats("sim-a")["recent"] + sims.stats("sim-b")["recent"]
    by_id: dict[str, list[dict]] = {}
    for s in seen:
        by_id.setdefault(s["request_id"], []).append(s)
    for r in hedged:
        attempts = by_id[r["request_id"]]
        assert len(attempts) == 2
        winner = [a for a in attempts if a["outcome"] == "ok"]
        loser = [a for a in attempts if a["outcome"] == "cancelled"]
        assert len(winner) == 1 and len(loser) == 1, attempts
        # the loser is the primary waiting in its 2 s tail: cut off there, at the win, not left to run
        assert loser[0]["first_byte_at"] is None
        assert loser[0]["ended_at"] - winner[0]["first_byte_at"] < CANCEL_SLACK_S
        assert r["hedge_winner"] in ("primary", "hedge") and r["hedge_delay_ms"] == 300
    text = gw.metrics()
    assert metric_value(text, "llmgw_hedges_total", model="chat", outcome="won") >= 1
    assert metric_value(text, "llmgw_hedges_total", model="chat", outcome="cancelled") == len(hedged)


def test_hedged_non_stream_request_returns_exactly_one_body(sims_factory, gateways):
    sims, gw = _gw(sims_factory, gateways, {"enabled": True, "delay_ms": 150, "budget_percent": 100})
    sims.set("sim-a", tail_p=1.0)
    sims.set("sim-b", tail_p=1.0)
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers={"x-gateway-deployment": "a"},
        timeout=10,
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
    )
    # pinned requests are not hedged elsewhere; an unpinned one is
    assert r.status_code == 200
    sims.set("sim-b", tail_p=0.0)
    body = HTTP.post(
        gw.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
    )
    data = body.json()
    assert len(data["choices"]) == 1
    assert len({m.group(1) for m in TOKEN.finditer(data["choices"][0]["message"]["content"])}) == 1
    rec = gw.records(wait_for=2)[-1]
    assert rec["attempts"] <= 2 and rec["duration_ms"] < 1500


def test_budget_suppresses_hedges(sims_factory, gateways):
    sims, gw = _gw(sims_factory, gateways, {"enabled": True, "delay_ms": 100, "budget_percent": 0})
    sims.set("sim-a", tail_p=1.0, tail_ms=300)
    sims.set("sim-b", tail_p=1.0, tail_ms=300)
    for _ in range(5):
        r = HTTP.post(gw.url + "/v1/chat/completions", timeout=10, json={"model": "chat", "messages": []})
        assert r.status_code == 200
    recs = gw.records(wait_for=5)
    # the bucket starts with one token: at most one hedge, the rest suppressed and flagged
    assert sum(r["hedge_count"] for r in recs) <= 1
    assert sum("HS" in r["response_flags"] for r in recs) >= 4
    assert metric_value(gw.metrics(), "llmgw_hedges_total", model="chat", outcome="suppressed") >= 4


def test_hedge_header_off_and_override(sims_factory, gateways):
    sims, gw = _gw(sims_factory, gateways, {"enabled": False})
    sims.set("sim-a", tail_p=1.0, tail_ms=400)
    sims.set("sim-b", tail_p=1.0, tail_ms=400)
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers={"x-gateway-hedge": "100"},
        timeout=10,
        json={"model": "chat", "messages": []},
    )
    assert r.status_code == 200
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers={"x-gateway-hedge": "off"},
        timeout=10,
        json={"model": "chat", "messages": []},
    )
    assert r.status_code == 200
    recs = gw.records(wait_for=2)
    assert recs[0]["hedge_count"] == 1 and recs[0]["hedge_delay_ms"] == 100
    assert recs[1]["hedge_count"] == 0
    attempts_before = metric_value(gw.metrics(), "llmgw_upstream_attempts_total")
    bad = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers={"x-gateway-hedge": "soon"},
        timeout=10,
        json={"model": "chat", "messages": []},
    )
    assert bad.status_code == 400 and "x-gateway-hedge" in bad.json()["error"]["message"]
    # the client's mistake is answered before routing: no attempt, nothing against a deployment
    refused = gw.records(wait_for=3)[2]
    assert (refused["response_code"], refused["response_flags"]) == (400, "BR")
    assert refused["attempts"] == 0 and refused["upstream_cluster"] is None
    assert metric_value(gw.metrics(), "llmgw_upstream_attempts_total") == attempts_before


def _by_request(sims, name: str) -> dict[str, dict]:
    return {s["request_id"]: s for s in sims.stats(name)["recent"]}


def test_a_winning_hedge_interrupts_the_waiting_primary(sims_factory, gateways):
    # The primary runs inline in the request's task; a hedge that wins must cut it short, stream or not.
    sims, gw = _gw(sims_factory, gateways, {"enabled": True, "delay_ms": 100, "budget_percent": 100})
    sims.set("sim-a", tail_p=1.0, tail_ms=3000)
    client = gw.client()
    r = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}], extra_headers={"x-request-id": "json"}
    )
    assert {m.group(1) for m in TOKEN.finditer(r.choices[0].message.content)} == {"sim-b"}
    chunks = list(
        client.chat.completions.create(
            model="chat",
            stream=True,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-request-id": "stream"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {m.group(1) for m in TOKEN.finditer(text)} == {"sim-b"}
    recs = {r["request_id"]: r for r in gw.records(wait_for=2)}
    for rid in ("json", "stream"):
        rec = recs[rid]
        assert rec["response_code"] == 200 and rec["hedge_winner"] == "hedge" and rec["hedge_loser"] == "a"
        assert rec["duration_ms"] < 1500  # nobody waited for the 3 s primary
    seen_a = _by_request(sims, "sim-a")
    assert seen_a["json"]["outcome"] == "cancelled" and seen_a["stream"]["outcome"] == "cancelled"
    assert sims.stats("sim-a")["in_flight"] == 0
    text = gw.metrics()
    assert metric_value(text, "llmgw_hedges_total", model="chat", outcome="won") == 2
    assert (
        metric_value(text, "llmgw_upstream_attempts_total", model="chat", deployment="a", outcome="cancelled")
        == 2
    )


def test_a_hedge_failing_while_the_primary_waits_counts_as_the_retry(sims_factory, gateways):
    sims, gw = _gw(sims_factory, gateways, {"enabled": True, "delay_ms": 100, "budget_percent": 100})
    sims.set("sim-a", tail_p=1.0, tail_ms=500)
    sims.set("sim-b", error_rate=1.0, error_status=503)
    r = HTTP.post(gw.url + "/v1/chat/completions", timeout=10, json={"model": "chat", "messages": []})
    assert r.status_code == 200 and r.headers["x-gateway-upstream"] == "a"
    rec = gw.records(wait_for=1)[-1]
    assert rec["attempts"] == 2 and rec["hedge_count"] == 1 and rec["retry_count"] == 1
    assert rec["hedge_winner"] == "primary" and rec["hedge_loser"] is None
    assert (
        metric_value(
            gw.metrics(), "llmgw_upstream_attempts_total", model="chat", deployment="b", outcome="503"
        )
        == 1
    )


def test_client_leaving_during_a_hedge_cancels_both_attempts(sims_factory, gateways):
    sims, gw = _gw(sims_factory, gateways, {"enabled": True, "delay_ms": 100, "budget_percent": 100})
    sims.set("sim-a", tail_p=1.0, tail_ms=3000)
    sims.set("sim-b", tail_p=1.0, tail_ms=3000)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.url + "/v1/chat/completions",
            timeout=0.6,
            headers={"x-request-id": "gone"},
            json={"model": "chat", "stream": True, "messages": []},
        )
    rec = gw.records(wait_for=1)[-1]
    assert rec["response_code"] == 499 and "DC" in rec["response_flags"] and rec["hedge_count"] == 1
    end = time.monotonic() + 2
    while time.monotonic() < end and (sims.stats("sim-a")["in_flight"] or sims.stats("sim-b")["in_flight"]):
        time.sleep(0.02)
    assert _by_request(sims, "sim-a")["gone"]["outcome"] == "cancelled"
    assert _by_request(sims, "sim-b")["gone"]["outcome"] == "cancelled"
