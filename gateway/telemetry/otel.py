"""Optional OTLP trace export: a server span per request and one span per upstream attempt.

Off unless ``tracing.otlp_endpoint`` or ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set. Nothing is
built while a request runs: it is sampled once when it arrives (``sample``: the standard
``OTEL_TRACES_SAMPLER`` names, decided on the ids alone), and a sampled request's spans are written
after it ends from the timings the Exchange already took, with explicit ids and start/end times, then
exported by a BatchSpanProcessor that never blocks a request. An unsampled request costs one decision.

Ids: the server span has the gateway's span id; each attempt span has the id that attempt named as
parent in its upstream ``traceparent`` (``TraceContext.attempt_span_id``), so a provider's records of
a hedge and of its primary hang off two different exported spans. Attributes follow the OpenTelemetry
HTTP and GenAI semantic conventions (``gen_ai.*``), plus the gateway's own (``llmgw.*``).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from gateway.errors import echoed
from gateway.telemetry.sampling import Sampler
from gateway.telemetry.tracing import TraceContext
from gateway.telemetry.views import AttemptView, ExchangeView

DEFAULT_SERVICE_NAME = "llm-gateway"
OPERATIONS = {
    "/chat/completions": "chat",
    "/completions": "text_completion",
    "/embeddings": "embeddings",
    "/responses": "chat",
}


def otlp_endpoint(configured: str | None) -> str | None:
    """The OTLP/HTTP traces URL, or None when export is off.

    The signal-specific variable is a full URL used as is (OTLP exporter spec); the config value and
    the generic variable name the collector's base, to which ``/v1/traces`` is appended unless present.
    """
    if not configured:
        signal_url = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if signal_url:
            return signal_url
    ep = configured or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not ep:
        return None
    ep = ep.rstrip("/")
    return ep if ep.endswith("/v1/traces") else ep + "/v1/traces"


class PresetIdSource(Protocol):
    """An OpenTelemetry id generator whose next ids can be preset (0: draw a random one)."""

    span_id: int
    trace_id: int

    def generate_span_id(self) -> int: ...

    def generate_trace_id(self) -> int: ...


def _preset_ids() -> PresetIdSource:
    """The SDK's id source, told the ids the gateway already sent upstream before each span starts."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        span_id = 0
        trace_id = 0

        def generate_span_id(self) -> int:
            v, self.span_id = self.span_id, 0
            return v or super().generate_span_id()

        def generate_trace_id(self) -> int:
            v, self.trace_id = self.trace_id, 0
            return v or super().generate_trace_id()

    return PresetIds()


def _address(netloc: str | None) -> tuple[str | None, int | None]:
    """(host, port) of ``host[:port]`` or ``[v6][:port]``."""
    if not netloc:
        return None, None
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = rest[1:]
    elif netloc.count(":") == 1:
        host, _, port = netloc.partition(":")
    else:
        host, port = netloc, ""
    return host, int(port) if port.isdigit() else None


def _server_attributes(ex: ExchangeView, rec: dict[str, Any], operation: str) -> dict[str, Any]:
    """HTTP and GenAI conventions for the request as the client saw it, and the gateway's own facts."""
    status = rec["response_code"]
    attrs: dict[str, Any] = {
        "http.request.method": "POST",
        "url.path": ex.path,
        "http.route": ex.path,
        "http.response.status_code": status,
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": echoed(ex.model_name),
        "llmgw.request_id": ex.request_id,
        "llmgw.stream": ex.stream,
        "llmgw.response_flags": rec["response_flags"],
        "llmgw.attempts": rec["attempts"],
        "llmgw.retry_count": rec["retry_count"],
        "llmgw.hedge_count": rec["hedge_count"],
    }
    address, port = _address(ex.headers.get("host"))
    if address:
        attrs["server.address"] = address
        if port:
            attrs["server.port"] = port
    optional = (
        ("gen_ai.response.model", rec["upstream_model"]),
        ("llmgw.route_reason", rec["route_reason"]),
        ("llmgw.deployment", rec["upstream_cluster"]),
        ("llmgw.region", rec["upstream_region"]),
        ("gen_ai.usage.input_tokens", rec["prompt_tokens"]),
        ("gen_ai.usage.output_tokens", rec["completion_tokens"]),
        ("llmgw.fallback_from", rec["fallback_from"]),
        ("error.type", rec["error_type"]),
        ("llmgw.ttft_ms", rec["ttft_ms"]),
    )
    for k, v in optional:
        if v is not None:
            attrs[k] = str(v) if k == "llmgw.route_reason" else v  # a StrEnum: exported as its value
    if status >= 500 and "error.type" not in attrs:
        attrs["error.type"] = str(status)
    return attrs


