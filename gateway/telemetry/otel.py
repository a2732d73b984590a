"""Optional OTLP trace export: a server span per request and one span per upstream attempt.

Off unless ``tracing.otlp_endpoint`` or ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set. The server
span comes from OpenTelemetry's ASGI instrumentation (the engine under
opentelemetry-instrumentation-fastapi), wrapped around the whole app because the proxy routes
bypass FastAPI. Attempt spans are written after the request from the timings already taken, with
explicit start/end times, and exported by a BatchSpanProcessor that never blocks a request.

The server span is the gateway's span: its id is the parent every attempt names upstream in
``traceparent``, and the parent of every attempt span, so provider-side records hang off a span that
was exported. Sampling follows the SDK's ``OTEL_TRACES_SAMPLER`` (parent-based by default) and the
decision travels upstream in the trace flags.
"""

from __future__ import annotations

import os
from typing import Any

from gateway.telemetry.views import ExchangeView

DEFAULT_SERVICE_NAME = "llm-gateway"
# Probes and scrapes would otherwise add a root span every few seconds per pod.
DEFAULT_EXCLUDED_URLS = "/healthz$,/readyz$,/metrics$"


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


class Tracing:
    def __init__(self, endpoint: str, service_name: str | None) -> None:
        """``service_name`` None: ``OTEL_SERVICE_NAME`` if set, else the default."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = service_name or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        # Queue size and delay come from OTEL_BSP_* (defaults 2048 spans, 5 s) unless set here; a full
        # queue drops spans rather than waiting.
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint),
            max_queue_size=int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "8192")),
            schedule_delay_millis=float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "500"))))
        self.tracer = self.provider.get_tracer("llm-gateway")

    def wrap(self, app: Any) -> Any:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.util.http import parse_excluded_urls

        # The instrumentor's own variables, so an operator's exclusions carry over; set empty to trace probes.
        env = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", os.environ.get("OTEL_PYTHON_EXCLUDED_URLS"))
        excluded = parse_excluded_urls(DEFAULT_EXCLUDED_URLS if env is None else env)
        return OpenTelemetryMiddleware(app, excluded_urls=excluded, tracer_provider=self.provider,
                                       exclude_spans=["receive", "send"])

    def adopt_server_span(self, ex: ExchangeView) -> None:
        """Send upstream the server span's ids and sampling decision, so the provider's records hang off it."""
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            ex.trace.trace_id = format(ctx.trace_id, "032x")
            ex.trace.span_id = format(ctx.span_id, "016x")
            ex.trace.flags = format(ctx.trace_flags, "02x")

    def record_attempts(self, ex: ExchangeView, rec: dict[str, Any]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

        tc = ex.trace
        flags = TraceFlags(int(tc.flags, 16))
        if not flags.sampled or not ex.attempts:
            return
        # Parent named explicitly, not taken from the current context: the record may be written after
        # the server span's context has been left, and the ids are the ones sent upstream.
        parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
            int(tc.trace_id, 16), int(tc.span_id, 16), is_remote=False, trace_flags=flags)))
        t0, wall0 = ex.t_received, ex.wall_start
        for a in ex.attempts:
            if a.t_end is None:
                continue
            attrs: dict[str, Any] = {
                "llmgw.deployment": a.dep.id, "llmgw.region": a.dep.region, "llmgw.attempt.kind": a.kind.value,
                "llmgw.attempt.outcome": a.state.value, "llmgw.model": ex.model_name,
                "server.address": a.dep.client.host}
            status = a.status if a.status is not None else (a.resp.status if a.resp is not None else None)
            if status is not None:  # none when the attempt never got response headers
                attrs["http.response.status_code"] = status
            if a.failure is not None:
                attrs["error.type"] = a.failure.value
            span = self.tracer.start_span(
                f"upstream {a.kind.value}", context=parent, kind=trace.SpanKind.CLIENT,
                start_time=int((wall0 + (a.t_start - t0)) * 1e9), attributes=attrs)
            if a.failure is not None:
                span.set_status(Status(StatusCode.ERROR, a.error_detail or a.failure.value))
            span.end(end_time=int((wall0 + (a.t_end - t0)) * 1e9))

    def shutdown(self) -> None:
        """Flush what is queued and stop the export thread (blocks: call it off the event loop)."""
        self.provider.shutdown()
