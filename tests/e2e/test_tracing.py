"""Optional OTLP trace export, end to end: a real gateway exporting to a tiny OTLP/HTTP collector.

The collector is an HTTP server in the test process that decodes what the gateway's exporter posts
to /v1/traces. Tests compare three views of one request: the spans the gateway exported, the
traceparent the simulated provider received, and the traceparent the client sent.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from harness import dep, model, post_chat, priority_model
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

QUICK = {"ttft_ms": 10, "ttft_dist": "fixed", "itl_ms": 2, "tokens": 3, "tail_p": 0}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind values


@dataclass(slots=True)
class ExportedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    service: str


def _value(v: Any) -> Any:
    field = v.WhichOneof("value")
    return getattr(v, field) if field else None


class Collector:
    """An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.posts = 0
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    with collector._lock:
                        collector.posts += 1
                    self.send_error(404)
                    return
                collector._receive(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _receive(self, req: ExportTraceServiceRequest) -> None:
        got = []
        for rs in req.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ExportedSpan(
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            service=resource.get("service.name", ""),
                        )
                    )
        with self._lock:
            self.posts += 1
            self.spans.extend(got)

    def trace(
        self,
        trace_id: str,
        until: Callable[[list[ExportedSpan]], bool],
        timeout: float = 5.0,
    ) -> list[ExportedSpan]:
        """The spans of one trace, once ``until`` holds for them (the exporter sends in batches)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = [s for s in self.spans if s.trace_id == trace_id]
            if until(spans) or time.monotonic() > end:
                return spans
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.stop()


def _chat(gw: Any, stream: bool = False, headers: dict[str, str] | None = None) -> Any:
    r = post_chat(gw, stream=stream, headers=headers)
    assert r.status_code == 200, r.text
    return r


def _one_server_and_clients(n: int) -> Callable[[list[ExportedSpan]], bool]:
    return lambda spans: (
        sum(s.kind == SERVER for s in spans) == 1 and sum(s.kind == CLIENT for s in spans) == n
    )


def _parts(traceparent: str) -> tuple[str, str, str]:
    _, trace_id, parent, flags = traceparent.split("-")
    return trace_id, parent, flags


def _chat_calls(sims: Any, name: str) -> list[dict[str, Any]]:
    return [r for r in sims.stats(name)["recent"] if r["path"] == "/v1/chat/completions"]


def test_a_retried_request_exports_a_server_span_and_one_client_span_per_attempt(
    sims_factory, gateways, collector
):
    sims = sims_factory(
        {"sim-a": ("us-east", {**QUICK, "error_rate": 1.0, "error_status": 503}), "sim-b": ("eu-west", QUICK)}
    )
    gw = gateways(
        {
            "models": [
                priority_model(
                    "chat",
                    [
                        dep("a", sims.base_url("sim-a"), region="us-east"),
                        dep("b", sims.base_url("sim-b"), region="eu-west"),
                    ],
                    retry={
                        "max_retries": 1,
                        "budget_percent": 100,
                        "backoff_base_ms": 1,
                        "backoff_max_ms": 1,
                    },
                )
            ]
        },
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_SERVICE_NAME": "from-env"},
    )
    r = _chat(gw, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"})
    assert r.headers["x-gateway-upstream"] == "b"

    spans = collector.trace(CLIENT_TRACE, _one_server_and_clients(2))
    assert _one_server_and_clients(2)(spans), spans
    server = next(s for s in spans if s.kind == SERVER)
    assert server.parent_id == CLIENT_PARENT  # the client's trace continues, under the client's span
    assert server.service == "from-env"  # the standard variable names the service when the config does not
    # readiness probes (the harness polled /readyz before the request) are not traced; spans leave in order
    assert not [s for s in collector.spans if "readyz" in s.name]
    assert (
        server.attributes.get("http.response.status_code", server.attributes.get("http.status_code")) == 200
    )
    primary, retry = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start_ns)
    assert primary.attributes["llmgw.deployment"] == "a" and primary.attributes["llmgw.region"] == "us-east"
    assert primary.attributes["llmgw.attempt.kind"] == "primary"
    assert primary.attributes["llmgw.attempt.outcome"] == "failed"
    assert primary.attributes["http.response.status_code"] == 503
    assert retry.attributes["llmgw.deployment"] == "b" and retry.attributes["llmgw.region"] == "eu-west"
    assert retry.attributes["llmgw.attempt.kind"] == "retry"
    assert retry.attributes["llmgw.attempt.outcome"] == "ready"
    for att in (primary, retry):
        assert att.parent_id == server.span_id and att.span_id != server.span_id
        assert server.start_ns <= att.start_ns < att.end_ns <= server.end_ns
    assert primary.end_ns <= retry.start_ns

    # What each provider saw: the client's trace, with its own attempt's exported span as parent.
    for name, att in (("sim-a", primary), ("sim-b", retry)):
        (call,) = _chat_calls(sims, name)
        assert _parts(call["traceparent"]) == (CLIENT_TRACE, att.span_id, "01"), name

    # OpenTelemetry's GenAI conventions, and what the gateway knows of the request
    rid = r.headers["x-request-id"]
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes["gen_ai.operation.name"] == "chat"
    assert server.attributes["gen_ai.request.model"] == "chat"
    assert server.attributes["gen_ai.response.model"] == "sim-large"
    assert (
        server.attributes["gen_ai.usage.input_tokens"] > 0
        and server.attributes["gen_ai.usage.output_tokens"] > 0
    )
    assert server.attributes["server.address"] == "127.0.0.1"
    assert server.attributes["llmgw.request_id"] == rid
    assert server.attributes["llmgw.route_reason"] and server.attributes["llmgw.retry_count"] == 1
    for att in (primary, retry):
        assert att.name == "chat sim-large"
        assert (
            att.attributes["gen_ai.operation.name"] == "chat"
            and att.attributes["gen_ai.request.model"] == "sim-large"
        )
        assert att.attributes["server.address"] == "127.0.0.1" and att.attributes["llmgw.request_id"] == rid
    assert (
        retry.attributes["gen_ai.response.model"] == "sim-large"
        and "gen_ai.response.model" not in primary.attributes
    )
    assert retry.attributes["gen_ai.usage.output_tokens"] == server.attributes["gen_ai.usage.output_tokens"]
    assert primary.attributes["error.type"]


def test_a_stream_without_traceparent_starts_a_trace_the_provider_shares(sims_factory, gateways, collector):
    sims = sims_factory({"sim-a": ("us-east", QUICK)})
    # the config key turns export on as well as the standard environment variables do
    gw = gateways(
        {
            "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
            "tracing": {"otlp_endpoint": collector.url, "service_name": "gw-under-test"},
        }
    )
    r = _chat(gw, stream=True)
    assert "data: [DONE]" in r.text
    (call,) = _chat_calls(sims, "sim-a")
    trace_id, parent, flags = _parts(call["traceparent"])
    assert int(flags, 16) & 1  # sampled (the SDK may also set 0x02, "random trace id", of trace context 2)

    spans = collector.trace(trace_id, _one_server_and_clients(1))
    assert _one_server_and_clients(1)(spans), spans
    server = next(s for s in spans if s.kind == SERVER)
    attempt = next(s for s in spans if s.kind == CLIENT)
    assert server.parent_id == ""  # a new trace starts at the gateway: no made-up parent
    assert server.service == "gw-under-test"
    assert parent == attempt.span_id != server.span_id
    assert attempt.parent_id == server.span_id
    assert attempt.attributes["llmgw.deployment"] == "a" and attempt.attributes["llmgw.region"] == "us-east"
    assert attempt.attributes["llmgw.attempt.kind"] == "primary"
    assert attempt.attributes["llmgw.attempt.outcome"] == "ready"
    assert gw.records(wait_for=1)[-1]["traceparent"].split("-")[1] == trace_id


def test_a_hedge_and_its_primary_name_different_exported_spans_upstream(sims_factory, gateways, collector):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "ttft_ms": 400}), "sim-b": ("us-east", QUICK)})
    gw = gateways(
        {
            "models": [
                priority_model(
                    "chat",
                    [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                    routing={"locality": "off"},
                    hedging={"enabled": True, "delay_ms": 50, "min_delay_ms": 0, "budget_percent": 100},
                )
            ]
        },
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url},
    )
    r = _chat(gw, stream=True, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"})
    assert r.headers["x-gateway-upstream"] == "b"
    spans = collector.trace(CLIENT_TRACE, _one_server_and_clients(2))
    assert _one_server_and_clients(2)(spans), spans
    server = next(s for s in spans if s.kind == SERVER)
    attempts = {s.attributes["llmgw.attempt.kind"]: s for s in spans if s.kind == CLIENT}
    assert set(attempts) == {"primary", "hedge"}
    assert attempts["primary"].attributes["llmgw.attempt.outcome"] == "cancelled"
    assert attempts["hedge"].attributes["llmgw.attempt.outcome"] == "ready"
    assert server.attributes["llmgw.hedge_count"] == 1
    seen = {}
    for name, kind in (("sim-a", "primary"), ("sim-b", "hedge")):
        (call,) = _chat_calls(sims, name)
        seen[kind] = _parts(call["traceparent"])[1]
        assert seen[kind] == attempts[kind].span_id and attempts[kind].parent_id == server.span_id, kind
    assert seen["primary"] != seen["hedge"]  # the provider can tell the attempts apart


def test_unsampled_requests_export_nothing_and_say_so_upstream(sims_factory, gateways, collector):
    sims = sims_factory({"sim-a": ("us-east", QUICK)})
    # new traces are not sampled; a client's sampling decision is followed
    gw = gateways(
        {"models": [model("chat", [dep("a", sims.base_url("sim-a"))])]},
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    )
    _chat(gw, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00"})
    _chat(gw)
    _chat(gw, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"})
    client_unsampled, root, client_sampled = (_parts(c["traceparent"]) for c in _chat_calls(sims, "sim-a"))
    assert client_unsampled[0] == CLIENT_TRACE and client_unsampled[2] == "00"
    assert root[0] != CLIENT_TRACE and not int(root[2], 16) & 1  # the provider is told: not sampled
    assert client_sampled[0] == CLIENT_TRACE and client_sampled[2] == "01"
    assert gw.stop() == 0  # shutdown flushes whatever is still queued
    spans = collector.spans
    assert _one_server_and_clients(1)(spans), spans  # only the sampled request's server and attempt span
    attempt = next(s for s in spans if s.kind == CLIENT)
    assert {s.trace_id for s in spans} == {CLIENT_TRACE} and client_sampled[1] == attempt.span_id


def test_with_tracing_off_nothing_is_exported(sims_factory, gateways, collector, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    sims = sims_factory({"sim-a": ("us-east", QUICK)})
    # an empty endpoint (``${OTEL_COLLECTOR:-}`` unset) and other signals' endpoints leave trace export off
    gw = gateways(
        {"models": [model("chat", [dep("a", sims.base_url("sim-a"))])], "tracing": {"otlp_endpoint": ""}},
        env={
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": collector.url + "/v1/traces",
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": collector.url + "/v1/traces",
            "OTEL_TRACES_EXPORTER": "otlp",
        },
    )
    _chat(gw)
    _chat(gw, stream=True)
    assert gw.stop() == 0  # a gateway with export on flushes its batch at shutdown: none may arrive
    assert collector.posts == 0 and collector.spans == []
    assert len(_chat_calls(sims, "sim-a")) == 2
