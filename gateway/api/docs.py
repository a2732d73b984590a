"""The FastAPI side of the app: OpenAPI docs for the proxy surface, and read-only admin views.

The proxy routes declared here document the API (``/docs``, ``/openapi.json``); requests to them are
served by ``api/asgi.py`` before FastAPI sees them, so no pydantic model is built per request.
"""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI

from gateway.api.types import Lifecycle
from gateway.config import redact
from gateway.engine.engine import Engine
from gateway.policy.outlier import is_ejected
from gateway.telemetry.timing import now

_EXAMPLE = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def build_docs_app(engine: Engine, lifecycle: Lifecycle) -> FastAPI:
    app = FastAPI(
        title="llm-gateway",
        version="0.1.0",
        description="OpenAI-compatible, latency-aware LLM gateway. Point the OpenAI SDK's base_url at /v1.",
    )

    def _proxy_doc(path: str, summary: str) -> None:
        @app.post(path, summary=summary, tags=["OpenAI-compatible"])
        async def _doc(
            body: dict[str, Any] = Body(..., examples=[_EXAMPLE]),
        ) -> dict[str, Any]:  # pragma: no cover
            raise RuntimeError("served by the proxy edge")

    _proxy_doc("/v1/chat/completions", "Chat completion (stream or not), routed by the body's model")
    _proxy_doc("/v1/completions", "Legacy text completion")
    _proxy_doc("/v1/embeddings", "Embeddings")
    _proxy_doc("/v1/responses", "Responses API")

    @app.get("/admin/deployments", tags=["admin"], summary="Live routing view of every deployment")
    async def deployments() -> dict[str, Any]:
        t = now()
        out = []
        for m in engine.registry.models.values():
            for d in m.deployments:
                out.append(
                    {
                        "model": m.name,
                        "deployment": d.id,
                        "region": d.region,
                        "inflight": d.inflight,
                        "healthy": d.healthy(t),
                        "ejected": is_ejected(d.outlier, t),
                        "ejected_for_s": round(max(0.0, d.outlier.ejected_until - t), 1),
                        "cooling_down_for_s": round(max(0.0, d.cooldown_until - t), 1),  # after a 429
                        "consecutive_failures": d.outlier.consecutive_failures,
                        "ttft_estimate_ms": round(d.ttft.value(t), 1),
                        "ttft_samples": d.ttft.samples,
                        "latency_estimate_ms": round(d.latency.value(t), 1),
                        "latency_samples": d.latency.samples,
                        "pool": d.client.pool_counts(),
                        "connections_opened": d.client.connections_opened,
                        "failure_rate": round(m.retry_budget.failure_rate(d.id, t), 3),
                        **_reachability(lifecycle, d.id),
                    }
                )
        return {"home_region": engine.home_region, "deployments": out}

    @app.get("/admin/config", tags=["admin"], summary="The running config, secrets redacted")
    async def config() -> dict[str, Any]:
        return redact(engine.cfg)

    return app


def _reachability(lifecycle: Lifecycle, deployment: str) -> dict[str, Any]:
    """Whether the deployment answers its checks (start-up, keep-warm, re-checks while down)."""
    e = lifecycle.reachability.entries.get(deployment)
    return {"reachable": e.reachable if e else None, "reachability_detail": e.detail if e else "not checked"}
