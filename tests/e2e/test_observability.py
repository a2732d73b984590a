"""Where the time went: timings that match the simulator, flags, metrics across workers, trace context."""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from harness import (
    HTTP,
    Gateway,
    LogFrom,
    Sims,
    dead_model,
    dep,
    metric_value,
    model,
    plain_gateway,
    post_chat,
)

FIXED = {"ttft_ms": 200, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 1, "tail_p": 0}
# The simulator never answers before its profile says, so lower bounds are exact (less 5 ms of rounding and
# timer resolution). Upper bounds allow what a busy machine adds to one request (scheduling delays of tens of
# milliseconds) and still catch a gateway that waits where it should not (a timer, a missed wake-up).
BUSY_SLACK_MS = 120
OVERHEAD_CEILING_MS = 50  # the gateway adds well under 1 ms on an idle machine


@pytest.fixture(scope="module")
def shared_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sims, Gateway]]:
    yield from plain_gateway(tmp_path_factory.mktemp("plain"), FIXED)


@pytest.fixture
def plain(shared_plain: tuple[Sims, Gateway]) -> tuple[Sims, LogFrom]:
    """One gateway with the default settings and its simulator for the module's tests that only read them
    (a start costs seconds): the simulator's knobs (FIXED) and counters as new, the access log from the
    test's first request on."""
    sims, gw = shared_plain
    sims.renew("sim-a", **FIXED)
    return sims, LogFrom(gw)


def test_logged_upstream_time_matches_the_simulator(plain):
    _, gw = plain
    for _ in range(5):
        assert post_chat(gw).status_code == 200
    recs = gw.records(wait_for=5)
    for rec in recs:
        assert 195 <= rec["upstream_service_time_ms"] <= 200 + BUSY_SLACK_MS, rec
        assert rec["gateway_overhead_ms"] < OVERHEAD_CEILING_MS, rec
        assert rec["duration_ms"] == pytest.approx(
            rec["upstream_service_time_ms"] + rec["gateway_overhead_ms"], abs=0.01
        )
        assert (
            rec["upstream_connect_ms"] == 0 and rec["upstream_reused_connection"] is True
        )  # pre-warmed pool
        assert rec["attempts"] == 1 and rec["response_flags"] == "-"
    r = post_chat(gw)
    up = float(r.headers["x-gateway-upstream-service-time"])
    assert 195 <= up <= 200 + BUSY_SLACK_MS
    timing = r.headers["server-timing"]
    assert timing.startswith("gateway;dur=") and "upstream;dur=" in timing


def test_a_body_uploaded_in_parts_is_the_clients_time_not_gateway_overhead(plain):
    # A slow uploader made gateway_overhead_ms (and its alert) blame the gateway for the client's link.
    _, gw = plain
    overhead_before = metric_value(gw.metrics(), "llmgw_gateway_overhead_seconds_sum")
    body = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * 400}]})
    parts = [body[:100], body[100:200], body[200:300], body[300:]]
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(head + parts[0])
        for part in parts[1:]:
            time.sleep(0.15)  # the client's pace: the gateway waits for each part
            s.sendall(part)
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    rec = gw.records(wait_for=1)[-1]
    assert rec["request_duration_ms"] >= 440, rec  # the three pauses, as the client made them
    assert rec["gateway_overhead_ms"] < OVERHEAD_CEILING_MS, rec
    assert rec["duration_ms"] >= rec["upstream_service_time_ms"] + rec["gateway_overhead_ms"] + 440
    overhead = metric_value(gw.metrics(), "llmgw_gateway_overhead_seconds_sum") - overhead_before
    assert overhead < OVERHEAD_CEILING_MS / 1000


