"""Composition root: config -> state -> upstreams -> engine -> ASGI app, and the app's lifecycle.

Optional parts (shared state, schema warm-up, auth, tracing, the admin listener, CORS) are wired here
from config, each costing the hot path nothing when it is off.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from typing import Any

import orjson

from gateway.api.asgi import GatewayASGI
from gateway.api.docs import build_docs_app
from gateway.config import GatewayConfig, load_config
from gateway.engine.engine import Engine
from gateway.engine.exchange import Exchange
from gateway.engine.gauges import StateGauges
from gateway.engine.interrupt import CancelReason
from gateway.engine.sync import StateSync
from gateway.state.redis import make_state
from gateway.telemetry.accesslog import AccessLog
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.otel import Tracing, otlp_endpoint
from gateway.upstream import warmup
from gateway.upstream.prewarm import keep_warm, prewarm
from gateway.upstream.reachability import ReachabilityBoard
from gateway.upstream.schemas import SchemaLearner, WarmupResult, schema_fingerprint, warm_all
from gateway.upstream.select import make_client

log = logging.getLogger("llmgw")

CONFIG_ENV = "LLMGW_CONFIG"
SERVER_ENV = "LLMGW_SERVER"  # JSON: the server keys `serve` flags override, for every worker
SUPERVISOR_ENV = "LLMGW_SUPERVISOR_PID"  # the process whose death a worker drains at
# uvicorn cancels what still runs this long after the drain time (cli.py): the requests cut short at the
# drain deadline (DRAIN) get that long to send their final answer and be logged.
DRAIN_GRACE_S = 1.0


class Lifecycle:
    """Start-up (pools, warm-up, state sync), readiness, and shutdown (drain) of one worker.

    Ready means this pod can serve: config loaded, listeners up, pools opened, required warm-ups done,
    not draining. Whether each provider can be reached is reported (``deployments`` in /readyz,
    /admin/deployments, ``llmgw_deployment_reachable``) and re-checked, but never holds readiness: a
    pod unready because a provider is down gets no traffic, not even for the models that work.
    """

    def __init__(self, cfg: GatewayConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine
        self.draining = False
        self.started = False
        self.pools_ready = False
        self.warmup: warmup.SchemaWarmup | None = None  # set while required warm-ups can hold readiness
        self.reachability = ReachabilityBoard(
            (d.id for d in engine.registry.deployments), self._on_reachability
        )
        self._tasks: list[asyncio.Task] = []
        self.extra_start: list[Any] = []  # async callables run at start (warm-up, state sync)
        self.extra_stop: list[Any] = []
        self.gauges = StateGauges(engine.registry, engine.metrics, cfg.state.backend, engine.clock)
        self.open: set[Exchange] = set()  # requests in flight (the edge adds and removes them)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        eng = self.engine
        self._loop = asyncio.get_running_loop()
        if eng.access_log is not None:
            eng.access_log.start()
        await eng.start()
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(prewarm(c) for c in eng.registry.clients()))
        for r in results:
            if r.ok:
                log.info("pool %s: %d connection(s) open", r.deployment, r.opened)
            self.reachability.record_check(r, loop.time())
        self.pools_ready = True
        for c in eng.registry.clients():
            interval = c.deployment.pool.keepwarm_interval_s
            if interval > 0:
                self._tasks.append(loop.create_task(keep_warm(c, interval, self._on_keepwarm)))
        self._tasks.append(
            loop.create_task(self.reachability.recheck({c.deployment.id: c for c in eng.registry.clients()}))
        )
        for fn in self.extra_start:
            await fn(self)
        self.gauges.sync = self.engine.sync
        if (
            self.engine.metrics.multiprocess
        ):  # the scrape is answered by one worker: each keeps its files current
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
        t = asyncio.get_running_loop().time()
        if ok:
            self.reachability.record(dep, True, "keep-warm ping answered", t)
        elif failed:
            self.reachability.record(dep, False, f"{failed} keep-warm ping(s) failed", t, avoid=True)

    def _on_reachability(self, dep: str, reachable: bool) -> None:
        m = self.engine.metrics
        m.child(m.reachable, dep).set(1 if reachable else 0)
        avoid = self.reachability.entries[dep].avoid
        t = self.engine.now()
        for model in self.engine.registry.models.values():  # routing and retries follow what the checks saw
            d = model.by_id.get(dep)
            if d is not None:
                d.unreachable = avoid
                model.retry_budget.mark_reachable(dep, reachable, t)

    @property
    def warmup_done(self) -> bool:
        return self.warmup is None or self.warmup.done

    def begin_drain(self) -> None:
        """SIGTERM/SIGINT (called from the signal handler): not ready from now on, and the requests still in
        flight when ``drain_timeout_s`` is up are cut short (DRAIN) before uvicorn cancels their tasks."""
        self.draining = True
        loop = self._loop
        if loop is not None and self._drain_timer is None:
            loop.call_soon_threadsafe(self._arm_drain)

    def _arm_drain(self) -> None:
        if self._drain_timer is None:
            self._drain_timer = asyncio.get_running_loop().call_later(
                self.cfg.server.drain_timeout_s, self.cut_open
            )

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
        warmup_done = self.warmup_done
        detail: dict[str, Any] = {
            "status": "ready",
            "pools_ready": self.pools_ready,
            "warmup_done": warmup_done,
            "draining": self.draining,
        }
        down = self.reachability.unreachable()
        if down:  # reported, not a gate: requests for these fail fast or fall back, the rest are served
            detail["failed_deployments"] = {d: self.reachability.entries[d].detail for d in down}
            detail["unavailable_models"] = [
                m.name
                for m in self.engine.registry.models.values()
                if all(d.id in down for d in m.deployments)
            ]
        if self.warmup is not None:
            detail["warmup"] = self.warmup.detail()
        ready = self.started and self.pools_ready and warmup_done and not self.draining
        if not ready:
            detail["status"] = "draining" if self.draining else "not-ready"
        return ready, detail

    def refresh_gauges(self) -> None:
        self.gauges.refresh()


def build_app(cfg: GatewayConfig, *, region: str | None = None, seed: int | None = None) -> Any:
    home = region or os.environ.get("GATEWAY_REGION") or cfg.server.region
    metrics = Metrics()
    access_log = AccessLog(
        cfg.access_log.path,
        cfg.access_log.format,
        cfg.access_log.queue_size,
        on_drop=metrics.accesslog_dropped.inc,
    )
    engine = Engine(
        cfg, home_region=home, metrics=metrics, access_log=access_log, upstream=make_client, seed=seed
    )
    lifecycle = Lifecycle(cfg, engine)
    backend = make_state(cfg.state)
    engine.state_backend = backend
    if cfg.state.backend == "redis":
        _install_sync(cfg, engine, lifecycle, backend)
    _install_warmup(cfg, engine, lifecycle, backend)
    guard = None
    if cfg.auth.mode == "keys":
        from gateway.security.guard import Guard

        guard = Guard(cfg.auth, backend, engine.metrics, engine.now)  # on the engine's clock
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
    """uvicorn factory for multi-worker runs: the config path, and what `serve`'s flags changed of its
    server section, come from the environment."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set")
    _drain_when_orphaned()
    return build_app(with_server(load_config(path), orjson.loads(os.environ.get(SERVER_ENV, "{}"))))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _drain_when_orphaned() -> None:
    """A worker gets SIGTERM (a drain) when its supervisor dies: a SIGKILLed supervisor left its workers
    serving on the port, unsupervised, and a new gateway could not bind it. Linux only; elsewhere nothing."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not sys.platform.startswith("linux") or not supervisor:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != supervisor:  # it died before the request was made (a worker still starting)
        os.kill(os.getpid(), signal.SIGTERM)


def with_server(cfg: GatewayConfig, changes: dict[str, Any]) -> GatewayConfig:
    """The config with `serve`'s --host, --port and --workers applied, so that what the gateway reports of
    itself (/admin/config) is what runs, not what the file said."""
    if not changes:
        return cfg
    return cfg.model_copy(update={"server": cfg.server.model_copy(update=changes)})


# ---------------------------------------------------------------------- optional parts


def _install_sync(cfg: GatewayConfig, engine: Engine, lifecycle: Lifecycle, backend: Any) -> None:
    sync = StateSync(engine, backend, cfg.state.sync_interval_ms / 1000.0, cfg.state.key_ttl_s)
    engine.sync = sync

    async def start_sync(_lc: Lifecycle) -> None:
        await sync.start()

    async def stop_sync(_lc: Lifecycle) -> None:
        await sync.close()

    lifecycle.extra_start.append(start_sync)
    lifecycle.extra_stop.append(stop_sync)


def _install_warmup(cfg: GatewayConfig, engine: Engine, lifecycle: Lifecycle, backend: Any) -> None:
    """Schema warm-up before ready (gateway/upstream/warmup.py) and learned schemas warmed in the background."""
    learner = SchemaLearner(
        backend,
        ttl_s=max(cfg.state.key_ttl_s, 7 * 86400.0),
        max_per_model=max(m.warmup.learned_max for m in cfg.models),
    )
    if any(m.warmup.learn for m in cfg.models):
        engine.schema_learner = learner

    def count(results: list[WarmupResult]) -> None:
        m = engine.metrics
        for r in results:
            m.child(m.warmup, r.model, r.deployment, "ok" if r.ok else "failed").inc()
            m.child(m.warmup_seconds, r.model, r.deployment).observe(r.ms / 1000.0)

    async def warm_learned(model: str, json_schema: dict[str, Any], skip: str | None = None) -> None:
        m = engine.registry.models[model]
        jobs = [(d.client, m.name, d.upstream_model, json_schema) for d in m.deployments if d.id != skip]
        count(
            await warm_all(
                jobs, timeout_s=m.cfg.warmup.timeout_ms / 1000.0, concurrency=m.cfg.warmup.concurrency
            )
        )

    engine.warm_learned = warm_learned

    def on_results(mw: warmup.ModelWarmup, jobs: list[warmup.Job], results: list[WarmupResult]) -> None:
        count(results)
        for job, r in zip(jobs, results, strict=True):
            (log.info if r.ok else log.error)(
                "warm-up %s/%s schema %s: %s in %.0f ms", r.model, r.deployment, r.schema, r.detail, r.ms
            )
            if r.ok and engine.schema_learner is not None:
                engine.schema_learner.mark(mw.name, schema_fingerprint(job[3]))

    async def start_warmup(lc: Lifecycle) -> None:
        models = await warmup.plan(
            (
                (m.name, m.cfg.warmup, [(d.client, d.upstream_model) for d in m.deployments])
                for m in engine.registry.models.values()
            ),
            learner if engine.schema_learner is not None else None,
            load_timeout_s=2.0,
        )
        if not models:
            return
        run = warmup.SchemaWarmup(models, on_results)
        lc.warmup = run  # readiness waits for the first pass, and for required warm-ups to succeed
        loop = asyncio.get_running_loop()
        lc._tasks.append(loop.create_task(run.run()))
        if not any(mw.cfg.required for mw in models):
            # Nothing required: readiness waits at most the longest warm-up timeout.
            limit = max(mw.cfg.timeout_ms for mw in models) / 1000.0
            lc._tasks.append(loop.create_task(_ready_after(lc, run, limit)))

    lifecycle.extra_start.append(start_warmup)


async def _ready_after(lc: Lifecycle, run: warmup.SchemaWarmup, seconds: float) -> None:
    await asyncio.sleep(seconds)
    if lc.warmup is run and not run.done:
        log.warning("warm-up still running after %.0f s; taking traffic (warm-up not required)", seconds)
        lc.warmup = None
