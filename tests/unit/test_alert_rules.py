"""The chart's PrometheusRule through Prometheus' own rule engine: `promtool check rules` and `promtool test
rules`, every alert seen firing and then resolving on synthetic series.

The rules are the chart's, rendered by the real helm; promtool compares alerts' annotations verbatim,
so the tested copy drops them (their templates are checked by `promtool check rules` on the full copy).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_cli import manifests, template, tool

NS, JOB = "llm", "gw-llm-gateway"
SEL = {"namespace": NS, "job": JOB}


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in {**SEL, **labels}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


# The request, TTFT and duration series the burn-rate rules read, all of model "chat" on pod gw-a.
def _requests(values: str, code: str, flags: str) -> dict[str, str]:
    return _series(
        "llmgw_requests_total",
        values,
        model="chat",
        code=code,
        deployment="a",
        region="r",
        flags=flags,
        pod="gw-a",
    )


def _ttft_fast(values: str, stream: str = "true") -> dict[str, str]:
    """Requests whose first token came within the objective's 2 s."""
    return _series(
        "llmgw_ttft_seconds_bucket", values, model="chat", deployment="a", stream=stream, le="2.0", pod="gw-a"
    )


def _ttft_count(values: str, stream: str = "true") -> dict[str, str]:
    return _series(
        "llmgw_ttft_seconds_count", values, model="chat", deployment="a", stream=stream, pod="gw-a"
    )


def _duration_fast(values: str) -> dict[str, str]:
    """Requests done within the objective's 30 s."""
    return _series(
        "llmgw_request_duration_seconds_bucket", values, model="chat", stream="false", le="30.0", pod="gw-a"
    )


def _duration_count(values: str) -> dict[str, str]:
    return _series("llmgw_request_duration_seconds_count", values, model="chat", stream="false", pod="gw-a")


def _alert(name: str, at: str, *firing: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in firing]}


def _case(
    alert: str,
    series: list[dict[str, str]],
    fire_at: str,
    labels: dict[str, str],
    quiet_at: str,
    interval: str = "1m",
) -> dict[str, Any]:
    """`series` make `alert` fire with `labels` at `fire_at` (after its `for`), resolved again at `quiet_at`."""
    return {
        "interval": interval,
        "input_series": series,
        "alert_rule_test": [_alert(alert, fire_at, labels), _alert(alert, quiet_at)],
    }


def _burn_case(
    alert: str,
    slo: str,
    severity: str,
    series: list[dict[str, str]],
    fire_at: str,
    quiet_at: str,
    interval: str = "1m",
) -> dict[str, Any]:
    labels = {**SEL, "model": "chat", "severity": severity, "slo": slo}
    return _case(alert, series, fire_at, labels, quiet_at, interval)


