"""The ASGI edge: a plain ASGI callable for the proxy hot path, FastAPI for everything else.

Proxy routes are looked up in a dict and handled without a framework (no pydantic models, no
middleware stack per request). Everything not on the hot path (OpenAPI docs, admin views) is served
by the FastAPI app mounted behind it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from itertools import chain
from types import FrameType
from typing import Any, Final

import orjson

from gateway import errors
from gateway.api.edge import EdgeLimits
from gateway.api.headers import (
    HostPolicy,
    OriginPolicy,
    duplicate_header,
    duplicated,
    host_not_allowed,
    host_policy,
    origin_not_allowed,
)
from gateway.api.jsonlimits import (
    JsonLimit,
    JsonMarks,
    count_marks,
    deeper_than,
    json_over_limit,
    wide_integer,
)
from gateway.api.protocol import (
    DISCONNECT_KEY,
    DOWNSTREAM_KEY,
    REFUSED_KEY,
    arrival,
    client_gone,
    queue_wait,
)
from gateway.api.types import ASGIApp, JsonObject, Lifecycle, Receive, Scope, Send
from gateway.engine.clock import RunningLoop
from gateway.engine.engine import Engine
from gateway.engine.exchange import Exchange
from gateway.engine.interrupt import CancelReason
from gateway.engine.relay import wait_delivery
from gateway.errors import GatewayError, echoed
from gateway.flags import ResponseFlag
from gateway.security.guard import Guard
from gateway.telemetry.accesslog import FIELDS
from gateway.telemetry.timing import iso_utc, now
from gateway.telemetry.tracing import new_request_id

# client path -> upstream path (relative to a deployment's base_url, which ends in /v1 or similar)
PROXY_ROUTES: Final = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
    "/v1/responses": "/responses",
    "/chat/completions": "/chat/completions",
    "/completions": "/completions",
    "/embeddings": "/embeddings",
    "/responses": "/responses",
}
_STREAMABLE = frozenset({"/chat/completions", "/completions", "/responses"})
_JSON_CT = (b"content-type", b"application/json")
_DOCS_PATHS = ("/docs", "/openapi.json", "/redoc")
_PROBES = frozenset({"/healthz", "/readyz"})  # probes reach a pod by address or Service name: any Host


class GatewayASGI:
    def __init__(
        self, engine: Engine, fallback_app: ASGIApp, lifecycle: Lifecycle, guard: Guard | None = None
    ) -> None:
        self.engine = engine
        self.fallback_app = fallback_app
        self.lifecycle = lifecycle  # app.Lifecycle: start/stop, readiness
        self.guard = guard  # security.Guard: keys and limits (None = auth off)
        srv = engine.cfg.server
        self.max_body = srv.max_body_bytes
        self.max_header = srv.max_header_bytes
        self.max_depth = srv.max_json_depth
        self.max_messages = srv.max_messages
        self.max_elements = srv.max_json_elements
        self.max_containers = srv.max_json_containers
        self.edge = EdgeLimits(srv, self._edge_refused, self._count_limit)
        self.origins = OriginPolicy(srv.cors_origins, srv.allowed_hosts)
        # The Host check guards what is answered without a key (DNS rebinding, api/headers.py): with auth
        # none every route but the probes; with keys only the admin listener's views, unless
        # auth.protect_metrics (the model list of the main port names no deployment, key or traffic).
        hosts = host_policy(srv.allowed_hosts)
        self.hosts = hosts if guard is None else None
        self.admin_hosts = hosts if guard is None or not guard.protect_metrics else None
        self._loop = RunningLoop()  # the serving loop, for the request's task without a getpid() each
        # With server.admin_port these move to the admin listener (serve_admin) and 404 here.
        self._admin_routes: dict[str, Callable[..., Awaitable[None]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }
        self.admin_on_main = srv.admin_port is None
        self._simple: dict[str, Callable[..., Awaitable[None]]] = {
            **({**self._admin_routes, "/metrics": self._public_metrics} if self.admin_on_main else {}),
            "/v1/models": self._models,
            "/models": self._models,
        }
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m.name, "object": "model", "created": 0, "owned_by": "llm-gateway"}
                    for m in engine.cfg.models
                ],
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            upstream_path = PROXY_ROUTES.get(path)
            if upstream_path is not None:
                try:
                    return await self._proxy(scope, receive, send, upstream_path, *arrival(scope))
                except asyncio.CancelledError:
                    if not self.lifecycle.draining:
                        raise
                    # uvicorn's forced cancel, DRAIN_GRACE_S after the drain deadline cut the request short
                    # (app.py): it has been answered and logged as far as it could; a traceback adds nothing.
                    return
            if (
                self.hosts is not None
                and path not in _PROBES
                and await self._host_refused(scope, send, self.hosts)
            ):
                return
            handler = self._simple.get(path)
            if handler is not None:
                return await handler(scope, receive, send)
            if path.startswith("/v1/models/"):
                return await self._model(scope, send, path[len("/v1/models/") :])
            if path.startswith("/admin") and self.admin_on_main:
                return await self._admin(scope, receive, send, public=True)
            if path.startswith(_DOCS_PATHS):
                if not await self._refused(scope, send, public=True):
                    await self.fallback_app(scope, receive, send)
                return
            return await self._reject(scope, send, errors.not_found(path), *arrival(scope))
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        return await self.fallback_app(scope, receive, send)

    # ------------------------------------------------------------------ proxy

    async def _proxy(
        self, scope: Scope, receive: Receive, send: Send, upstream_path: str, t0: float, wall: float
    ) -> None:
        raw_headers = scope["headers"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        key = None
        guard = self.guard
        body: JsonObject | None = None  # once parsed: a refused request still logs its model
        local_limits = False  # the key's rpm/tpm decided by this process alone (Redis away): flag RLL
        request_id = _request_id(headers.get("x-request-id"))
        try:
            if "origin" in headers or len(headers) != len(raw_headers):  # a browser, or a name given twice
                self._check_headers(raw_headers, headers)
            hosts = self.hosts
            if hosts is not None and headers.get("host") not in hosts.seen:  # one set lookup, once seen
                self._check_host(hosts, headers.get("host"))
            if scope["method"] != "POST":
                raise errors.method_not_allowed(scope["method"], "POST")
            if (
                sum(map(len, chain.from_iterable(raw_headers))) > self.max_header
            ):  # names and values, at C speed
                raise GatewayError(
                    431,
                    f"Request headers exceed {self.max_header} bytes.",
                    "invalid_request_error",
                    "headers_too_large",
                    flag=ResponseFlag.BAD_REQUEST,
                )
            ctype = headers.get("content-type")
            # the media type before any parameters (charset), which ignores case; none at all is how a
            # browser page posts without a CORS preflight, and every SDK sends one
            if ctype is None or ctype.partition(";")[0].strip().lower() != "application/json":
                raise _unsupported_media_type(ctype)
            coding = headers.get("content-encoding")
            if coding is not None and coding.strip().lower() not in ("", "identity"):
                # the body is parsed and sent on re-encoded: a compressed one cannot be read, and the header
                # must not reach a provider with a body it no longer describes
                raise GatewayError(
                    415,
                    f"Content-Encoding {coding[:100]!r} is not supported: send the body uncompressed.",
                    "invalid_request_error",
                    "unsupported_content_encoding",
                    param="content-encoding",
                    flag=ResponseFlag.BAD_REQUEST,
                )
            if guard is not None:
                key = await guard.authenticate(headers)  # raises 401
            raw, marks, upload_wait_s = await self._read_body(headers, receive)
            t_body = now()
            body, containers = self._load(raw, marks)
            model = self._check(body, upstream_path, containers)
            if key is not None and guard is not None:  # a key only ever comes from the guard
                local_limits = await guard.admit(key, model, raw, body)  # raises 403/429
        except GatewayError as exc:
            return await self._reject(
                scope,
                send,
                exc,
                t0,
                wall,
                headers,
                request_id=request_id,
                api_key_id=key.id if key is not None else None,
                model=_model_of(body),
                stream=_stream_of(body),
            )
        except _ClientGone:  # left during the body read: nothing to answer, but the request is logged
            return await self._reject(
                scope,
                send,
                _CLIENT_GONE,
                t0,
                wall,
                headers,
                request_id=request_id,
                api_key_id=key.id if key is not None else None,
                answered=False,
            )
        if (
            scope.get(DISCONNECT_KEY) is client_gone
        ):  # left during auth or a rate-limit check: nothing goes upstream
            return await self._reject(
                scope,
                send,
                _CLIENT_GONE,
                t0,
                wall,
                headers,
                request_id=request_id,
                api_key_id=key.id if key is not None else None,
                answered=False,
                model=model,
                stream=_stream_of(body),
            )
        eng = self.engine
        if self.lifecycle.draining:
            return await self._reject(
                scope,
                send,
                errors.draining(),
                t0,
                wall,
                headers,
                request_id=request_id,
                model=model,
                stream=_stream_of(body),
            )
        if not eng.admit():
            return await self._reject(
                scope,
                send,
                errors.overloaded("gateway"),
                t0,
                wall,
                headers,
                request_id=request_id,
                model=model,
                stream=_stream_of(body),
            )
        client = scope.get("client")
        task = asyncio.current_task(self._loop.get())
        assert task is not None  # an ASGI app always runs in a task
        deadline, rejected = eng.check_request(model, headers, t0)
        ex = Exchange(
            eng,
            task,
            path=scope["path"],
            upstream_path=upstream_path,
            body=body,
            raw_len=len(raw),
            headers=headers,
            t_received=t0,
            t_body=t_body,
            upload_wait_s=upload_wait_s,
            wall_start=wall,
            request_id=request_id,
            client=f"{client[0]}:{client[1]}" if client else None,
            deadline=deadline,
            rejected=rejected,
            api_key_id=key.id if key is not None else None,
        )
        # Set after: two more keywords would turn the call above into a dict build (CPython's limit).
        ex.downstream = scope.get(DOWNSTREAM_KEY)
        ex.queue_wait_s = queue_wait(scope, t0)  # pipelined: its wait behind the responses before it
        if local_limits:
            ex.flags.append(ResponseFlag.LOCAL_LIMITS)
        ex_done = guard.track(key) if key is not None and guard is not None else None

        def on_disconnect(_: object = None) -> None:
            # uvicorn also reports "disconnect" once our response is complete; only act before that.
            if not ex.finished and not ex.closing:
                ex.cancel(CancelReason.CLIENT_GONE)

        if DISCONNECT_KEY in scope:  # our protocol calls it when the connection drops
            scope[DISCONNECT_KEY] = on_disconnect
        else:  # any other server: a pending receive() is how ASGI reports a disconnect
            asyncio.ensure_future(receive()).add_done_callback(on_disconnect)
        self.lifecycle.open.add(ex)
        try:
            await ex.run(send)
        finally:
            self.lifecycle.open.discard(ex)
            # No cancel needed for a watcher: once the response is complete uvicorn wakes receive() with a
            # final "disconnect", so it ends by itself (and its callback sees the exchange finished).
            scope.pop(DISCONNECT_KEY, None)
            if ex_done is not None:
                ex_done(ex)

    async def _read_body(
        self, headers: dict[str, str], receive: Receive
    ) -> tuple[bytes, JsonMarks | None, float]:
        """The body; for one that came in parts, its JSON marks counted part by part as they arrived (so a
        large body's counting is spread over its upload instead of blocking the loop at the end) and the
        time from its first part to its last: the client's upload, which is not gateway overhead."""
        cl = headers.get("content-length")
        if cl is not None:
            cl = cl.strip(" \t")  # optional whitespace around a field value (RFC 9110 5.5)
            if not cl.isdigit():
                raise errors.bad_request("Content-Length is not a number.", code="invalid_header")
            if int(cl) > self.max_body:
                raise errors.too_large(self.max_body)
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone
        body = msg.get("body", b"")
        if len(body) > self.max_body:  # without Content-Length, uvicorn may hand over the whole body at once
            raise errors.too_large(self.max_body)
        if not msg.get("more_body"):
            return body, None, 0.0
        t_first_part = now()
        parts = [body]
        size = len(body)
        marks = count_marks(body)
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGone
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise errors.too_large(self.max_body)
            parts.append(chunk)
            marks = marks.add(count_marks(chunk))
            if not msg.get("more_body"):
                return b"".join(parts), marks, now() - t_first_part

    def _load(self, raw: bytes, marks: JsonMarks | None = None) -> tuple[JsonObject, int]:
        """The body as a JSON object, and how many containers it holds (for the depth check)."""
        if not raw:
            raise errors.bad_request("Request body is empty; expected a JSON object.")
        # What parsing would cost is judged on the bytes first (C speed): millions of tiny values are
        # refused before orjson builds them.
        over, containers = json_over_limit(raw, self.max_elements, self.max_containers, marks)
        if over is not None:
            self._count_limit(over.value)
            raise self._json_limit_error(over)
        if (wide := wide_integer(raw)) is not None:  # before parsing: orjson would round it, or fail on it
            raise errors.bad_request(
                f"The integer {wide[:40]}{'...' if len(wide) > 40 else ''} does not fit in 64 bits: it cannot be "
                "forwarded unchanged. Send it as a string.",
                code="integer_out_of_range",
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.bad_request(f"Request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise errors.bad_request("Request body must be a JSON object.")
        return body, containers

    def _check(self, body: JsonObject, upstream_path: str, containers: int) -> str:
        """Refuses what no provider should see; returns the model asked for."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise errors.bad_request(
                "'model' is required and must be a non-empty string.",
                param="model",
                code="invalid_value" if "model" in body else "missing_required_parameter",
            )
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise errors.bad_request("'stream' must be a boolean.", param="stream", code="invalid_type")
        if stream and upstream_path not in _STREAMABLE:
            raise errors.bad_request(
                f"Streaming is not supported on {upstream_path}.", param="stream", code="invalid_value"
            )
        msgs = body.get("messages")
        if msgs is not None:
            if not isinstance(msgs, list):
                raise errors.bad_request(
                    "'messages' must be an array.", param="messages", code="invalid_type"
                )
            if len(msgs) > self.max_messages:
                raise errors.bad_request(
                    f"Too many messages ({len(msgs)}); the limit is {self.max_messages}.",
                    param="messages",
                    code="too_many_messages",
                )
        # Deep nesting costs the gateway and providers; the walk is bounded by the containers counted above.
        if containers > self.max_depth and deeper_than(body, self.max_depth):
            self._count_limit("json_depth")
            raise errors.bad_request(
                f"JSON nesting deeper than {self.max_depth} levels (server.max_json_depth).", code="too_deep"
            )
        return model

    def _json_limit_error(self, over: JsonLimit) -> GatewayError:
        if over is JsonLimit.CONTAINERS:
            return errors.bad_request(
                f"The body holds more than {self.max_containers} JSON arrays and objects "
                "(server.max_json_containers).",
                code="too_many_elements",
            )
        return errors.bad_request(
            f"The body holds more than {self.max_elements} JSON values (server.max_json_elements).",
            code="too_many_elements",
        )

    def _check_headers(self, raw_headers: list[tuple[bytes, bytes]], headers: dict[str, str]) -> None:
        """Refuses a single-value header given twice (400) and a browser page of a foreign origin (403)."""
        name = duplicated(raw_headers) if len(headers) != len(raw_headers) else None
        if name is not None:
            self._count_limit("duplicate_header")
            raise duplicate_header(name)
        origin = headers.get("origin")
        if origin is not None and not self.origins.allows(origin, headers.get("host")):
            self._count_limit("origin_not_allowed")
            raise origin_not_allowed(origin)

    def _check_host(self, hosts: HostPolicy, host: str | None) -> None:
        """Refuses a request sent to a host name a foreign web page could hold (403)."""
        if not hosts.allows(host):
            self._count_limit("host_not_allowed")
            raise host_not_allowed(host or "")

    async def _host_refused(self, scope: Scope, send: Send, hosts: HostPolicy) -> bool:
        """Refuses (403, logged and counted) a read route's request sent to a foreign host; says so."""
        raw_headers = scope["headers"]
        given: list[str | None] = [v.decode("latin-1") for k, v in raw_headers if k == b"host"]
        try:
            for host in given or [None]:  # each of them: only proxy routes refuse a repeated Host
                self._check_host(hosts, host)
        except GatewayError as exc:
            await self._refuse_read(scope, send, exc, _decoded(raw_headers))
            return True
        return False

    async def _refuse_read(
        self, scope: Scope, send: Send, err: GatewayError, headers: dict[str, str]
    ) -> None:
        """A read route's refusal (a foreign Host, a missing key): answered, logged and counted as a proxy
        route's is."""
        rid = _request_id(headers.get("x-request-id"))
        await self._reject(scope, send, err, *arrival(scope), headers, request_id=rid)

    def _count_limit(self, limit: str) -> None:
        m = self.engine.metrics
        m.child(m.input_limits, limit).inc()

    def _edge_refused(
        self, err: GatewayError, method: str, path: str, client: str | None, t0: float, bytes_sent: int
    ) -> None:
        """A request the protocol refused (its head too large, too slow or malformed, or a malformed body
        chunk): logged and counted like any other refused request."""
        t1 = now()
        self.engine.record_rejected(
            rejected_record(
                wall=time.time() - (t1 - t0),
                request_id=new_request_id(),
                method=method,
                path=path,
                err=err,
                duration_ms=(t1 - t0) * 1000.0,
                bytes_sent=bytes_sent,
                headers={},
                client=client,
            )
        )

    async def _reject(
        self,
        scope: Scope,
        send: Send,
        err: GatewayError,
        t0: float,
        wall: float,
        headers: dict[str, str] | None = None,
        request_id: str | None = None,
        api_key_id: str | None = None,
        answered: bool = True,
        model: str | None = None,
        stream: bool = False,
    ) -> None:
        """Answer ``err`` and log it; ``answered`` False: the client has gone, so only log it. ``model`` and
        ``stream``: what the request's body asked for, when it was parsed (the log only)."""
        # Gone while the edge awaited (the body, a key lookup, a limit check, its turn behind a pipelined
        # response): the server drops the answer, so it is logged as never delivered (DC).
        gone = answered and scope.get(DISCONNECT_KEY) is client_gone
        sending = answered and not gone
        body = err.body() if sending else b""
        rid = request_id or _request_id(None)
        if sending:
            hdrs = [_JSON_CT, (b"content-length", b"%d" % len(body)), (b"x-request-id", rid.encode())]
            if err.retry_after:
                hdrs.append((b"retry-after", err.retry_after.encode()))
            if err.status == 401:
                hdrs.append((b"www-authenticate", b'Bearer realm="llm-gateway"'))
            hdrs.extend(err.headers)
            await send({"type": "http.response.start", "status": err.status, "headers": hdrs})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        if REFUSED_KEY in scope:
            # The protocol refused this request's bytes (a malformed body chunk), before or while it was
            # answered here: what was sent went nowhere, and the refusal is the request's record.
            return
        t1 = now()
        if gone or (sending and not await wait_delivery(scope.get(DOWNSTREAM_KEY))):
            err = err.undelivered()  # cut before it left: the client never got it
        headers = headers or {}
        client = scope.get("client")
        self.engine.record_rejected(
            rejected_record(
                wall=wall,
                request_id=rid,
                method=scope.get("method", "-"),
                path=scope["path"],
                err=err,
                duration_ms=(t1 - t0) * 1000.0,
                bytes_sent=len(body),
                headers=headers,
                client=f"{client[0]}:{client[1]}" if client else None,
                api_key_id=api_key_id,
                model=model,
                stream=stream,
                queue_wait_s=queue_wait(scope, t0),
            )
        )

    # ------------------------------------------------------------------ simple endpoints

    async def _respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        ctype: bytes = b"application/json",
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(body)), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._respond(send, 200, b'{"status":"ok"}')

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready, detail = self.lifecycle.readiness()
        await self._respond(send, 200 if ready else 503, orjson.dumps(detail))

    async def _refused(self, scope: Scope, send: Send, public: bool = False) -> bool:
        """With keys on, /metrics, /admin/* and the API docs on the public port need a valid key; on the
        admin listener only with auth.protect_metrics. Answers 401 (logged and counted, as a proxy route's
        refusal is: a scraper with a wrong key shows in the access log) and says so."""
        if self.guard is None or not (public or self.guard.protect_metrics):
            return False
        headers = _decoded(scope["headers"])
        try:
            await self.guard.authenticate(headers)
        except GatewayError as exc:
            await self._refuse_read(scope, send, exc, headers)
            return True
        return False

    async def _admin(self, scope: Scope, receive: Receive, send: Send, public: bool = False) -> None:
        if not await self._refused(scope, send, public):
            await self.fallback_app(scope, receive, send)

    async def serve_admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of the admin listener (server.admin_port): admin routes only."""
        if scope["type"] != "http":
            return
        path = scope["path"]
        hosts = self.admin_hosts
        if hosts is not None and path not in _PROBES and await self._host_refused(scope, send, hosts):
            return
        handler = self._admin_routes.get(path)
        if handler is not None:
            return await handler(scope, receive, send)
        if path.startswith("/admin"):
            return await self._admin(scope, receive, send)
        err = errors.not_found(path)
        await self._respond(send, err.status, err.body())

    async def _metrics(self, scope: Scope, receive: Receive, send: Send, public: bool = False) -> None:
        if await self._refused(scope, send, public):
            return
        self.lifecycle.refresh_gauges()
        body, ctype = self.engine.metrics.render()
        await self._respond(send, 200, body, ctype.encode())

    async def _public_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._metrics(scope, receive, send, public=True)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            err = errors.method_not_allowed(scope["method"], "GET")
            return await self._respond(send, err.status, err.body(), extra=err.headers)
        await self._respond(send, 200, self._models_body)

    async def _model(self, scope: Scope, send: Send, name: str) -> None:
        if scope["method"] != "GET":  # (DELETE is OpenAI's for fine-tuned models: nothing here to delete)
            err = errors.method_not_allowed(scope["method"], "GET")
            return await self._respond(send, err.status, err.body(), extra=err.headers)
        if name in self.engine.registry.models:
            body = orjson.dumps({"id": name, "object": "model", "created": 0, "owned_by": "llm-gateway"})
            return await self._respond(send, 200, body)
        err = errors.model_not_found(name)
        await self._respond(send, err.status, err.body())

    # ------------------------------------------------------------------ lifespan

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.lifecycle.start()
                    self.edge.install(scope.get("state"))  # the protocol finds the limits there
                    _chain_sigterm(self.lifecycle)
                except Exception as exc:  # reported by uvicorn, which then exits non-zero
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.edge.stop()
                await self.lifecycle.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _ClientGone(Exception):
    pass


# Logged (never sent) for a client that left before its request went upstream; 499 as nginx logs it.
_CLIENT_GONE = GatewayError(
    499,
    "The client closed the connection before the request went upstream.",
    "invalid_request_error",
    "client_closed_request",
    flag=ResponseFlag.CLIENT_GONE,
)


def _chain_sigterm(lifecycle: Lifecycle) -> None:
    """Turn /readyz not-ready the moment SIGTERM arrives, then let uvicorn's own handler drain. SIGHUP (a
    closed terminal; a reload, to a supervisor) drains the same way, as SIGTERM: uvicorn leaves it at the
    default action, which killed the process with every request in flight."""
    for sig, as_sig in (
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGHUP, signal.SIGTERM),
    ):
        try:
            prev = signal.getsignal(as_sig)
        except ValueError:
            return  # not the main thread (tests running the app in a thread)

        def handler(signum: int, frame: FrameType | None, prev: object = prev, as_sig: int = as_sig) -> None:
            lifecycle.begin_drain()
            if callable(prev):
                # uvicorn re-raises what it caught once drained: SIGTERM, for a hangup too
                prev(as_sig, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:
            return


def _unsupported_media_type(ctype: str | None) -> GatewayError:
    return GatewayError(
        415,
        "Content-Type must be application/json; the request has none."
        if ctype is None
        else f"Content-Type must be application/json, not {ctype[:100]!r}.",
        "invalid_request_error",
        "unsupported_media_type",
        flag=ResponseFlag.BAD_REQUEST,
    )


def _decoded(raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's headers as text (a name given twice: its last value)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}


def _request_id(value: str | None) -> str:
    if value and len(value) <= 200 and value.isascii() and value.isprintable():  # echoed in a header as is
        return value
    return new_request_id()


def _model_of(body: JsonObject | None) -> str | None:
    """The model a refused request named, when its body parsed and named one (for the log only)."""
    model = body.get("model") if body is not None else None
    return echoed(model) if isinstance(model, str) and model else None


def _stream_of(body: JsonObject | None) -> bool:
    return body is not None and body.get("stream") is True


def rejected_record(
    *,
    wall: float,
    request_id: str,
    method: str,
    path: str,
    err: GatewayError,
    duration_ms: float,
    bytes_sent: int,
    headers: dict[str, str],
    client: str | None,
    api_key_id: str | None = None,
    model: str | None = None,
    stream: bool = False,
    queue_wait_s: float = 0.0,
) -> dict[str, Any]:
    """``queue_wait_s``: a pipelined request's wait behind the responses before it (not overhead)."""
    rec: dict[str, Any] = dict.fromkeys(FIELDS)
    rec.update(
        {
            "start_time": iso_utc(wall),
            "request_id": request_id,
            "traceparent": headers.get("traceparent"),
            "method": method,
            "path": path,
            "model": model,
            "stream": stream,
            "response_code": err.status,
            "response_flags": err.flag or "-",
            "duration_ms": round(duration_ms, 3),
            "gateway_overhead_ms": round(max(duration_ms - queue_wait_s * 1000.0, 0.0), 3),
            "pipeline_wait_ms": round(queue_wait_s * 1000.0, 3) if queue_wait_s else None,
            "attempts": 0,
            "retry_count": 0,
            "hedge_count": 0,
            "error_type": err.code,
            "bytes_received": int(cl)
            if (cl := (headers.get("content-length") or "").strip(" \t")).isdigit()
            else 0,
            "bytes_sent": bytes_sent,
            "user_agent": headers.get("user-agent"),
            "downstream_remote_address": client,
            "api_key_id": api_key_id,
        }
    )
    return rec
