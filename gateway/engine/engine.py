"""The engine: runtime registry, upstream clients, telemetry sinks; ends every Exchange as one record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gateway import errors
from gateway.config import DeploymentConfig, GatewayConfig
from gateway.engine.alarms import Alarms
from gateway.engine.clock import MONOTONIC, Clock
from gateway.engine.registry import DeploymentRuntime, ModelRuntime, Registry
from gateway.engine.sync import StateSync
from gateway.errors import GatewayError
from gateway.policy.deadline import Deadline, DeadlineSource, resolve_deadline
from gateway.policy.hedging import parse_hedge_header
from gateway.state.base import StateBackend
from gateway.telemetry.accesslog import AccessLog
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.otel import Tracing
from gateway.telemetry.views import ExchangeView
from gateway.upstream.base import UpstreamClient
from gateway.upstream.schemas import SchemaLearner

log = logging.getLogger("llmgw")

# Client headers never forwarded upstream: hop-by-hop (RFC 9110 7.6.1), credentials meant for the
# gateway, and what the gateway sets itself.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "authorization",
        "api-key",
        "cookie",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "accept-encoding",
        "expect",
        "traceparent",
        "tracestate",
        "x-request-id",
    }
)


class WinningAttempt(Protocol):
    @property
    def dep(self) -> DeploymentRuntime: ...


class EndedExchange(ExchangeView, Protocol):
    """What ``finish`` and the record hooks (tracing: ``ExchangeView``) read of a request that has ended
    (``exchange.Exchange``); a Protocol so this module does not import the exchange, which imports it."""

    @property
    def stream(self) -> bool: ...

    @property
    def status(self) -> int: ...

    @property
    def body(self) -> dict[str, Any]: ...

    @property
    def served_model(self) -> ModelRuntime | None: ...

    @property
    def winner(self) -> WinningAttempt | None: ...

    def record(self) -> dict[str, Any]: ...


RecordHook = Callable[[EndedExchange, dict[str, Any]], None]  # (the ended exchange, its access-log record)
WarmLearned = Callable[
    [str, dict[str, Any], str | None], Awaitable[None]
]  # (model, json_schema, skip deployment)


class Engine:
    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        home_region: str | None,
        metrics: Metrics,
        access_log: AccessLog | None,
        upstream: Callable[[DeploymentConfig], UpstreamClient],
        seed: int | None = None,
        clock: Clock = MONOTONIC,
    ) -> None:
        """``upstream``: builds each deployment's client (``upstream.select.make_client`` in production: the
        engine knows clients only by the Protocols of upstream/base.py); ``clock``: the request path's time."""
        self.cfg = cfg
        self.home_region = home_region
        self.clock = clock
        self.now = clock.now
        self.registry = Registry(cfg, home_region, seed, upstream)
        self.metrics = metrics
        self.access_log = access_log
        self.inflight = 0
        self.max_inflight = cfg.server.max_inflight
        self.sync: StateSync | None = None  # set by the app when a backend is configured
        self.schema_learner: SchemaLearner | None = None
        self.on_record: list[RecordHook] = []  # hooks called with each access-log record (tracing)
        self.warm_learned: WarmLearned | None = None
        self.state_backend: StateBackend | None = None
        self.tracing: Tracing | None = None  # when OTLP export is on
        self.alarms = Alarms(
            clock
        )  # every request's deadlines (first token, hedge, stream idle) on one loop timer
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

    def check_request(
        self, model_name: str, headers: dict[str, str], t_received: float
    ) -> tuple[Deadline, GatewayError | None]:
        """What a request's model and headers decide before any attempt, for every caller alike: its deadline
        (the earliest of the model's ``total_ms`` and the client's and SDK's timeout headers), or the error
        that answers it at once: an unknown model, a malformed timeout or ``x-gateway-hedge`` header, an
        ``x-gateway-deployment`` naming no deployment of the model (a debugging pin that cannot hold is
        said, not routed elsewhere). Such a mistake is the client's: it never shows as an attempt against a
        deployment. With an error the deadline is only what the record needs."""
        model = self.registry.models.get(model_name)
        if model is None:
            return Deadline(t_received, DeadlineSource.TOTAL), errors.model_not_found(model_name)
        deadline, err = self._deadline(model, headers, t_received)
        if err is None and ("x-gateway-hedge" in headers or "x-gateway-deployment" in headers):
            err = _routing_header_error(model, headers)
        return deadline, err

    @staticmethod
    def _deadline(
        model: ModelRuntime, headers: dict[str, str], t_received: float
    ) -> tuple[Deadline, GatewayError | None]:
        client_ms = headers.get("x-gateway-timeout-ms")
        sdk_s = headers.get("x-stainless-timeout")
        sdk_read_s = headers.get("x-stainless-read-timeout")
        if (
            client_ms is None and sdk_s is None and sdk_read_s is None
        ):  # the usual case: the model's total alone
            return Deadline(t_received + model.total_s, DeadlineSource.TOTAL), None
        try:
            return resolve_deadline(
                t_received,
                model.total_s * 1000.0,
                client_ms,
                sdk_s,
                sdk_read_s,
                model.cfg.timeouts.sdk_reply_margin_ms,
            ), None
        except ValueError as exc:
            return Deadline(t_received, DeadlineSource.TOTAL), errors.bad_request(
                str(exc), code="invalid_header"
            )

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

    def on_ejected(self, dep: DeploymentRuntime, failures: int) -> None:
        """``failures``: the consecutive failures that ejected it (the outlier state is reset by then)."""
        self.metrics.child(
            self.metrics.ejections, dep.id
        ).inc()  # llmgw_deployment_ejected: engine.gauges, from state
        log.warning(
            "deployment %s ejected for %.0f s after %d consecutive failures",
            dep.id,
            dep.outlier.ejected_until - self.now(),
            failures,
        )
        if self.sync is not None:
            self.sync.publish_ejection(dep)

    def finish(self, ex: EndedExchange) -> None:
        """Exactly once per request: access-log record and metrics."""
        self.inflight -= 1
        self._inflight_gauge.dec()
        rec = ex.record()
        m = self.metrics
        model = rec["model"] if ex.served_model is not None or ex.status != 404 else "-"
        if model != "-" and model not in self.registry.models:
            model = "-"  # unknown model names are client-chosen: keep label values bounded
        dep = rec["upstream_cluster"] or "-"
        m.child(
            self._requests,
            model,
            dep,
            rec["upstream_region"] or "-",
            str(rec["response_code"]),
            rec["response_flags"],
        ).inc()
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

    def _learn_schema(self, ex: EndedExchange) -> None:
        rf = ex.body.get("response_format")
        if type(rf) is not dict or rf.get("type") != "json_schema":
            return
        js = rf.get("json_schema")
        if type(js) is not dict or type(js.get("schema")) is not dict:
            return
        m = ex.served_model
        learner, warm = self.schema_learner, self.warm_learned
        if m is None or learner is None or warm is None or not m.cfg.warmup.learn:
            return
        skip = ex.winner.dep.id if ex.winner is not None else None
        learner.observe(m.name, js, lambda model, schema: warm(model, schema, skip))

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


def _routing_header_error(model: ModelRuntime, headers: dict[str, str]) -> GatewayError | None:
    hedge = headers.get("x-gateway-hedge")
    if hedge is not None:
        try:
            parse_hedge_header(hedge)  # the delay itself is decided when the first attempt starts
        except ValueError as exc:
            return errors.bad_request(str(exc), code="invalid_header")
    pinned = headers.get("x-gateway-deployment")
    if pinned is not None and pinned not in model.by_id:
        return errors.bad_request(
            f"x-gateway-deployment: {pinned[:100]!r} is not a deployment of model {model.name!r} "
            f"(its deployments: {', '.join(model.by_id)}).",
            code="invalid_header",
        )
    return None
