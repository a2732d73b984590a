"""Gauges that describe state, written from that state rather than on events.

An ejection ends by time passing, not by an event, so a gauge set when it starts would stay 1 for good.
Here every state gauge is recomputed from the registry: at scrape time, and in multi-worker runs also
every second by each worker (the scrape is answered by one worker, the pod's value merges them all).
"""

from __future__ import annotations

from typing import Protocol

from gateway.engine.clock import MONOTONIC, Clock
from gateway.engine.registry import Registry
from gateway.policy.outlier import is_ejected
from gateway.telemetry.metrics import Metrics

REFRESH_INTERVAL_S = 1.0


class BackendHealth(Protocol):
    up: bool | None


class StateGauges:
    def __init__(self, registry: Registry, metrics: Metrics, backend: str, clock: Clock = MONOTONIC) -> None:
        self.registry = registry
        self.clock = clock  # the engine's: ejections and cool-downs end on its time
        self.metrics = metrics
        self.backend = backend  # "memory" or "redis": the in-memory backend has nothing to lose touch with
        self.sync: BackendHealth | None = None  # the shared backend's sync, when one is configured

    def refresh(self) -> None:
        m, t = self.metrics, self.clock.now()
        for model in self.registry.models.values():
            healthy = 0
            for d in model.deployments:
                counts = d.client.pool_counts()
                for state, n in counts.items():
                    m.child(m.pool_connections, d.id, state).set(n)
                est = d.ttft if d.ttft.samples else d.latency
                m.child(m.latency_estimate, d.id).set(est.value(t) / 1000.0)
                ejected = is_ejected(d.outlier, t)
                m.child(m.ejected, model.name, d.id).set(1 if ejected else 0)
                healthy += d.available(t)  # what routing prefers: at 0 it routes in panic
            m.child(m.healthy, model.name).set(healthy)
        up = self.backend == "memory" or (self.sync is not None and self.sync.up is True)
        m.child(m.state_up, self.backend).set(1 if up else 0)

    async def run(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Keep this worker's files current for scrapes answered by another worker."""
        while True:
            self.refresh()
            await self.clock.sleep(interval_s)
