"""Prometheus metrics: one registry, bounded labels, children cached so the hot path does no lookups.

In one process, samples are plain numbers that the event loop updates without locks (``LoopCounter``,
``LoopGauge``, ``LoopHistogram`` below), exported at scrape time by a collector: every update and every
scrape runs on the loop's thread, and prometheus_client's own metrics take a lock per update (a
histogram two), about 3 % of a proxied request's instructions.

With several uvicorn workers the gateway sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start,
every worker writes its samples there, and ``/metrics`` merges them (prometheus_client's
multiprocess mode), so a scrape sees the whole pod whichever worker answers it. Gauges that describe
state (ejections, pools, estimates) use prometheus_client's ``live*`` modes and every worker rewrites
them from its state every second (``engine.gauges``); a scrape first drops the files of workers that
are gone (``drop_dead_workers``), so a killed worker's in-flight requests and connections stop counting.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar, overload

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Gateway overhead lives in microseconds; upstream time in hundreds of ms to minutes.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Up to and past the default 300 s deadline (timeouts.total_ms), so a request that uses it all lands in a bucket.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    180.0,
    300.0,
    600.0,
)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a killed worker not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def drop_dead_workers(path: str) -> list[int]:
    """Remove the live-gauge files of workers that are gone; their counters and histograms stay (totals
    must not go backwards). Returns the pids dropped."""
    from prometheus_client.multiprocess import mark_process_dead

    dead: set[int] = set()
    for name in os.listdir(path):
        if not (name.startswith("gauge_live") and name.endswith(".db")):
            continue
        try:
            pid = int(name[:-3].rsplit("_", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid not in dead and not _pid_alive(pid):
            dead.add(pid)
    for pid in dead:
        mark_process_dead(pid, path)
    return sorted(dead)


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1  # le is inclusive: the first bound >= amount


_S = TypeVar("_S", _Value, _Buckets)


class _LoopMetric(Generic[_S]):
    """A metric family updated on the event loop without locks; the same ``labels(...)`` / ``inc`` surface as
    prometheus_client's, exported by ``LoopCollector``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], _S] = {}
        self._plain: _S | None = (
            None if self.labelnames else self._new()
        )  # unlabelled: the metric is its own child

    def _new(self) -> _S:
        raise NotImplementedError

    def labels(self, *values: str) -> _S:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        c = self.children.get(values)
        if c is None:
            c = self.children[values] = self._new()
        return c

    def samples(self) -> Iterator[tuple[tuple[str, ...], _S]]:
        if self._plain is not None:
            yield (), self._plain
        yield from list(self.children.items())

    def family(self) -> Metric:
        raise NotImplementedError


class _LoopValueMetric(_LoopMetric[_Value]):
    family_type: type[CounterMetricFamily] | type[GaugeMetricFamily]  # prometheus_client's family class

    def _new(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1.0) -> None:
        self._plain.inc(amount)  # type: ignore[union-attr]  # unlabelled only, as with prometheus_client

    def family(self) -> Metric:
        f = self.family_type(self.name, self.documentation, labels=self.labelnames)
        for values, c in self.samples():
            f.add_metric(values, c.value)
        return f


class LoopCounter(_LoopValueMetric):
    family_type = CounterMetricFamily


class LoopGauge(_LoopValueMetric):
    family_type = GaugeMetricFamily

    def dec(self, amount: float = 1.0) -> None:
        self._plain.dec(amount)  # type: ignore[union-attr]

    def set(self, value: float) -> None:
        self._plain.set(value)  # type: ignore[union-attr]


class LoopHistogram(_LoopMetric[_Buckets]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames)

    def _new(self) -> _Buckets:
        return _Buckets(self.bounds)

    def family(self) -> Metric:
        f = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, h in self.samples():
            total = 0
            cumulative = []
            for le, n in zip(self._le, h.counts, strict=True):
                total += n
                cumulative.append((le, total))
            f.add_metric(values, cumulative, h.sum)
        return f


# A metric is prometheus_client's (multiprocess mode) or the loop's own; a labelled child, either's child.
CounterMetric = Counter | LoopCounter
GaugeMetric = Gauge | LoopGauge
HistogramMetric = Histogram | LoopHistogram
CounterChild = Counter | _Value
GaugeChild = Gauge | _Value
HistogramChild = Histogram | _Buckets
_L = TypeVar("_L", LoopCounter, LoopGauge, LoopHistogram)