# Each case: series that make one alert fire, then stop. A list: an alert may have several cases (a dict
# keyed by the alert's name kept only the last of them).
CASES: list[dict[str, Any]] = [
    _case(
        "LLMGatewayTargetDown",
        [
            _series("up", "1 1 0x10 1x10", instance="10.0.0.1:9090", pod="gw-a"),
            _series("up", "1x22", instance="10.0.0.2:9090", pod="gw-b"),
        ],
        "9m",
        {**SEL, "instance": "10.0.0.1:9090", "pod": "gw-a", "severity": "warning"},
        "18m",
    ),
    # absent() has no series to take labels from: the rule names the release itself
    _case(
        "LLMGatewayAbsent",
        [_series("up", "1x3 0x10 1x10", instance="10.0.0.1:9090", pod="gw-a")],
        "11m",
        {"severity": "critical", **SEL},
        "16m",
    ),
    _case(
        "LLMGatewayNoHealthyUpstream",
        [
            _series("llmgw_model_healthy_deployments", "2 0x6 2x6", model="chat", pod="gw-a"),
            _series("llmgw_model_healthy_deployments", "2x13", model="chat", pod="gw-b"),
            _series("llmgw_model_healthy_deployments", "1x13", model="embed", pod="gw-a"),
        ],
        "4m",
        {"model": "chat", "severity": "critical"},
        "9m",
    ),
    _case(
        "LLMGatewayDeploymentEjected",
        [
            _series("llmgw_deployment_ejected", "0 1x7 0x5", model="chat", deployment="a", pod="gw-a"),
            _series("llmgw_deployment_ejected", "0x13", model="chat", deployment="b", pod="gw-a"),
        ],
        "7m",
        {"model": "chat", "deployment": "a", "severity": "warning"},
        "10m",
    ),
    _case(
        "LLMGatewayRetryBudgetExhausted",
        [_series("llmgw_retry_budget_exhausted_total", "0x3 0+5x10 50x15", model="chat", pod="gw-a")],
        "12m",
        {"model": "chat", "severity": "warning"},
        "25m",
    ),
    _case(
        "LLMGatewayHedgeBudgetExhausted",
        [
            _series("llmgw_hedges_total", "0x2 0+3x25 75x20", model="chat", outcome="suppressed", pod="gw-a"),
            _series("llmgw_hedges_total", "0+9x47", model="chat", outcome="won", pod="gw-a"),
        ],
        "22m",
        {"model": "chat", "severity": "info"},
        "40m",
    ),
    _case(
        "LLMGatewayWarmupFailed",
        [
            _series(
                "llmgw_warmup_total",
                "0x2 1x50",
                model="chat",
                deployment="a",
                result="failed",
                pod="gw-a",
            ),
            _series("llmgw_warmup_total", "0x2 4x50", model="chat", deployment="b", result="ok", pod="gw-a"),
        ],
        "5m",
        {"model": "chat", "deployment": "a", "severity": "warning"},
        "40m",
    ),
    _case(  # a new pod, first scraped once ready, its warm-up already failed: the series starts at 1
        "LLMGatewayWarmupFailed",
        [
            _series(
                "llmgw_warmup_total",
                "_x2 1x50",
                model="chat",
                deployment="a",
                result="failed",
                pod="gw-new",
            ),
            _series(
                "llmgw_warmup_total", "_x2 4x50", model="chat", deployment="b", result="ok", pod="gw-new"
            ),
        ],
        "5m",
        {"model": "chat", "deployment": "a", "severity": "warning"},
        "40m",
    ),
    _case(
        "LLMGatewayStateBackendDown",
        [
            _series("llmgw_state_backend_up", "1 0x5 1x5", backend="redis", pod="gw-a"),
            # a pod on the in-memory backend never pages, whatever it reports
            _series("llmgw_state_backend_up", "0x11", backend="memory", pod="gw-m"),
        ],
        "4m",
        {"pod": "gw-a", "severity": "warning"},
        "10m",
    ),
    _case(
        "LLMGatewayAccessLogDropped",
        [_series("llmgw_accesslog_dropped_total", "0x2 0+10x15 160x20", pod="gw-a")],
        "14m",
        {"pod": "gw-a", "severity": "info"},
        "35m",
    ),
    _case(
        "LLMGatewayOverheadP99High",
        [
            # slow (every request between 1 and 10 ms) for 15 minutes, then fast (under 1 ms)
            _series(
                "llmgw_gateway_overhead_seconds_bucket",
                "0x15 0+100x15",
                model="chat",
                le="0.001",
                pod="gw-a",
            ),
            _series("llmgw_gateway_overhead_seconds_bucket", "0+100x31", model="chat", le="0.01", pod="gw-a"),
            _series("llmgw_gateway_overhead_seconds_bucket", "0+100x31", model="chat", le="+Inf", pod="gw-a"),
        ],
        "13m",
        {"severity": "warning"},
        "30m",
    ),
    # 10 % errors for 70 minutes (budget 0.5 %: burn 20), then none; the 30 m window lets go at 100 m.
    _burn_case(
        "LLMGatewayErrorBudgetFastBurn",
        "availability",
        "critical",
        [_requests("0+90x120", "200", "-"), _requests("0+10x70 700x50", "503", "UF")],
        "65m",
        "110m",
    ),
    # 2 % errors for 3 hours (burn 4), then none: a ticket, gone once the 2 h and 6 h windows clear.
    _burn_case(
        "LLMGatewayErrorBudgetSlowBurn",
        "availability",
        "warning",
        [_requests("0+980x60", "200", "-"), _requests("0+20x18 360x42", "503", "UF")],
        "170m",
        "9h",
        interval="10m",
    ),
    # half the streams slower than 2 s to their first token for 40 minutes, then all fast
    _burn_case(
        "LLMGatewayTTFTBudgetFastBurn",
        "ttft",
        "critical",
        [
            _ttft_fast("0+50x40 2100+100x49"),
            _ttft_count("0+100x90"),
            # non-streamed answers are slow by nature and never count against the TTFT objective
            _ttft_fast("0x90", stream="false"),
            _ttft_count("0+100x90", stream="false"),
        ],
        "30m",
        "80m",
    ),
    # 5 % of streams slow for 3 hours (burn 5), then none
    _burn_case(
        "LLMGatewayTTFTBudgetSlowBurn",
        "ttft",
        "warning",
        [_ttft_fast("0+950x18 18100+1000x41"), _ttft_count("0+1000x60")],
        "170m",
        "9h",
        interval="10m",
    ),
    _burn_case(
        "LLMGatewayLatencyBudgetFastBurn",
        "latency",
        "critical",
        [_duration_fast("0+50x40 2100+100x49"), _duration_count("0+100x90")],
        "30m",
        "80m",
    ),
    _burn_case(
        "LLMGatewayLatencyBudgetSlowBurn",
        "latency",
        "warning",
        [_duration_fast("0+950x18 18100+1000x41"), _duration_count("0+1000x60")],
        "170m",
        "9h",
        interval="10m",
    ),
]
CASE_NAMES = {case["alert_rule_test"][0]["alertname"] for case in CASES}

