"""Prometheus metrics: one registry, bounded labels, children cached so the hot path does no lookups.

With several uvicorn workers the gateway sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start,
every worker writes its samples there, and ``/metrics`` merges them (prometheus_client's
multiprocess mode), so a scrape sees the whole pod whichever worker answers it.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Gateway overhead lives in microseconds; upstream time in hundreds of ms to minutes.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0, 120.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the gateway exports. Names are documented in docs/operations.md."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode metrics must live in the default registry (values go to mmap files).
        reg = None if self.multiprocess else (registry or CollectorRegistry())
        self.registry = reg
        kw: dict[str, Any] = {"registry": reg} if reg is not None else {}
        gauge_live = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        gauge_max = {"multiprocess_mode": "max"} if self.multiprocess else {}

        self.requests = Counter("llmgw_requests_total", "Client requests by outcome.",
                                ["model", "deployment", "region", "code", "flags"], **kw)
        self.request_duration = Histogram("llmgw_request_duration_seconds", "Whole request, first byte in to last byte out.",
                                          ["model", "stream"], buckets=LATENCY_BUCKETS, **kw)
        self.ttft = Histogram("llmgw_ttft_seconds", "Time to first content token as the client saw it.",
                              ["model", "deployment"], buckets=LATENCY_BUCKETS, **kw)
        self.upstream_duration = Histogram("llmgw_upstream_duration_seconds", "Upstream service time of the winning attempt.",
                                           ["model", "deployment"], buckets=LATENCY_BUCKETS, **kw)
        self.overhead = Histogram("llmgw_gateway_overhead_seconds", "Time the gateway itself added to a request.",
                                  ["model"], buckets=OVERHEAD_BUCKETS, **kw)
        self.attempts = Counter("llmgw_upstream_attempts_total", "Upstream attempts by outcome.",
                                ["model", "deployment", "outcome"], **kw)
        self.inflight = Gauge("llmgw_inflight_requests", "Client requests in flight.", **kw, **gauge_live)
        self.connect = Histogram("llmgw_upstream_connect_seconds", "New upstream connection set-up time.",
                                 ["deployment"], buckets=CONNECT_BUCKETS, **kw)
        self.accesslog_dropped = Counter("llmgw_accesslog_dropped_total", "Access-log lines dropped under pressure.", **kw)
        self.tokens = Counter("llmgw_tokens_total", "Tokens reported by upstream usage.", ["model", "kind"], **kw)
        self.retries = Counter("llmgw_retries_total", "Retry decisions.", ["model", "reason"], **kw)
        self.retry_budget_exhausted = Counter("llmgw_retry_budget_exhausted_total", "Retries refused by the budget.",
                                              ["model"], **kw)
        self.hedges = Counter("llmgw_hedges_total", "Hedged attempts by outcome.", ["model", "outcome"], **kw)
        self.hedge_delay = Gauge("llmgw_hedge_delay_seconds", "Current hedge delay.", ["model"], **kw, **gauge_max)
        self.ejections = Counter("llmgw_ejections_total", "Outlier ejections.", ["deployment"], **kw)
        self.ejected = Gauge("llmgw_deployment_ejected", "1 while a deployment is ejected.", ["deployment"], **kw, **gauge_max)
        self.pool_connections = Gauge("llmgw_pool_connections", "Upstream connections by state.",
                                      ["deployment", "state"], **kw, **gauge_live)
        self.keepwarm = Counter("llmgw_keepwarm_pings_total", "Keep-warm pings by result.", ["deployment", "result"], **kw)
        self.warmup = Counter("llmgw_warmup_total", "Schema and connection warm-ups by result.",
                              ["model", "deployment", "result"], **kw)
        self.warmup_seconds = Histogram("llmgw_warmup_seconds", "Warm-up request time.", ["model", "deployment"],
                                        buckets=LATENCY_BUCKETS, **kw)
        self.fallbacks = Counter("llmgw_fallbacks_total", "Requests answered by a fallback model.",
                                 ["from", "to", "reason"], **kw)
        self.overflow = Counter("llmgw_overflow_total", "Requests refused at once by a concurrency limit.",
                                ["scope"], **kw)
        self.rate_limited = Counter("llmgw_rate_limited_total", "Requests refused by a key's limits.",
                                    ["key", "limit"], **kw)
        self.state_up = Gauge("llmgw_state_backend_up", "1 while the shared state backend answers.", **kw, **gauge_max)
        self.route_decisions = Counter("llmgw_route_decisions_total", "Routing decisions by reason.",
                                       ["model", "deployment", "reason"], **kw)
        self.latency_estimate = Gauge("llmgw_deployment_latency_estimate_seconds",
                                      "Routing's live TTFT/latency estimate per deployment.", ["deployment"], **kw,
                                      **gauge_max)
        self._children: dict[tuple, Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """Cached labelled child: one dict lookup on the hot path instead of prometheus' locked lookup."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
