"""The pure parts of operational telemetry: sampling, per-attempt span ids, JSON log lines, dead-worker
clean-up, and state gauges that follow the state both ways."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import subprocess
import sys

import orjson
import pytest
from fake_clock import FakeClock
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from scripted_upstream import Reply, ScriptedUpstream

from gateway.config import parse_config
from gateway.engine.gauges import StateGauges
from gateway.engine.registry import Registry
from gateway.telemetry.logs import REQUEST_ID, AnsweredElsewhere, JsonFormatter, log_config
from gateway.telemetry.metrics import Metrics, drop_dead_workers
from gateway.telemetry.sampling import Sampler
from gateway.telemetry.timing import now
from gateway.telemetry.tracing import TraceContext

CALLER_SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CALLER_UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


# ----------------------------------------------------------------------------------------- sampling


def test_parent_based_samplers_follow_the_caller_and_decide_new_traces_by_their_rule():
    on, off = Sampler("parentbased_always_on"), Sampler("parentbased_always_off")
    assert on.sampled(TraceContext(CALLER_SAMPLED, None)) and off.sampled(TraceContext(CALLER_SAMPLED, None))
    assert not on.sampled(TraceContext(CALLER_UNSAMPLED, None))
    assert on.sampled(TraceContext(None, None)) and not off.sampled(TraceContext(None, None))
    # not parent-based: the caller's flag is ignored
    assert not Sampler("always_off").sampled(TraceContext(CALLER_SAMPLED, None))
    assert Sampler("always_on").sampled(TraceContext(CALLER_UNSAMPLED, None))


def test_ratio_sampling_keeps_the_same_traces_as_the_sdk():
    rng = random.Random(7)
    for ratio in (0.0, 0.1, 0.5, 1.0):
        ours, sdk = Sampler("traceidratio", str(ratio)), TraceIdRatioBased(ratio)
        for _ in range(500):
            trace_id = rng.getrandbits(128) or 1
            tc = TraceContext(f"00-{trace_id:032x}-00f067aa0ba902b7-01", None)
            assert ours.sampled(tc) == sdk.should_sample(None, trace_id, "x").decision.is_sampled(), (
                ratio,
                trace_id,
            )


def test_an_unknown_sampler_or_bad_ratio_falls_back_like_the_sdk(caplog):
    assert Sampler("jaeger_remote").sampled(TraceContext(None, None))
    assert Sampler("traceidratio", "lots").sampled(TraceContext(None, None))
    assert "not supported" in caplog.text and "not a number" in caplog.text


# ----------------------------------------------------------------------------------- span ids upstream


def test_without_export_the_first_attempt_names_the_gateway_span_and_later_ones_their_own():
    tc = TraceContext(CALLER_SAMPLED, None)
    first, retry, hedge = (tc.attempt_span_id(i) for i in range(3))
    assert first == tc.span_id and len({first, retry, hedge}) == 3
    assert tc.attempt_traceparent(1) == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{retry}-01"


def test_with_export_every_attempt_names_a_span_of_its_own_that_stays_the_same():
    tc = TraceContext(None, None)
    tc.exported = True
    ids = [tc.attempt_span_id(i) for i in range(3)]
    assert tc.span_id not in ids and len(set(ids)) == 3
    assert [tc.attempt_span_id(i) for i in (2, 0, 1)] == [ids[2], ids[0], ids[1]]  # what the span will carry


# ----------------------------------------------------------------------------------------------- logs


def _line(record: logging.LogRecord) -> dict:
    return orjson.loads(JsonFormatter().format(record))


def test_a_log_line_is_one_json_object_with_time_level_logger_and_pid():
    rec = logging.LogRecord("llmgw.state", logging.WARNING, __file__, 1, "backend %s down", ("redis",), None)
    rec.created = 1767225600.25
    line = _line(rec)
    assert line == {
        "timestamp": "2026-01-01T00:00:00.250Z",
        "level": "WARNING",
        "logger": "llmgw.state",
        "message": "backend redis down",
        "pid": os.getpid(),
    }


def test_a_line_written_for_a_request_carries_its_id_and_exceptions_their_traceback():
    token = REQUEST_ID.set("req-42")  # as the Exchange sets it; handlers format in the logging call
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            line = _line(logging.LogRecord("llmgw", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "req-42" and "ValueError: boom" in line["exception"]
    assert "request_id" not in _line(logging.LogRecord("llmgw", logging.INFO, __file__, 1, "x", (), None))


def test_extra_fields_are_kept():
    logger = logging.getLogger("llmgw.test-extra")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.warning("ejected", extra={"deployment": "a"})
    finally:
        logger.removeHandler(handler)
    assert orjson.loads(stream.getvalue())["deployment"] == "a"


# ------------------------------------------------------------------------------------- dead workers


def test_uvicorn_warnings_pass_except_the_one_the_gateway_answers_itself():
    keep = AnsweredElsewhere()

    def warning(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, (), None)

    assert not keep.filter(warning("Invalid HTTP request received."))  # logged as DPE in the access log
    assert keep.filter(warning("Unsupported upgrade request."))
    assert "answered_elsewhere" in log_config("info")["loggers"]["uvicorn.error"]["filters"]


def test_a_dead_workers_live_gauges_are_dropped_and_its_counters_kept(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is gone
    dead, alive = child.pid, os.getpid()
    names = [
        f"gauge_livesum_{dead}.db",
        f"gauge_livemax_{dead}.db",
        f"counter_{dead}.db",
        f"histogram_{dead}.db",
        f"gauge_livesum_{alive}.db",
        f"gauge_max_{dead}.db",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert drop_dead_workers(str(tmp_path)) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead}.db", f"histogram_{dead}.db", f"gauge_livesum_{alive}.db", f"gauge_max_{dead}.db"]
    )


# ------------------------------------------------------------------------------------- state gauges


@pytest.fixture
def gauges(monkeypatch: pytest.MonkeyPatch) -> tuple[StateGauges, Registry, Metrics]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    cfg = parse_config(
        {
            "models": [
                {
                    "name": "chat",
                    "deployments": [
                        {"id": "a", "base_url": "http://127.0.0.1:9/v1"},
                        {"id": "b", "base_url": "http://127.0.0.1:9/v1"},
                    ],
                }
            ]
        },
        env={},
    )
    registry, metrics = (
        Registry(cfg, None, 0, ScriptedUpstream(FakeClock(), lambda req: Reply()).client),
        Metrics(),
    )
    return StateGauges(registry, metrics, "memory"), registry, metrics


def _value(metrics: Metrics, family, *labels: str) -> float:
    return metrics.child(family, *labels).value


def test_ejection_gauges_follow_the_ejection_both_ways(gauges):
    g, registry, m = gauges
    a = registry.models["chat"].by_id["a"]
    g.refresh()
    assert _value(m, m.ejected, "chat", "a") == 0 and _value(m, m.healthy, "chat") == 2
    a.outlier.ejected_until = now() + 30
    g.refresh()
    assert _value(m, m.ejected, "chat", "a") == 1 and _value(m, m.healthy, "chat") == 1
    a.outlier.ejected_until = now() - 0.001  # the ejection ended: no event, just time
    g.refresh()
    assert _value(m, m.ejected, "chat", "a") == 0 and _value(m, m.healthy, "chat") == 2


def test_a_deployment_cooling_down_after_a_429_is_not_healthy(gauges):
    g, registry, m = gauges
    registry.models["chat"].by_id["b"].cooldown_until = now() + 5
    g.refresh()
    assert _value(m, m.healthy, "chat") == 1 and _value(m, m.ejected, "chat", "b") == 0


def test_a_deployment_found_unreachable_is_not_healthy(gauges):
    """A key the provider refuses or a keep-warm that fails marks it unreachable: routing passes it by (in
    panic when it is the only one), so the gauge must say so, or LLMGatewayNoHealthyUpstream cannot fire."""
    g, registry, m = gauges
    registry.models["chat"].by_id["a"].unreachable = True
    g.refresh()
    assert _value(m, m.healthy, "chat") == 1
    registry.models["chat"].by_id["b"].unreachable = True
    g.refresh()
    assert _value(m, m.healthy, "chat") == 0


class _Sync:
    up: bool | None = None


def test_the_state_backend_is_up_in_memory_and_as_the_shared_one_says(gauges):
    g, registry, m = gauges
    g.refresh()
    assert _value(m, m.state_up, "memory") == 1
    shared = StateGauges(registry, m, "redis")
    shared.refresh()
    assert _value(m, m.state_up, "redis") == 0  # no sync yet: not known to be up
    shared.sync = _Sync()
    for up, want in ((True, 1), (False, 0), (True, 1)):
        shared.sync.up = up
        shared.refresh()
        assert _value(m, m.state_up, "redis") == want


def test_each_worker_rewrites_its_gauges_every_interval_on_the_engines_clock(gauges):
    """In multi-worker runs the scrape is answered by one worker: the others' ejection gauges must follow
    an ejection's end by themselves, not only when scraped."""
    _, registry, m = gauges
    clock = FakeClock()
    g = StateGauges(registry, m, "memory", clock)
    registry.models["chat"].by_id["a"].outlier.ejected_until = clock.now() + 1.5

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(g.run(interval_s=1.0))
        await asyncio.sleep(0)
        assert _value(m, m.ejected, "chat", "a") == 1
        clock.advance(1.0)
        await asyncio.sleep(0)
        assert _value(m, m.ejected, "chat", "a") == 1  # still ejected at 1.0 s
        clock.advance(1.0)
        await asyncio.sleep(0)
        assert _value(m, m.ejected, "chat", "a") == 0  # ended at 1.5 s, rewritten at 2.0 s
        task.cancel()

    asyncio.run(scenario())