class LoopCollector:
    """Exports the loop metrics at scrape time (every family, labelled children or not)."""

    def __init__(self) -> None:
        self.metrics: list[_LoopValueMetric | LoopHistogram] = []

    def collect(self) -> Iterator[Metric]:
        for m in self.metrics:
            yield m.family()


class Metrics:
    """Every metric the gateway exports. Names are documented in docs/operations.md."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode metrics must live in the default registry (values go to mmap files).
        reg = None if self.multiprocess else (registry or CollectorRegistry())
        self.registry = reg
        self._loop = LoopCollector()
        if reg is not None:
            reg.register(self._loop)
            GCCollector(registry=reg)  # python_gc_*: collections per generation, to tell GC pauses apart
            ProcessCollector(registry=reg)  # process_*: CPU seconds, resident memory, open fds

        self.requests = self._counter(
            "llmgw_requests_total",
            "Client requests by outcome.",
            ["model", "deployment", "region", "code", "flags"],
        )
        self.request_duration = self._histogram(
            "llmgw_request_duration_seconds",
            "Whole request, first byte in to last byte out.",
            ["model", "stream"],
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = self._histogram(
            "llmgw_ttft_seconds",
            "Time to first content token as the client saw it (stream=false: the whole response).",
            ["model", "deployment", "stream"],
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_duration = self._histogram(
            "llmgw_upstream_duration_seconds",
            "Upstream service time of the winning attempt.",
            ["model", "deployment"],
            buckets=LATENCY_BUCKETS,
        )
        self.overhead = self._histogram(
            "llmgw_gateway_overhead_seconds",
            "Time the gateway itself added to a request.",
            ["model"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.attempts = self._counter(
            "llmgw_upstream_attempts_total",
            "Upstream attempts by outcome.",
            ["model", "deployment", "outcome"],
        )
        self.inflight = self._gauge("llmgw_inflight_requests", "Client requests in flight.", mode="livesum")
        self.connect = self._histogram(
            "llmgw_upstream_connect_seconds",
            "New upstream connection set-up time.",
            ["deployment"],
            buckets=CONNECT_BUCKETS,
        )
        self.accesslog_dropped = self._counter(
            "llmgw_accesslog_dropped_total", "Access-log lines dropped under pressure."
        )
        self.tokens = self._counter(
            "llmgw_tokens_total", "Tokens reported by upstream usage.", ["model", "kind"]
        )
        self.retries = self._counter("llmgw_retries_total", "Retry decisions.", ["model", "reason"])
        self.backoff = self._counter(
            "llmgw_retry_backoff_seconds_total", "Time requests waited before a retry.", ["model"]
        )
        self.retry_budget_exhausted = self._counter(
            "llmgw_retry_budget_exhausted_total", "Retries refused by the budget.", ["model"]
        )
        self.hedges = self._counter("llmgw_hedges_total", "Hedged attempts by outcome.", ["model", "outcome"])
        self.hedge_delay = self._gauge(
            "llmgw_hedge_delay_seconds", "Current hedge delay.", ["model"], mode="livemax"
        )
        self.ejections = self._counter("llmgw_ejections_total", "Outlier ejections.", ["deployment"])
        self.ejected = self._gauge(
            "llmgw_deployment_ejected",
            "1 while a deployment is ejected, 0 otherwise.",
            ["model", "deployment"],
            mode="livemax",
        )
        self.healthy = self._gauge(
            "llmgw_model_healthy_deployments",
            "Deployments of a model that routing may pick (not ejected, not cooling down).",
            ["model"],
            mode="livemin",
        )
        self.reachable = self._gauge(
            "llmgw_deployment_reachable",
            "1 while a deployment answers its checks (start-up, "
            "keep-warm, re-checks every 5 s while down), 0 while not.",
            ["deployment"],
            mode="livemin",
        )
        self.pool_connections = self._gauge(
            "llmgw_pool_connections",
            "Upstream connections by state.",
            ["deployment", "state"],
            mode="livesum",
        )
        self.keepwarm = self._counter(
            "llmgw_keepwarm_pings_total", "Keep-warm pings by result.", ["deployment", "result"]
        )
        self.warmup = self._counter(
            "llmgw_warmup_total",
            "Schema and connection warm-ups by result.",
            ["model", "deployment", "result"],
        )
        self.warmup_seconds = self._histogram(
            "llmgw_warmup_seconds", "Warm-up request time.", ["model", "deployment"], buckets=LATENCY_BUCKETS
        )
        self.fallbacks = self._counter(
            "llmgw_fallbacks_total", "Requests answered by a fallback model.", ["from", "to", "reason"]
        )
        self.overflow = self._counter(
            "llmgw_overflow_total", "Requests refused at once by a concurrency limit.", ["scope"]
        )
        self.input_limits = self._counter(
            "llmgw_input_limits_total",
            "Requests and connections refused or closed "
            "by an input limit (head size and time, idle, JSON cost).",
            ["limit"],
        )
        self.rate_limited = self._counter(
            "llmgw_rate_limited_total", "Requests refused by a key's limits.", ["key", "limit"]
        )
        self.state_up = self._gauge(
            "llmgw_state_backend_up",
            "1 while the state backend answers (backend=memory: always 1, nothing shared).",
            ["backend"],
            mode="livemin",
        )
        self.state_primary = self._gauge(
            "llmgw_state_backend_primary",
            "1 for each Redis primary the state backend uses now, 0 for one it used before.",
            ["mode", "address"],
            mode="max",
        )
        self.state_reconnects = self._counter(
            "llmgw_state_backend_reconnects_total",
            "Times state sharing resumed after an outage or moved to a new primary.",
        )
        self.state_local_seconds = self._counter(
            "llmgw_state_local_only_seconds_total",
            "Seconds rate limits were decided locally because the state backend did not answer.",
        )
        self.remote_estimates = self._counter(
            "llmgw_state_remote_estimates_total",
            "Latency estimates read from other replicas: merged; stale (based on samples older than this "
            "process's own latest: left out); no-age (from a replica that publishes no age: merged).",
            ["deployment", "result"],
        )
        self.route_decisions = self._counter(
            "llmgw_route_decisions_total", "Routing decisions by reason.", ["model", "deployment", "reason"]
        )
        self.affinity_routes = self._counter(
            "llmgw_affinity_routes_total",
            "Keyed requests (routing.affinity) by placement: home, rehome, spill, fallback, unkeyed.",
            ["model", "result"],
        )
        self.gc_frozen = self._gauge(
            "llmgw_gc_frozen_objects", "Start-up objects kept out of the cyclic GC.", mode="livemax"
        )
        self.latency_estimate = self._gauge(
            "llmgw_deployment_latency_estimate_seconds",
            "Routing's live TTFT/latency estimate per deployment.",
            ["deployment"],
            mode="livemax",
        )
        # keyed by the metric itself (hashed and compared by identity), not its id(): no int to box per lookup
        self._children: dict[tuple[object, tuple[str, ...]], CounterChild | GaugeChild | HistogramChild] = {}

    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetric:
        if self.multiprocess:
            return Counter(name, doc, labels)
        return self._add(LoopCounter(name, doc, labels))

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = (), *, mode: str) -> GaugeMetric:
        """``mode``: how multiprocess mode merges workers ("livesum" for amounts, "max" for states)."""
        if self.multiprocess:
            return Gauge(name, doc, labels, multiprocess_mode=mode)  # type: ignore[arg-type]  # a mode name
        return self._add(LoopGauge(name, doc, labels))

    def _histogram(
        self, name: str, doc: str, labels: Sequence[str], *, buckets: Sequence[float]
    ) -> HistogramMetric:
        if self.multiprocess:
            return Histogram(name, doc, labels, buckets=buckets)
        return self._add(LoopHistogram(name, doc, labels, buckets))

    def _add(self, metric: _L) -> _L:
        self._loop.metrics.append(metric)
        return metric

    @overload
    def child(self, metric: CounterMetric, *labels: str) -> CounterChild: ...
    @overload
    def child(self, metric: GaugeMetric, *labels: str) -> GaugeChild: ...
    @overload
    def child(self, metric: HistogramMetric, *labels: str) -> HistogramChild: ...

    def child(
        self, metric: CounterMetric | GaugeMetric | HistogramMetric, *labels: str
    ) -> CounterChild | GaugeChild | HistogramChild:
        """Cached labelled child: one dict lookup on the hot path instead of prometheus' locked lookup."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            path = multiprocess_dir()
            assert path is not None  # multiprocess mode is set by it
            drop_dead_workers(path)
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg, path)
            return generate_latest(reg), CONTENT_TYPE_LATEST
        assert self.registry is not None  # always, outside multiprocess mode
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
