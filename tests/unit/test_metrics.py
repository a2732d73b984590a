"""The lock-free loop metrics export exactly what prometheus_client's own classes would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.telemetry.metrics import (
    OVERHEAD_BUCKETS,
    LoopCollector,
    LoopCounter,
    LoopGauge,
    LoopHistogram,
    Metrics,
)


def _exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus_client adds *_created samples (a start time); everything else must match line for line.
    return sorted(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)


def _drive(counter, gauge, hist) -> None:
    counter.labels("a", "200").inc()
    counter.labels("a", "200").inc(2)
    counter.labels("b", "503").inc()
    gauge.inc()
    gauge.inc(3)
    gauge.dec()
    gauge.set(7)
    gauge.dec(2)
    h = hist.labels("a")
    for v in (
        0.00005,
        0.0000499,
        0.0001,
        0.0003,
        1.0,
        1.5,
        0.0,
    ):  # on a bound, just below, between, past the last
        h.observe(v)
    hist.labels("b")  # a child with no samples yet is exported too


def test_loop_metrics_export_what_prometheus_client_would():
    ref = CollectorRegistry()
    _drive(
        Counter("llmgw_x_total", "X.", ["model", "code"], registry=ref),
        Gauge("llmgw_inflight", "In flight.", registry=ref),
        Histogram("llmgw_overhead_seconds", "Overhead.", ["model"], buckets=OVERHEAD_BUCKETS, registry=ref),
    )
    ours = CollectorRegistry()
    loop = LoopCollector()
    loop.metrics += [
        LoopCounter("llmgw_x_total", "X.", ["model", "code"]),
        LoopGauge("llmgw_inflight", "In flight."),
        LoopHistogram("llmgw_overhead_seconds", "Overhead.", ["model"], OVERHEAD_BUCKETS),
    ]
    ours.register(loop)
    _drive(*loop.metrics)
    assert _exposition(ours) == _exposition(ref)
    assert 'llmgw_overhead_seconds_bucket{le="5e-05",model="a"} 3.0' in _exposition(ours)  # le is inclusive


def test_a_wrong_number_of_labels_is_refused():
    c = LoopCounter("llmgw_y_total", "Y.", ["model"])
    with pytest.raises(ValueError, match="llmgw_y_total"):
        c.labels("a", "b")


def test_metrics_in_one_process_are_loop_metrics(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = Metrics()
    assert isinstance(m.requests, LoopCounter) and isinstance(m.overhead, LoopHistogram)
    m.child(m.requests, "chat", "a", "us-east", "200", "-").inc()
    m.inflight.inc()
    text = m.render()[0].decode()
    assert (
        'llmgw_requests_total{code="200",deployment="a",flags="-",model="chat",region="us-east"} 1.0' in text
    )
    assert "llmgw_inflight_requests 1.0" in text