def test_stream_ttft_is_logged_and_close_to_the_simulator(plain):
    sims, gw = plain
    sims.set("sim-a", tokens=5, itl_ms=50)
    r = post_chat(gw, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    rec = gw.records(wait_for=1)[-1]
    assert 195 <= rec["ttft_ms"] <= 200 + BUSY_SLACK_MS
    assert 195 + 4 * 50 <= rec["upstream_service_time_ms"] <= 200 + 4 * 50 + BUSY_SLACK_MS
    assert rec["gateway_overhead_ms"] < OVERHEAD_CEILING_MS
    assert rec["completion_tokens"] == 5 and rec["stream"] is True


@pytest.fixture
def flaky(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**FIXED, "ttft_ms": 20})})
    gw = gateways(
        {
            "models": [
                model(
                    "chat",
                    [dep("a", sims.base_url("sim-a"))],
                    retry={"max_retries": 1, "budget_percent": 100},
                    timeouts={"ttft_ms": 300},
                ),
                dead_model(),
            ]
        }
    )
    return sims, gw


@pytest.mark.parametrize(
    ("headers", "model_name", "stream", "status", "flag"),
    [
        ({}, "dead", False, 502, "UF"),
        ({"x-sim-stall-rate": "1"}, "chat", False, 504, "UT"),
        ({"x-sim-error-rate": "1", "x-sim-error-status": "503"}, "chat", False, 503, "URX"),
        ({"x-sim-reset-rate": "1", "x-sim-reset-after-tokens": "0"}, "chat", True, 502, "UC"),
        ({"x-gateway-timeout-ms": "150", "x-sim-stall-rate": "1"}, "chat", False, 504, "DT"),
    ],
)
def test_each_failure_kind_has_its_flag(flaky, headers, model_name, stream, status, flag):
    _, gw = flaky
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers=headers,
        timeout=30,
        json={"model": model_name, "stream": stream, "messages": []},
    )
    assert r.status_code == status, r.text
    rec = gw.records(wait_for=1)[-1]
    assert flag in rec["response_flags"].split(","), rec
    assert rec["response_code"] == status


def test_metrics_add_up_with_two_workers(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**FIXED, "ttft_ms": 5})})
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]}, workers=2)
    n = 30
    with httpx.Client(timeout=10) as c:  # one connection per request so both workers get traffic
        for _ in range(n):
            r = c.post(
                gw.url + "/v1/chat/completions",
                headers={"connection": "close"},
                json={"model": "chat", "messages": []},
            )
            assert r.status_code == 200
    gw.records(wait_for=n)
    text = gw.metrics()
    assert metric_value(text, "llmgw_requests_total", model="chat", code="200") == n
    assert metric_value(text, "llmgw_request_duration_seconds_count", model="chat") == n
    assert metric_value(text, "llmgw_upstream_attempts_total", deployment="a", outcome="success") == n
    assert metric_value(text, "llmgw_gateway_overhead_seconds_count", model="chat") == n
    assert "llmgw_accesslog_dropped_total" in text
    pids = {rec["downstream_remote_address"] for rec in gw.records()}
    assert len(pids) > 1
    # every worker reports the server it runs as (the file says 1 worker, --workers said 2)
    for _ in range(4):
        shown = httpx.get(gw.url + "/admin/config", headers={"connection": "close"}, timeout=10).json()
        assert (shown["server"]["workers"], shown["server"]["port"]) == (2, gw.port)


def test_traceparent_continues_the_client_trace(plain):
    sims, gw = plain
    sims.set("sim-a", ttft_ms=5)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    post_chat(gw, headers={"traceparent": tp, "tracestate": "app=1"})
    seen = sims.stats("sim-a")["recent"][-1]
    _, trace_id, parent, flags = seen["traceparent"].split("-")
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and parent != "00f067aa0ba902b7" and flags == "01"
    assert seen["tracestate"] == "app=1"
    rec = gw.records(wait_for=1)[-1]
    assert rec["traceparent"] == tp
    # without a traceparent the gateway starts a trace and sends it upstream
    post_chat(gw)
    seen = sims.stats("sim-a")["recent"][-1]
    assert len(seen["traceparent"].split("-")[1]) == 32
    rec = gw.records(wait_for=2)[-1]
    assert rec["traceparent"].split("-")[1] == seen["traceparent"].split("-")[1]