# Traffic well within every objective: no burn-rate alert may fire at any point.
QUIET = {
    "interval": "10m",
    "input_series": [
        _requests("0+997x54", "200", "-"),
        _requests("0+3x54", "503", "UF"),
        _ttft_fast("0+995x54"),
        _ttft_count("0+1000x54"),
        _duration_fast("0+995x54"),
        _duration_count("0+1000x54"),
    ],
    "alert_rule_test": [
        _alert(name, at) for name in sorted(CASE_NAMES) if "Burn" in name for at in ("1h", "3h", "9h")
    ],
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(full rules file, annotation-free copy, alert names) of the chart with a shared state backend."""
    docs = manifests(
        template({"metrics": {"prometheusRule": {"enabled": True}}, "redis": {"url": "redis://redis:6379/0"}})
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    groups = rule["spec"]["groups"]
    d = tmp_path_factory.mktemp("rules")
    full, bare = d / "rules.yaml", d / "rules-bare.yaml"
    full.write_text(yaml.safe_dump({"groups": groups}))
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
    bare.write_text(yaml.safe_dump({"groups": groups}))
    return full, bare, [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_accepts_every_rule_and_template(rules):
    full, _, _ = rules
    proc = subprocess.run(
        [tool("promtool"), "check", "rules", str(full)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_fires_and_resolves(rules, tmp_path):
    _, bare, names = rules
    assert sorted(names) == sorted(CASE_NAMES), "each alert of the chart needs a firing-and-resolving case"
    tests = {"rule_files": [str(bare)], "evaluation_interval": "1m", "tests": [*CASES, QUIET]}
    spec = tmp_path / "alerts-test.yaml"
    spec.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