def _attempt_attributes(
    ex: ExchangeView, a: AttemptView, operation: str, server: dict[str, Any], rec: dict[str, Any]
) -> dict[str, Any]:
    """GenAI conventions for one upstream try as the provider saw it, and its role in the request."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": a.dep.upstream_model,
        "llmgw.request_id": ex.request_id,
        "llmgw.model": echoed(ex.model_name),
        "llmgw.deployment": a.dep.id,
        "llmgw.region": a.dep.region,
        "llmgw.attempt.kind": a.kind.value,
        "llmgw.attempt.index": a.index,
        "llmgw.attempt.outcome": a.state.value,
    }
    host, port = _address(a.dep.client.host)
    if host:
        attrs["server.address"] = host
        if port:
            attrs["server.port"] = port
    status = a.status if a.status is not None else (a.resp.status if a.resp is not None else None)
    if status is not None:  # none when the attempt never got response headers
        attrs["http.response.status_code"] = status
    if a.ok:
        attrs["gen_ai.response.model"] = a.dep.upstream_model
        if a.dep.id == rec["upstream_cluster"]:  # the answer the client got: its usage
            for k in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"):
                if k in server:
                    attrs[k] = server[k]
    if a.failure is not None:
        attrs["error.type"] = a.failure.value
    return attrs


class Tracing:
    def __init__(self, endpoint: str, service_name: str | None) -> None:
        """``service_name`` None: ``OTEL_SERVICE_NAME`` if set, else the default."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        name = service_name or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
        self.sampler = Sampler.from_env()
        self.ids = _preset_ids()
        # The decision is taken on arrival (``sample``): spans written afterwards are all kept.
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: name}),
            sampler=ALWAYS_ON,
            id_generator=self.ids,  # type: ignore[arg-type]  # a RandomIdGenerator
        )
        # Queue size and delay come from OTEL_BSP_* (defaults 2048 spans, 5 s) unless set here; a full
        # queue drops spans rather than waiting.
        self.provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint),
                max_queue_size=int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "8192")),
                schedule_delay_millis=float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "500")),
            )
        )
        self.tracer = self.provider.get_tracer("llm-gateway")

    def sample(self, tc: TraceContext) -> None:
        """On arrival: decide, and tell upstream in the flags; a sampled request's spans are exported."""
        if self.sampler.sampled(tc):
            tc.exported = True
            if not tc.sampled:
                tc.flags = "01"
        elif tc.sampled:
            tc.flags = "00"

    def record(self, ex: ExchangeView, rec: dict[str, Any]) -> None:
        """After the request: its server span and one span per attempt, when it was sampled."""
        tc = ex.trace
        if not tc.exported:
            return
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

        t0, wall0 = ex.t_received, ex.wall_start

        def ns(t: float) -> int:
            return int((wall0 + (t - t0)) * 1e9)

        if tc.parent_id is not None:  # the client's span, remote
            parent = trace.set_span_in_context(
                NonRecordingSpan(
                    SpanContext(
                        int(tc.trace_id, 16), int(tc.parent_id, 16), is_remote=True, trace_flags=TraceFlags(1)
                    )
                )
            )
        else:
            parent = Context()
            self.ids.trace_id = int(tc.trace_id, 16)
        operation = OPERATIONS.get(ex.upstream_path, "chat")
        attrs = _server_attributes(ex, rec, operation)
        self.ids.span_id = int(tc.span_id, 16)
        server = self.tracer.start_span(
            f"POST {ex.path}", context=parent, kind=trace.SpanKind.SERVER, start_time=ns(t0), attributes=attrs
        )
        if rec["response_code"] >= 500:
            server.set_status(Status(StatusCode.ERROR))
        under_server = trace.set_span_in_context(server)
        for a in ex.attempts:
            if a.t_end is None:
                continue
            self.ids.span_id = int(tc.attempt_span_id(a.index), 16)
            span = self.tracer.start_span(
                f"{operation} {a.dep.upstream_model}",
                context=under_server,
                kind=trace.SpanKind.CLIENT,
                start_time=ns(a.t_start),
                attributes=_attempt_attributes(ex, a, operation, attrs, rec),
            )
            if a.failure is not None:
                span.set_status(Status(StatusCode.ERROR, a.error_detail or a.failure.value))
            span.end(end_time=ns(a.t_end))
        server.end(end_time=ns(t0 + rec["duration_ms"] / 1000.0))

    def shutdown(self) -> None:
        """Flush what is queued and stop the export thread (blocks: call it off the event loop)."""
        self.provider.shutdown()