def test_text_access_log_format(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**FIXED, "ttft_ms": 5})})
    gw = gateways(
        {"models": [model("chat", [dep("a", sims.base_url("sim-a"))])], "access_log": {"format": "text"}}
    )
    r = post_chat(gw, headers={"x-request-id": "text-1", "user-agent": "ua-test"})
    assert r.status_code == 200
    line = gw.lines(wait_for=1)[-1]
    # Envoy's default format first: [time] "METHOD PATH PROTO" code flags rx tx duration upstream-time ...
    assert '"POST /v1/chat/completions HTTP/1.1" 200 - ' in line
    assert '"ua-test" "text-1" "chat"' in line and "cluster=a" in line and "ttft_ms=" in line


def test_report_reads_the_gateways_own_log(plain):
    sims, gw = plain
    sims.set("sim-a", ttft_ms=30)
    for _ in range(10):
        post_chat(gw)
    gw.records(wait_for=10)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "report", str(gw.log_path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    data = orjson.loads(out.stdout)
    assert "chat" in out.stdout and data


def test_report_keeps_client_chosen_names_inert_in_csv_and_markdown(sims_factory, gateways):
    # A 400 logs the model the client named: a formula for whoever opens the csv in a spreadsheet, markup for
    # whoever pastes the markdown into an incident doc.
    sims = sims_factory({"sim-a": ("us-east", {**FIXED, "ttft_ms": 5})})
    gw = gateways({"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]})
    formula, markup = '=HYPERLINK("http://evil.example","x")', "[x](http://evil.example) <img src=x>"
    assert post_chat(gw).status_code == 200
    for name in (formula, markup):
        assert post_chat(gw, name, messages="not a list").status_code == 400
    assert {r["model"] for r in gw.records(wait_for=3)} == {"chat", formula, markup}

    def report(fmt: str) -> str:
        cmd = [sys.executable, "-m", "gateway", "report", str(gw.log_path), "--format", fmt]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    rows = list(csv.DictReader(io.StringIO(report("csv"))))
    assert {r["group"] for r in rows if r["table"] == "latency"} == {"chat", "'" + formula, markup, "(all)"}
    md = report("markdown")
    # markup escaped, and the bare URL kept from renderers' autolinks (":" and a "." before a letter)
    assert "| \\[x\\](http\\://evil\\.example) \\<img src=x\\> | 1 | 1 | 100.0% |" in md
    assert "| =HYPERLINK(" in md  # not a formula where no spreadsheet reads it


def test_access_log_write_never_blocks_and_counts_drops(tmp_path):
    import asyncio
    import fcntl
    import os
    import threading

    from gateway.telemetry.accesslog import FIELDS, AccessLog

    drops = []
    r, w = os.pipe()  # a log reader that stalls: nobody reads this pipe until the burst is over
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: one page
    log = AccessLog(f"/proc/self/fd/{w}", "json", queue_size=16, on_drop=lambda: drops.append(1))
    rec = dict.fromkeys(FIELDS)

    async def burst() -> float:
        t0 = time.monotonic()
        for _ in range(5000):  # the pipe fills, then at most queue_size lines wait, the rest are counted
            log.write(rec)
        return time.monotonic() - t0

    log.start()
    assert asyncio.run(burst()) < 1.0
    os.close(w)
    out = bytearray()
    reader = threading.Thread(target=lambda: [out.extend(b) for b in iter(lambda: os.read(r, 65536), b"")])
    reader.start()
    log.close(timeout=10)
    reader.join(10)
    lines = bytes(out).splitlines()
    assert len(lines) + len(drops) == 5000 and len(lines) <= 16 + 4096 // 100


def test_start_up_objects_are_kept_out_of_the_cyclic_gc(plain):
    """Full collections would otherwise walk every module and config object: tens of ms under load."""
    _, gw = plain
    text = gw.metrics()
    assert metric_value(text, "llmgw_gc_frozen_objects") > 10_000
    # the runtime's own series are there to tell a GC pause from a slow provider
    assert 'python_gc_collections_total{generation="2"}' in text
    assert metric_value(text, "process_resident_memory_bytes") > 0
