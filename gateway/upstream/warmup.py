"""Schema warm-up, one implementation for the server and for `llmgw warmup`.

Each (deployment, schema) pair is one job: a small structured-output request that makes the provider
compile the schema's grammar before a user pays for it. `llmgw warmup` runs one pass and reports; the
server runs its passes in the background, and keeps retrying the failed jobs of required warm-ups with
backoff until they succeed (a provider down at start-up must not leave the pod unready for good).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import WarmupConfig
from gateway.upstream.base import UpstreamClient
from gateway.upstream.schemas import SchemaLearner, WarmupResult, schema_fingerprint, warm_all

log = logging.getLogger("llmgw.warmup")

# (client, model, upstream model, json_schema): one warm-up request.
Job = tuple[UpstreamClient, str, str, dict[str, Any]]

# Required warm-ups that failed are retried after 0.5, 1, 2, 4, 8, 10, 10 ... s: a provider back up is
# warmed (and the pod ready) within about 10 s plus the warm-up's own time.
RETRY_BASE_S = 0.5
RETRY_MAX_S = 10.0


def retry_delay_s(failed_passes: int) -> float:
    return min(RETRY_MAX_S, RETRY_BASE_S * 2.0 ** min(failed_passes, 30))


def unique_schemas(schemas: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for s in schemas:
        seen.setdefault(schema_fingerprint(s), s)
    return list(seen.values())


@dataclass(slots=True)
class ModelWarmup:
    """What one model warms: its config, and a job per (deployment, schema)."""

    name: str
    cfg: WarmupConfig
    jobs: list[Job] = field(default_factory=list)


async def plan(
    models: Iterable[tuple[str, WarmupConfig, list[tuple[UpstreamClient, str]]]],
    learner: SchemaLearner | None,
    load_timeout_s: float = 3.0,
) -> list[ModelWarmup]:
    """The jobs of every model with something to warm: configured schemas, plus learned ones (``learner``).

    ``models``: (name, warmup config, [(client, upstream model) per deployment]).
    """
    out = []
    for name, cfg, deployments in models:
        # load_config reads schema files into dicts: a str left here is a path nothing could read
        schemas = [s for s in cfg.schemas if isinstance(s, dict)]
        if learner is not None and cfg.learn:
            try:
                schemas += await asyncio.wait_for(learner.load(name), timeout=load_timeout_s)
            except Exception as exc:
                log.warning("learned schemas for %s unavailable: %s", name, exc)
        unique = unique_schemas(schemas)
        if unique:
            out.append(ModelWarmup(name, cfg, [(c, name, up, s) for c, up in deployments for s in unique]))
    return out


async def warm_pass(mw: ModelWarmup, jobs: list[Job] | None = None) -> list[WarmupResult]:
    """One pass over ``jobs`` (default: all of the model's), in job order."""
    return await warm_all(
        mw.jobs if jobs is None else jobs,
        timeout_s=mw.cfg.timeout_ms / 1000.0,
        concurrency=mw.cfg.concurrency,
    )


class SchemaWarmup:
    """The server's warm-up: ``done`` once every model had its first pass and every required one is warm."""

    def __init__(
        self,
        models: list[ModelWarmup],
        on_results: Callable[[ModelWarmup, list[Job], list[WarmupResult]], None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        warm: Callable[[ModelWarmup, list[Job]], Awaitable[list[WarmupResult]]] = warm_pass,
    ) -> None:
        self.models = models
        self.on_results = on_results
        self.sleep = sleep
        self.warm = warm
        self.state: dict[str, dict[str, Any]] = {
            m.name: {"state": "running", "ok": 0, "failed": 0, "passes": 0} for m in models
        }

    @property
    def done(self) -> bool:
        """Every model's first pass is over, and every required model is warm."""
        return all(
            self.state[m.name]["state"] == "done"
            if m.cfg.required
            else self.state[m.name]["state"] != "running"
            for m in self.models
        )

    def detail(self) -> dict[str, Any]:
        return {"state": "done" if self.done else "running", "models": self.state}

    async def run(self) -> None:
        await asyncio.gather(*(self._model(m) for m in self.models))

    async def _model(self, mw: ModelWarmup) -> None:
        pending = mw.jobs
        st = self.state[mw.name]
        while True:
            results = await self.warm(mw, pending)
            self.on_results(mw, pending, results)
            st["passes"] += 1
            st["ok"] += sum(r.ok for r in results)
            pending = [j for j, r in zip(pending, results, strict=True) if not r.ok]
            st["failed"] = len(pending)
            if not pending:
                st["state"] = "done"
                return
            if not mw.cfg.required:
                st["state"] = "failed"  # optional: reported, never holds readiness, not retried
                return
            delay = retry_delay_s(st["passes"] - 1)
            st["state"] = "retrying"
            st["next_retry_s"] = delay
            log.error(
                "required warm-up of %s: %d job(s) failed; retrying in %.1f s", mw.name, len(pending), delay
            )
            await self.sleep(delay)
