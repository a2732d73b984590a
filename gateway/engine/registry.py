"""Live runtime objects built once from config: models, deployments, and the facts routing reads.

Everything a routing/retry/hedge decision needs about a deployment lives here in process memory, so
the request path never waits on Redis; ``engine/sync.py`` merges other replicas' views in the
background.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gateway.config import DeploymentConfig, GatewayConfig, ModelConfig
from gateway.engine.affinity import AffinityRouter
from gateway.policy.budget import RetryBudget, TokenBucket
from gateway.policy.latency import PeakEwma, QuantileWindow
from gateway.policy.outlier import OutlierState, is_ejected
from gateway.policy.routing import Candidate, Locality, Strategy
from gateway.upstream.base import UpstreamClient


class DeploymentRuntime:
    __slots__ = (
        "cfg",
        "id",
        "region",
        "upstream_model",
        "client",
        "ttft",
        "latency",
        "ttft_window",
        "latency_window",
        "outlier",
        "inflight",
        "cooldown_until",
        "unreachable",
        "max_concurrency",
        "weight",
        "priority",
        "model_name",
        "connect_timeout_s",
        "ttft_s",
        "per_try_s",
        "idle_s",
        "picked_at",
        "probe_at",
    )

    def __init__(
        self,
        cfg: DeploymentConfig,
        model_name: str,
        decay_s: float,
        upstream: Callable[[DeploymentConfig], UpstreamClient],
    ) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.region = cfg.region
        self.model_name = model_name
        self.upstream_model = cfg.model or model_name
        self.client = upstream(cfg)
        self.ttft = PeakEwma(decay_s=decay_s)
        self.latency = PeakEwma(decay_s=decay_s)
        self.ttft_window = QuantileWindow()
        self.latency_window = QuantileWindow()
        self.outlier = OutlierState()
        self.inflight = 0
        self.cooldown_until = 0.0  # a 429 with Retry-After keeps routing away until then
        # A check found it cannot be connected to, or its key refused (app.Lifecycle, from the reachability
        # board): routing passes it by until a re-check finds it back.
        self.unreachable = False
        self.max_concurrency = cfg.max_concurrency
        self.weight = cfg.weight
        self.priority = cfg.priority
        t = cfg.timeouts
        self.connect_timeout_s = t.connect_ms / 1000.0
        self.ttft_s = t.ttft_ms / 1000.0
        self.per_try_s = t.per_try_ms / 1000.0
        self.idle_s = t.idle_ms / 1000.0
        self.picked_at = 0.0  # when routing last started an attempt here (probes: policy/routing.py)
        self.probe_at = -1.0  # t_start of its latest probe attempt: that attempt's sample remeasures

    def available(self, now: float) -> bool:
        """Routing prefers it: reachable, not ejected, not cooling down after a 429 (at capacity is busy,
        not unavailable). What llmgw_model_healthy_deployments counts."""
        return not (self.unreachable or is_ejected(self.outlier, now) or self.cooldown_until > now)

    def healthy(self, now: float) -> bool:
        return self.available(now) and not (self.max_concurrency and self.inflight >= self.max_concurrency)

    def at_capacity(self) -> bool:
        return bool(self.max_concurrency) and self.inflight >= self.max_concurrency

    def observe(self, sample_ms: float, now: float, stream: bool, probe: bool = False) -> None:
        """A first-token (stream) or whole-response latency sample for routing and hedging."""
        (self.ttft if stream else self.latency).observe(sample_ms, now, probe)
        (self.ttft_window if stream else self.latency_window).add(sample_ms, now)

    def candidate(self, now: float, stream: bool) -> Candidate:
        ewma = self.ttft if stream else self.latency
        est = ewma.value(now)
        return Candidate(
            self.id,
            self.region,
            self.weight,
            self.priority,
            self.healthy(now),
            est * (self.inflight + 1),
            est,
            ewma.baseline_ms,
            now if self.inflight else self.picked_at,  # in flight: being measured now
        )


class ModelRuntime:
    __slots__ = (
        "cfg",
        "name",
        "deployments",
        "by_id",
        "retry_budget",
        "hedge_bucket",
        "rr",
        "retry_on",
        "strategy",
        "locality",
        "penalty_ms",
        "total_s",
        "hedge_delay_s",
        "chain",
        "affinity",
        "probe_interval_s",
    )

    def __init__(self, cfg: ModelConfig, upstream: Callable[[DeploymentConfig], UpstreamClient]) -> None:
        self.cfg = cfg
        self.name = cfg.name
        decay = cfg.routing.ewma_decay_s
        self.deployments = [DeploymentRuntime(d, cfg.name, decay, upstream) for d in cfg.deployments]
        self.by_id = {d.id: d for d in self.deployments}
        r = cfg.retry
        self.retry_budget = RetryBudget(
            r.budget_percent,
            r.min_retry_concurrency,
            r.min_retries_per_s,
            tuple(d.id for d in self.deployments),
        )
        self.hedge_bucket = TokenBucket(cfg.hedging.budget_percent)
        self.rr = 0
        self.retry_on = frozenset(str(c) for c in r.retry_on)  # strings once validated
        self.strategy = Strategy(cfg.routing.strategy)
        self.locality = Locality(cfg.routing.locality)
        self.penalty_ms = cfg.routing.cross_region_penalty_ms
        self.probe_interval_s = cfg.routing.probe_interval_s
        self.total_s = cfg.timeouts.total_ms / 1000.0
        self.hedge_delay_s: float | None = None  # last delay used, for the gauge
        self.chain: tuple[ModelRuntime, ...] = (self,)  # with its fallbacks, set by the Registry
        self.affinity = AffinityRouter.build(cfg)  # None: routing.affinity is off

    def ejected_share(self, now: float) -> float:
        n = sum(1 for d in self.deployments if is_ejected(d.outlier, now))
        return n / len(self.deployments)

    def all_ejected(self, now: float) -> bool:
        return all(is_ejected(d.outlier, now) for d in self.deployments)

    def expected_ttft_ms(self, now: float, stream: bool) -> float | None:
        """The best live estimate among healthy deployments (None without data)."""
        best = None
        for d in self.deployments:
            ewma = d.ttft if stream else d.latency
            if ewma.has_data and d.healthy(now):
                v = ewma.value(now)
                best = v if best is None or v < best else best
        return best


class Registry:
    def __init__(
        self,
        cfg: GatewayConfig,
        home_region: str | None,
        seed: int | None,
        upstream: Callable[[DeploymentConfig], UpstreamClient],
    ) -> None:
        self.cfg = cfg
        self.home_region = home_region
        self.models = {m.name: ModelRuntime(m, upstream) for m in cfg.models}
        for m in self.models.values():  # this model, then its fallbacks in order
            m.chain = (m, *(self.models[n] for n in m.cfg.fallbacks))
        self.deployments = [d for m in self.models.values() for d in m.deployments]
        self.rng = random.Random(seed)

    def clients(self) -> list[UpstreamClient]:
        return [d.client for d in self.deployments]
