"""Optional behaviours wired at start-up from config: shared state, warm-up, auth.

Kept out of app.py so the composition root stays a straight line; each feature attaches itself to
the engine and the lifecycle, and costs the hot path nothing when it is off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.config import GatewayConfig
from gateway.engine.sync import StateSync
from gateway.state.redis import make_state
from gateway.upstream.schemas import SchemaLearner, WarmupResult, warm_all

log = logging.getLogger("llmgw.warmup")


def install_features(cfg: GatewayConfig, engine: Any, lifecycle: Any) -> Any:
    """Attach configured features; returns the auth guard (None when auth is off)."""
    backend = make_state(cfg.state)
    engine.state_backend = backend
    if cfg.state.backend == "redis":
        sync = StateSync(engine, backend, cfg.state.sync_interval_ms / 1000.0, cfg.state.key_ttl_s)
        engine.sync = sync

        async def start_sync(_lc: Any) -> None:
            await sync.start()

        async def stop_sync(_lc: Any) -> None:
            await sync.close()

        lifecycle.extra_start.append(start_sync)
        lifecycle.extra_stop.append(stop_sync)
    _install_warmup(cfg, engine, lifecycle, backend)
    if cfg.auth.mode == "keys":
        from gateway.security.guard import Guard

        return Guard(cfg.auth, backend, engine.metrics)
    return None


def _install_warmup(cfg: GatewayConfig, engine: Any, lifecycle: Any, backend: Any) -> None:
    learner = SchemaLearner(backend, ttl_s=max(cfg.state.key_ttl_s, 7 * 86400.0),
                            max_per_model=max(m.warmup.learned_max for m in cfg.models))
    if any(m.warmup.learn for m in cfg.models):
        engine.schema_learner = learner

    async def warm_learned(model: str, json_schema: dict[str, Any], skip: str | None = None) -> None:
        m = engine.registry.models[model]
        jobs = [(d.client, m.name, d.upstream_model, json_schema) for d in m.deployments if d.id != skip]
        results = await warm_all(jobs, timeout_s=m.cfg.warmup.timeout_ms / 1000.0,
                                 concurrency=m.cfg.warmup.concurrency)
        _count(engine, results)

    engine.warm_learned = warm_learned

    async def start_warmup(lc: Any) -> None:
        jobs_by_model = {}
        for m in engine.registry.models.values():
            schemas = list(m.cfg.warmup.schemas)
            if m.cfg.warmup.learn:
                try:
                    schemas += await asyncio.wait_for(learner.load(m.name), timeout=2.0)
                except Exception as exc:
                    log.warning("could not load learned schemas for %s: %s", m.name, exc)
            if schemas:
                jobs_by_model[m.name] = [(d.client, m.name, d.upstream_model, s) for d in m.deployments
                                         for s in _unique(schemas)]
        if not jobs_by_model:
            return
        lc.warmup_done = False
        lc.warmup_detail = {"state": "running"}
        loop = asyncio.get_running_loop()
        task = loop.create_task(_run_warmup(engine, lc, jobs_by_model))
        lc._tasks.append(task)
        optional = [engine.registry.models[n] for n in jobs_by_model
                    if not engine.registry.models[n].cfg.warmup.required]
        if optional and len(optional) == len(jobs_by_model):
            # Nothing required: readiness waits at most the longest warm-up timeout.
            limit = max(m.cfg.warmup.timeout_ms for m in optional) / 1000.0
            lc._tasks.append(loop.create_task(_ready_after(lc, limit)))

    lifecycle.extra_start.append(start_warmup)


def _unique(schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from gateway.upstream.schemas import schema_fingerprint

    seen: dict[str, dict[str, Any]] = {}
    for s in schemas:
        seen.setdefault(schema_fingerprint(s), s)
    return list(seen.values())


async def _ready_after(lc: Any, seconds: float) -> None:
    await asyncio.sleep(seconds)
    if not lc.warmup_done:
        log.warning("warm-up still running after %.0f s; taking traffic (warm-up not required)", seconds)
        lc.warmup_done = True


async def _run_warmup(engine: Any, lc: Any, jobs_by_model: dict[str, list]) -> None:
    required_failed = []
    summary: dict[str, Any] = {}
    for name, jobs in jobs_by_model.items():
        m = engine.registry.models[name]
        results = await warm_all(jobs, timeout_s=m.cfg.warmup.timeout_ms / 1000.0,
                                 concurrency=m.cfg.warmup.concurrency)
        _count(engine, results)
        for r in results:
            (log.info if r.ok else log.error)("warm-up %s/%s schema %s: %s in %.0f ms", r.model, r.deployment,
                                              r.schema, r.detail, r.ms)
            if engine.schema_learner is not None and r.ok:
                from gateway.upstream.schemas import schema_fingerprint

                for job in jobs:
                    engine.schema_learner.mark(name, schema_fingerprint(job[3]))
        failed = [r for r in results if not r.ok]
        summary[name] = {"ok": len(results) - len(failed), "failed": len(failed)}
        if failed and m.cfg.warmup.required:
            required_failed.append(name)
    lc.warmup_detail = {"state": "failed" if required_failed else "done", "models": summary}
    if required_failed:
        log.error("required warm-up failed for %s: not ready", ", ".join(required_failed))
        return
    lc.warmup_done = True


def _count(engine: Any, results: list[WarmupResult]) -> None:
    m = engine.metrics
    for r in results:
        m.child(m.warmup, r.model, r.deployment, "ok" if r.ok else "failed").inc()
        m.child(m.warmup_seconds, r.model, r.deployment).observe(r.ms / 1000.0)
