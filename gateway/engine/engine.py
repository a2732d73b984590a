"""The engine: runtime registry, upstream clients, telemetry sinks; ends every Exchange as one record."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from gateway.config import GatewayConfig
from gateway.engine.alarms import Alarms
from gateway.engine.registry import DeploymentRuntime, Registry
from gateway.telemetry.accesslog import AccessLog
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.timing import now

if TYPE_CHECKING:
    from gateway.engine.exchange import Exchange

log = logging.getLogger("llmgw")

# Client headers never forwarded upstream: hop-by-hop (RFC 9110 7.6.1), credentials meant for the
# gateway, and what the gateway sets itself.
_NOT_FORWARDED = frozenset({
    "host", "content-length", "content-type", "authorization", "api-key", "cookie", "connection", "keep-alive",
    "proxy-authorization", "proxy-authenticate", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "accept-encoding", "expect", "traceparent", "tracestate", "x-request-id",
})


class Engine:
    def __init__(self, cfg: GatewayConfig, *, home_region: str | None, metrics: Metrics,
                 access_log: AccessLog | None, seed: int | None = None) -> None:
        self.cfg = cfg
        self.home_region = home_region
        self.registry = Registry(cfg, home_region, seed)
        self.metrics = metrics
        self.access_log = access_log
        self.inflight = 0
        self.max_inflight = cfg.server.max_inflight
        self.sync: Any = None  # engine.sync.StateSync, set by the app when a backend is configured
        self.schema_learner: Any = None  # upstream.schemas.SchemaLearner
        self.on_record: list[Any] = []  # hooks called with each access-log record (tracing)
        self.warm_learned: Any = None  # async (model, json_schema, skip_deployment) -> None
        self.state_backend: Any = None
        self.tracing: Any = None  # telemetry.otel.Tracing when OTLP export is on
        self.alarms = Alarms()  # every request's deadlines (first token, hedge, stream idle) on one loop timer
        self._inflight_gauge = metrics.inflight
        self._requests = metrics.requests
        self._forward_cache: dict[str, bool] = {}

    async def start(self) -> None:
        for c in self.registry.clients():
            await c.start()

    async def close(self) -> None:
        for c in self.registry.clients():
            await c.close()

    # ------------------------------------------------------------------ request path helpers

    def admit(self) -> bool:
        """Gateway-wide concurrency limit: overflow is refused at once, never queued without bound."""
        if self.max_inflight and self.inflight >= self.max_inflight:
            self.metrics.child(self.metrics.overflow, "gateway").inc()
            return False
        self.inflight += 1
        self._inflight_gauge.inc()
        return True

    def upstream_headers(self, client_headers: dict[str, str], request_id: str) -> dict[str, str]:
        """Client headers worth forwarding (x-*, openai-*, user-agent ...), minus credentials and hop-by-hop."""
        out = {"x-request-id": request_id}
        cache = self._forward_cache
        for k, v in client_headers.items():
            ok = cache.get(k)
            if ok is None:
                ok = cache[k] = k not in _NOT_FORWARDED and not k.startswith(("x-gateway-", "proxy-"))
                if len(cache) > 4096:  # headers are client-chosen: keep the cache bounded
                    cache.clear()
            if ok:
                out[k] = v
        conn = client_headers.get("connection")
        if conn:  # headers the client named in Connection are hop-by-hop too (RFC 9110 7.6.1)
            for name in conn.lower().split(","):
                out.pop(name.strip(), None)
            out["x-request-id"] = request_id
        return out

    def on_ejected(self, dep: DeploymentRuntime) -> None:
        self.metrics.child(self.metrics.ejections, dep.id).inc()  # llmgw_deployment_ejected: engine.gauges, from state
        log.warning("deployment %s ejected for %.0f s after %d consecutive failures", dep.id,
                    dep.outlier.ejected_until - now(), dep.outlier.consecutive_failures)
        if self.sync is not None:
            self.sync.publish_ejection(dep)

    def finish(self, ex: Exchange) -> None:
        """Exactly once per request: access-log record and metrics."""
        self.inflight -= 1
        self._inflight_gauge.dec()
        rec = ex.record()
        m = self.metrics
        model = rec["model"] if ex.served_model is not None or ex.status != 404 else "-"
        if model != "-" and model not in self.registry.models:
            model = "-"  # unknown model names are client-chosen: keep label values bounded
        dep = rec["upstream_cluster"] or "-"
        m.child(self._requests, model, dep, rec["upstream_region"] or "-", str(rec["response_code"]),
                rec["response_flags"]).inc()
        stream = "true" if ex.stream else "false"
        m.child(m.request_duration, model, stream).observe(rec["duration_ms"] / 1000.0)
        m.child(m.overhead, model).observe(rec["gateway_overhead_ms"] / 1000.0)
        if rec["ttft_ms"] is not None:
            m.child(m.ttft, model, dep, stream).observe(rec["ttft_ms"] / 1000.0)
        if ex.winner is not None and rec["upstream_service_time_ms"] is not None:
            m.child(m.upstream_duration, model, dep).observe(rec["upstream_service_time_ms"] / 1000.0)
        if rec["prompt_tokens"]:
            m.child(m.tokens, model, "prompt").inc(rec["prompt_tokens"])
        if rec["completion_tokens"]:
            m.child(m.tokens, model, "completion").inc(rec["completion_tokens"])
        if self.access_log is not None:
            self.access_log.write(rec)
        if self.schema_learner is not None and ex.served_model is not None:
            self._learn_schema(ex)
        for hook in self.on_record:
            hook(ex, rec)

    def _learn_schema(self, ex: Exchange) -> None:
        rf = ex.body.get("response_format")
        if type(rf) is not dict or rf.get("type") != "json_schema":
            return
        js = rf.get("json_schema")
        if type(js) is not dict or type(js.get("schema")) is not dict:
            return
        m = ex.served_model
        if not m.cfg.warmup.learn:
            return
        skip = ex.winner.dep.id if ex.winner is not None else None
        warm = self.warm_learned
        self.schema_learner.observe(m.name, js, lambda model, schema: warm(model, schema, skip))

    def record_rejected(self, rec: dict[str, Any]) -> None:
        """A request refused before an Exchange existed (bad input, auth, limits): log it the same way."""
        m = self.metrics
        m.child(self._requests, "-", "-", "-", str(rec["response_code"]), rec["response_flags"]).inc()
        if self.access_log is not None:
            self.access_log.write(rec)

    async def drain(self, timeout_s: float) -> bool:
        """Wait for in-flight requests to finish; True when they all did."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while self.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.05)
        return self.inflight == 0
