"""Composition root: config -> state -> upstreams -> engine -> ASGI app, and the app's lifecycle."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from typing import Any

from gateway.api.asgi import GatewayASGI
from gateway.api.docs import build_docs_app
from gateway.config import GatewayConfig, load_config
from gateway.engine.engine import Engine
from gateway.engine.exchange import Exchange
from gateway.engine.gauges import StateGauges
from gateway.engine.interrupt import CancelReason
from gateway.telemetry.accesslog import AccessLog
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.otel import Tracing, otlp_endpoint
from gateway.upstream.prewarm import keep_warm, prewarm
from gateway.upstream.select import make_client

log = logging.getLogger("llmgw")

CONFIG_ENV = "LLMGW_CONFIG"
# uvicorn cancels what still runs this long after the drain time (cli.py): the requests cut short at the
# drain deadline (DRAIN) get that long to send their final answer and be logged.
DRAIN_GRACE_S = 1.0


class Lifecycle:
    """Start-up (pools, warm-up, state sync), readiness, and shutdown (drain) of one worker."""

    def __init__(self, cfg: GatewayConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine
        self.draining = False
        self.started = False
        self.pools_ready = False
        self.warmup_done = True
        self.warmup_detail: dict[str, Any] = {}
        self.prewarm_failures: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []
        self.extra_start: list[Any] = []  # async callables run at start (warm-up, state sync)
        self.extra_stop: list[Any] = []
        self.gauges = StateGauges(engine.registry, engine.metrics, cfg.state.backend)
        self.open: set[Exchange] = set()  # requests in flight (the edge adds and removes them)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        eng = self.engine
        self._loop = asyncio.get_running_loop()
        if eng.access_log is not None:
            eng.access_log.start()
        await eng.start()
        results = await asyncio.gather(*(prewarm(c) for c in eng.registry.clients()))
        for r in results:
            if r.ok:
                log.info("pool %s: %d connection(s) open", r.deployment, r.opened)
            else:
                self.prewarm_failures[r.deployment] = r.detail
                log.error("deployment %s failed its start-up check: %s", r.deployment, r.detail)
        self.pools_ready = True
        for c in eng.registry.clients():
            interval = c.deployment.pool.keepwarm_interval_s
            if interval > 0:
                self._tasks.append(asyncio.get_running_loop().create_task(
                    keep_warm(c, interval, self._on_keepwarm)))
        for fn in self.extra_start:
            await fn(self)
        self.gauges.sync = self.engine.sync
        if self.engine.metrics.multiprocess:  # the scrape is answered by one worker: each keeps its files current
            self._tasks.append(asyncio.get_running_loop().create_task(self.gauges.run()))
        self._freeze_startup_objects()
        self.started = True

    def _freeze_startup_objects(self) -> None:
        """Take what start-up built (modules, config, pools: it lives as long as the process) out of the
        cyclic GC's view. Full collections otherwise walk all of it, every few seconds under load: pauses
        of 40-70 ms that every request in flight waits out (docs/benchmarks.md, "Tail latency under load")."""
        gc.collect()
        gc.freeze()
        self.engine.metrics.gc_frozen.set(gc.get_freeze_count())

    def _on_keepwarm(self, dep: str, ok: int, failed: int) -> None:
        m = self.engine.metrics
        if ok:
            m.child(m.keepwarm, dep, "ok").inc(ok)
        if failed:
            m.child(m.keepwarm, dep, "failed").inc(failed)

    def begin_drain(self) -> None:
        """SIGTERM/SIGINT (called from the signal handler): not ready from now on, and the requests still in
        flight when ``drain_timeout_s`` is up are cut short (DRAIN) before uvicorn cancels their tasks."""
        self.draining = True
        loop = self._loop
        if loop is not None and self._drain_timer is None:
            loop.call_soon_threadsafe(self._arm_drain)

    def _arm_drain(self) -> None:
        if self._drain_timer is None:
            self._drain_timer = asyncio.get_running_loop().call_later(self.cfg.server.drain_timeout_s, self.cut_open)

    def cut_open(self) -> None:
        """The drain time is up: each open request answers 503 draining, or ends its stream with an error event."""
        if self.open:
            log.warning("drain timeout: cutting %d request(s) short", len(self.open))
        for ex in list(self.open):
            ex.cancel(CancelReason.DRAIN)

    async def stop(self) -> None:
        self.draining = True
        await self.engine.drain(self.cfg.server.drain_timeout_s)
        for t in self._tasks:
            t.cancel()
        for fn in self.extra_stop:
            await fn(self)
        await self.engine.close()
        if self.engine.access_log is not None:
            self.engine.access_log.close()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {
            "status": "ready",
            "pools_ready": self.pools_ready,
            "warmup_done": self.warmup_done,
            "draining": self.draining,
        }
        if self.prewarm_failures:
            detail["failed_deployments"] = self.prewarm_failures
        if self.warmup_detail:
            detail["warmup"] = self.warmup_detail
        ready = self.started and self.pools_ready and self.warmup_done and not self.draining
        # A deployment failing its start-up check does not block readiness while others of its model work.
        if ready and self.prewarm_failures:
            for m in self.engine.registry.models.values():
                if all(d.id in self.prewarm_failures for d in m.deployments):
                    ready = False
                    detail["unavailable_models"] = detail.get("unavailable_models", []) + [m.name]
        if not ready:
            detail["status"] = "draining" if self.draining else "not-ready"
        return ready, detail

    def refresh_gauges(self) -> None:
        self.gauges.refresh()


def build_app(cfg: GatewayConfig, *, region: str | None = None, seed: int | None = None) -> Any:
    home = region or os.environ.get("GATEWAY_REGION") or cfg.server.region
    metrics = Metrics()
    access_log = AccessLog(cfg.access_log.path, cfg.access_log.format, cfg.access_log.queue_size,
                           on_drop=metrics.accesslog_dropped.inc)
    engine = Engine(cfg, home_region=home, metrics=metrics, access_log=access_log, upstream=make_client, seed=seed)
    lifecycle = Lifecycle(cfg, engine)
    from gateway.features import install_features

    guard = install_features(cfg, engine, lifecycle)
    edge = GatewayASGI(engine, build_docs_app(engine, lifecycle), lifecycle, guard)
    app: Any = edge
    endpoint = otlp_endpoint(cfg.tracing.otlp_endpoint)
    if endpoint:
        # An unset service_name lets OTEL_SERVICE_NAME name the service, as the SDK's users expect.
        named = cfg.tracing.service_name if "service_name" in cfg.tracing.model_fields_set else None
        tracing = Tracing(endpoint, named)
        engine.tracing = tracing
        engine.on_record.append(tracing.record)

        async def stop_tracing(_lc: Any) -> None:
            await asyncio.to_thread(tracing.shutdown)  # the final export must not stall the admin listener

        lifecycle.extra_stop.append(stop_tracing)
    if cfg.server.admin_port is not None:
        from gateway.api.admin import AdminServer

        admin = AdminServer(edge.serve_admin, cfg.server.host, cfg.server.admin_port)
        lifecycle.extra_start.insert(0, admin.start)  # probes answer while warm-up runs
        lifecycle.extra_stop.append(admin.stop)  # ... and through the drain
    if cfg.server.cors_origins:  # off by default: the hot path stays unwrapped
        from gateway.api.cors import CORSMiddleware

        app = CORSMiddleware(app, cfg.server.cors_origins)
    return app


def create_app() -> Any:
    """uvicorn factory for multi-worker runs: the config path comes from the environment."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set")
    return build_app(load_config(path))
