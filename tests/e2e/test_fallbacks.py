"""Fallback chains and deadline-aware degradation through the real server."""

from __future__ import annotations

import subprocess
import sys

import yaml
from harness import HTTP, dep, metric_value, model

QUICK = {"ttft_ms": 20, "ttft_dist": "fixed", "itl_ms": 1, "tokens": 3, "tail_p": 0}


def _cfg(sims, **a_extra):
    return {
        "models": [
            model(
                "big",
                [dep("big-1", sims.base_url("sim-big"), model="sim-large")],
                fallbacks=["small"],
                retry={"max_retries": 1, "backoff_base_ms": 1},
                **a_extra,
            ),
            model("small", [dep("small-1", sims.base_url("sim-small"), model="sim-small")]),
        ]
    }


def _post(gw, headers=None, stream=False):
    return HTTP.post(
        gw.url + "/v1/chat/completions",
        headers=headers or {},
        timeout=30,
        json={"model": "big", "stream": stream, "messages": [{"role": "user", "content": "x"}]},
    )


def test_all_deployments_failing_falls_back_to_the_next_model(sims_factory, gateways):
    sims = sims_factory(
        {
            "sim-big": ("us-east", {**QUICK, "error_rate": 1.0, "error_status": 503}),
            "sim-small": ("us-east", QUICK),
        }
    )
    gw = gateways(_cfg(sims, outlier={"consecutive_failures": 100}))
    r = _post(gw)
    assert r.status_code == 200
    data = r.json()
    assert data["model"] == "sim-small" and data["choices"][0]["message"]["content"].startswith("sim-small#")
    rec = gw.records(wait_for=1)[-1]
    assert (
        rec["fallback_from"] == "big"
        and rec["fallback_reason"] == "5xx"
        and rec["upstream_cluster"] == "small-1"
    )
    # The client got small's answer: no retry flag, no retry verdict. That big's retry ran out is the
    # fallback's reason and its retries metric (a URX here was left over from big, next to a null verdict).
    assert (rec["response_flags"], rec["retry_verdict"], rec["retry_count"]) == ("-", None, 1)
    text = gw.metrics()
    assert metric_value(text, "llmgw_fallbacks_total", **{"from": "big", "to": "small", "reason": "5xx"}) == 1
    assert metric_value(text, "llmgw_retries_total", model="big", reason="retry-limit") == 1
    assert metric_value(text, "llmgw_requests_total", code="200", flags="-") == 1
    assert metric_value(text, "llmgw_requests_total", flags="URX") == 0


def test_a_fallback_failing_too_is_flagged_once_for_its_own_retries(sims_factory, gateways):
    failing = {**QUICK, "error_rate": 1.0, "error_status": 503}
    sims = sims_factory({"sim-big": ("us-east", failing), "sim-small": ("us-east", failing)})
    cfg = _cfg(sims, outlier={"consecutive_failures": 100})
    cfg["models"][1]["retry"] = {"max_retries": 1, "backoff_base_ms": 1}
    gw = gateways(cfg)
    r = _post(gw)
    assert r.status_code == 503
    rec = gw.records(wait_for=1)[-1]
    # what the client got is small's last 503 after small's retry: one URX, with small's verdict
    assert (rec["response_flags"], rec["retry_verdict"], rec["upstream_cluster"]) == (
        "URX",
        "retry-limit",
        "small-1",
    )
    assert (rec["fallback_from"], rec["retry_count"], rec["attempts"]) == ("big", 2, 4)


def test_ejected_model_goes_to_the_fallback_at_once(sims_factory, gateways):
    sims = sims_factory(
        {
            "sim-big": ("us-east", {**QUICK, "error_rate": 1.0, "error_status": 503}),
            "sim-small": ("us-east", QUICK),
        }
    )
    gw = gateways(_cfg(sims, outlier={"consecutive_failures": 2, "max_ejection_percent": 100}))
    assert _post(gw).status_code == 200  # two failures eject big-1, the fallback answers
    touched = len(sims.stats("sim-big")["recent"])
    r = _post(gw)
    assert r.status_code == 200
    assert len(sims.stats("sim-big")["recent"]) == touched  # not touched again
    rec = gw.records(wait_for=2)[-1]
    # "at once": the only attempt was the fallback's, no time went to retries or backoff on big
    assert rec["fallback_reason"] == "unhealthy" and rec["upstream_cluster"] == "small-1"
    assert rec["attempts"] == 1 and rec["retry_count"] == 0 and rec["backoff_ms"] == 0


def test_deadline_aware_degradation(sims_factory, gateways):
    sims = sims_factory(
        {
            "sim-big": ("us-east", {**QUICK, "ttft_ms": 1000}),
            "sim-small": ("us-east", {**QUICK, "ttft_ms": 100}),
        }
    )
    gw = gateways(_cfg(sims, degrade={"when_expected_ttft_exceeds_remaining": True}))
    assert _post(gw, stream=True).status_code == 200  # teaches routing big's TTFT (~1 s)
    before = len(sims.stats("sim-big")["recent"])
    r = _post(gw, headers={"x-gateway-timeout-ms": "400"}, stream=True)
    assert r.status_code == 200 and "sim-small#" in r.text and '"error"' not in r.text
    assert len(sims.stats("sim-big")["recent"]) == before  # no attempt that could not finish in time
    rec = gw.records(wait_for=2)[-1]
    assert rec["fallback_from"] == "big" and rec["fallback_reason"] == "degrade"
    # answered within the 400 ms deadline: the gateway enforces it, and it did not fire
    assert rec["timeout_flag"] is None and rec["response_flags"] == "-" and rec["attempts"] == 1


def test_no_fallback_after_bytes_went_downstream(sims_factory, gateways):
    sims = sims_factory(
        {
            "sim-big": ("us-east", {**QUICK, "tokens": 6, "reset_rate": 1.0, "reset_after_tokens": 2}),
            "sim-small": ("us-east", QUICK),
        }
    )
    gw = gateways(_cfg(sims))
    r = _post(gw, stream=True)
    assert "sim-big#" in r.text and "sim-small#" not in r.text and '"error"' in r.text
    assert gw.records(wait_for=1)[-1]["fallback_from"] is None


def test_fallback_loop_rejected_by_check_config(tmp_path):
    cfg = {
        "models": [
            model("a", [dep("a1", "http://127.0.0.1:1/v1")], fallbacks=["b"]),
            model("b", [dep("b1", "http://127.0.0.1:1/v1")], fallbacks=["a"]),
        ]
    }
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "fallbacks: loop a -> b -> a" in out.stderr
