"""One model's prefix-cache affinity (routing.affinity): its hash rings and the facts the policy reads.

The decision itself is ``policy/affinity.py``; this module builds the rings once and, per attempt, hands
the policy each deployment's health, in-flight count and recent median latency.

No shared state: the ring is a pure function of the configured deployment ids, so every replica computes
the same home for a key, and the ejections that rehome keys are already shared by the state sync. The
load bound reads this replica's in-flight counts only: each replica bounds its own share, which bounds
the sum, and a round trip to Redis per request would cost more than the balance it could add.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway.config import ModelConfig
from gateway.policy.affinity import AffinityMode, AffinityView, HashRing, place
from gateway.policy.affinity_key import AFFINITY_HEADER, affinity_key
from gateway.policy.routing import Candidate, Locality, RouteDecision, RouteReason

if TYPE_CHECKING:
    from gateway.engine.exchange import Exchange
    from gateway.engine.registry import DeploymentRuntime, ModelRuntime

# Slowness is judged on the fastest of a deployment's last 16 samples. Not a median: a wave of cache
# misses (new conversations, or a gone deployment's rehomed ones) would read as slowness and move more
# conversations, whose misses would then move more (measured: half of all turns spilled with the fastest
# of 5). Not the 60 s window: a home that turned slow would keep its conversations for as long as its fast
# past outweighs its slow present.
RECENT_SAMPLES = 16

# llmgw_affinity_routes_total{result}: how a keyed request's primary attempt was placed.
_RESULTS = {
    RouteReason.AFFINITY_HOME: "home",
    RouteReason.AFFINITY_REHOME: "rehome",
    RouteReason.AFFINITY_SPILL: "spill",
}


class AffinityRouter:
    __slots__ = ("mode", "epsilon", "slow_factor", "ring", "region_rings")

    def __init__(self, cfg: ModelConfig) -> None:
        r = cfg.routing
        self.mode = AffinityMode(r.affinity)
        self.epsilon = r.affinity_epsilon
        self.slow_factor = r.affinity_slow_factor
        self.ring = HashRing([d.id for d in cfg.deployments])
        regions: dict[str, list[str]] = {}
        for d in cfg.deployments:
            regions.setdefault(d.region, []).append(d.id)
        self.region_rings = {region: HashRing(ids) for region, ids in regions.items()}

    @classmethod
    def build(cls, cfg: ModelConfig) -> AffinityRouter | None:
        return None if cfg.routing.affinity == AffinityMode.OFF else cls(cfg)

    def route(
        self, ex: Exchange, m: ModelRuntime, candidates: Sequence[Candidate], tried: set[str], now: float
    ) -> RouteDecision | None:
        """The affine choice for the exchange's next attempt; None: unkeyed, or the usual choice decides."""
        key = ex.affinity_key
        if key is None:
            key = ex.affinity_key = self.key(ex.body, ex.headers)
            if key is None:
                return None
        region = ex.headers.get("x-gateway-region") or ex.engine.home_region
        return self.decide(
            key,
            m.deployments,
            candidates,
            tried,
            region=region,
            locality=m.locality,
            stream=ex.stream,
            now=now,
        )

    @staticmethod
    def count(ex: Exchange, m: ModelRuntime, decision: RouteDecision | None) -> None:
        """One sample of the hit/spill rates per request (its primary attempt)."""
        if ex.affinity_key is None:
            result = "unkeyed"
        else:  # "fallback": nothing on the key's ring could take it, the usual choice did
            result = _RESULTS.get(decision.reason, "fallback") if decision is not None else "fallback"
        metrics = ex.engine.metrics
        metrics.child(metrics.affinity_routes, m.name, result).inc()

    def key(self, body: dict[str, Any], headers: dict[str, str]) -> int | None:
        return affinity_key(self.mode, body, headers.get(AFFINITY_HEADER))

    def decide(
        self,
        key: int,
        deployments: Sequence[DeploymentRuntime],
        candidates: Sequence[Candidate],
        tried: set[str],
        *,
        region: str | None,
        locality: Locality,
        stream: bool,
        now: float,
    ) -> RouteDecision | None:
        """None: the usual choice decides (nothing on the ring is usable, or strict locality has no ring)."""
        ring = self.ring
        if region is not None and locality is not Locality.OFF:
            local = self.region_rings.get(region)
            if local is not None:
                ring = local  # "prefer": when the whole local ring is gone, the usual choice fails over
            elif locality is Locality.STRICT:
                return None
        views = {}
        for d, c in zip(deployments, candidates, strict=True):
            window = d.ttft_window if stream else d.latency_window
            views[d.id] = AffinityView(c.healthy, d.inflight, window.recent_min(RECENT_SAMPLES, now))
        return place(
            ring.order(key), views, exclude=tried, epsilon=self.epsilon, slow_factor=self.slow_factor
        )
