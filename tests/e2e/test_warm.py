"""Warm paths: pre-opened pools, keep-warm pings, schema warm-up before ready, learned schemas."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis
from harness import (
    HTTP,
    REDIS_URL,
    TURN_SCHEMA,
    dep,
    model,
    priority_model,
    required_warmup_config,
    wait_until,
)

QUICK = {"ttft_ms": 20, "ttft_dist": "fixed", "itl_ms": 1, "tokens": 2, "tail_p": 0}


def _structured(gw, schema=TURN_SCHEMA):
    t0 = time.monotonic()
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        timeout=30,
        json={
            "model": "chat",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": schema},
        },
    )
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def test_without_warmup_the_first_user_pays_the_cold_schema(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "cold_schema_ms": 2000})})
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))], warmup={"learn": False})]})
    assert _structured(gw) >= 2.0
    assert _structured(gw) < 0.5


def test_warmup_gates_readiness_and_the_first_user_request_is_warm(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "cold_schema_ms": 2000})})
    gw = gateways(required_warmup_config(sims.base_url("sim-a"), timeout_ms=10000), wait_ready=False)
    not_ready_seen = False
    t0 = time.monotonic()
    give_up = t0 + 15  # a hang guard, not a timing check
    while time.monotonic() < give_up:
        try:
            r = HTTP.get(gw.url + "/readyz", timeout=1)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        if r.status_code == 503:
            not_ready_seen = True
            assert r.json()["warmup_done"] is False
        elif r.status_code == 200:
            break
        time.sleep(0.05)
    waited_s = time.monotonic() - t0  # a lower bound: a busy machine only makes it longer
    assert not_ready_seen and waited_s >= 1.8  # ready only once the 2 s compile was paid
    st = sims.stats("sim-a")
    assert st["cold_schema_hits"] == 1
    assert _structured(gw) < 0.5


def _warmup_command(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "warmup", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_warmup_command_reports_and_fails_on_required(sims_factory, tmp_path):
    import yaml

    sims = sims_factory(
        {"sim-a": ("us-east", QUICK), "sim-bad": ("us-east", {**QUICK, "require_key": "right"})}
    )
    cfg = {
        "state": {"backend": "memory"},
        "models": [
            model(
                "chat",
                [dep("a", sims.base_url("sim-a"))],
                warmup={"schemas": [TURN_SCHEMA], "required": True},
            ),
            model(
                "other",
                [dep("bad", sims.base_url("sim-bad"))],
                warmup={"schemas": [TURN_SCHEMA], "required": False},
            ),
        ],
    }
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = _warmup_command(path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "chat" in out.stdout and "turn" in out.stdout and "FAILED" in out.stdout and "HTTP 401" in out.stdout
    )
    cfg["models"][1]["warmup"]["required"] = True
    path.write_text(yaml.safe_dump(cfg))
    out = _warmup_command(path)
    assert out.returncode == 1 and "REQUIRED" in out.stdout


def test_schema_learned_by_one_gateway_is_warmed_by_another(sims_factory, gateways, redis_prefix):
    sims = sims_factory(
        {
            "sim-a": ("us-east", {**QUICK, "cold_schema_ms": 1500}),
            "sim-c": ("eu-west", {**QUICK, "cold_schema_ms": 1500}),
        }
    )
    state = {"backend": "redis", "redis_url": REDIS_URL, "key_prefix": redis_prefix}
    gw1 = gateways({"state": state, "models": [model("chat", [dep("a", sims.base_url("sim-a"))])]})
    assert _structured(gw1) >= 1.5  # the first ever use of this schema is cold
    learned = redis.Redis.from_url(REDIS_URL)  # learned in the background: wait until it is shared
    wait_until("the schema learned in Redis", lambda: learned.hlen(f"{redis_prefix}schemas:chat") == 1, 15)
    # a new gateway for a new region: it warms what traffic taught the first one, before it is ready
    gw2 = gateways(
        {"state": state, "models": [model("chat", [dep("c", sims.base_url("sim-c"), region="eu-west")])]}
    )
    assert sims.stats("sim-c")["cold_schema_hits"] == 1
    assert _structured(gw2) < 0.5


def test_learned_schema_is_warmed_on_the_models_other_deployments(sims_factory, gateways):
    sims = sims_factory(
        {
            "sim-a": ("us-east", {**QUICK, "cold_schema_ms": 800}),
            "sim-b": ("us-east", {**QUICK, "cold_schema_ms": 800}),
        }
    )
    gw = gateways(
        {
            "models": [
                priority_model(
                    "chat",
                    [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                )
            ]
        }
    )
    _structured(gw)

    def warmed() -> bool:  # the background warm-up has been answered (its compile is done)
        return any(r["cold_schema"] and r["outcome"] == "ok" for r in sims.stats("sim-b")["recent"])

    wait_until("the background warm-up on b", warmed, 15)
    assert sims.stats("sim-b")["cold_schema_hits"] == 1
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers={"x-gateway-deployment": "b"},
        timeout=10,
        json={
            "model": "chat",
            "messages": [],
            "response_format": {"type": "json_schema", "json_schema": TURN_SCHEMA},
        },
    )
    assert r.status_code == 200 and float(r.headers["x-gateway-upstream-service-time"]) < 400


def test_pools_are_open_before_the_first_request_and_kept_warm(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "idle_close_s": 1.0})})
    gw = gateways(
        {
            "models": [
                model(
                    "chat",
                    [dep("a", sims.base_url("sim-a"))],
                    pool={"min_connections": 3, "keepwarm_interval_s": 0.4, "keepalive_expiry_s": 60},
                )
            ]
        }
    )

    def stats() -> dict:
        return sims.stats("sim-a")

    st = stats()
    assert st["connections_opened"] >= 3 and st["served"]["chat"] == 0
    r = HTTP.post(gw.url + "/v1/chat/completions", timeout=10, json={"model": "chat", "messages": []})
    assert r.status_code == 200
    rec = gw.records(wait_for=1)[-1]
    assert rec["upstream_connect_ms"] == 0 and rec["upstream_reused_connection"] is True

    def gateway_opened() -> int:  # the gateway's own count (each stats call of ours opens one on the sim)
        return HTTP.get(gw.url + "/admin/deployments").json()["deployments"][0]["connections_opened"]

    opened = gateway_opened()
    assert opened == 3
    time.sleep(2.5)  # longer than the simulator's idle close (1 s): keep-warm pings hold the pool open
    st = stats()
    assert st["idle_closed"] == 0 and gateway_opened() == opened
    assert st["served"]["models"] >= 3 + 3  # start-up validation + at least one keep-warm round


def test_bad_key_or_unreachable_deployment_is_reported_at_startup(sims_factory, gateways):
    sims = sims_factory(
        {"sim-a": ("us-east", QUICK), "sim-k": ("us-east", {**QUICK, "require_key": "right"})}
    )
    gw = gateways(
        {
            "models": [
                model("chat", [dep("a", sims.base_url("sim-a")), dep("wrong-key", sims.base_url("sim-k"))])
            ]
        }
    )
    r = HTTP.get(gw.url + "/readyz")
    detail = r.json()
    assert (
        r.status_code == 200 and "wrong-key" in detail["failed_deployments"]
    )  # reported, not a readiness gate
    assert "API key" in detail["failed_deployments"]["wrong-key"]
    assert "wrong-key" in gw.stderr()
