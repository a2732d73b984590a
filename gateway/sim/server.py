"""SimServer: a simulated OpenAI-compatible provider on one port, observable through /sim/*.

Routes: POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses; GET /v1/models[/{id}];
admin: GET|POST /sim/profile, GET /sim/stats, POST /sim/reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import time
from typing import Any

import orjson

from gateway.sim.asks import Ask, BadRequest, read_ask
from gateway.sim.exchange import Exchange, Plan
from gateway.sim.prefix_cache import PrefixCache, prompt_text
from gateway.sim.profile import SimProfile, happens, sample_ttft_ms
from gateway.sim.protocol import Connection, Request, header_line
from gateway.sim.stats import Endpoint, Outcome, SimStats
from gateway.sim.wire import (
    SIM_MODELS,
    Answer,
    ChatShape,
    CompletionShape,
    EmbeddingsShape,
    ResponsesShape,
    Shape,
    error_body,
    injected_error_body,
    model_entry,
    models_body,
)
from gateway.sim.wire_rich import rich_shape

ROUTES = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
    "/v1/responses": Endpoint.RESPONSES,
}
MAX_SCHEMAS = 50_000
_SEEN_PREFIXES = ("x-", "openai-")
_SECRET = re.compile("key|token|secret|password|auth")  # header values never to echo in stats


class SimServer:
    def __init__(
        self,
        profile: SimProfile | None = None,
        *,
        name: str = "sim",
        region: str = "local",
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
    ) -> None:
        self.profile = profile if profile is not None else SimProfile()
        self.name = name
        self.region = region
        self.host = host
        self.port = port
        self._rng = random.Random(seed)
        self.tls: ssl.SSLContext | None = None  # set before start() to serve https (tests of TLS and proxies)
        self._stats = SimStats()
        self._serial = 0
        self._conn_serial = 0
        self._conns: set[Connection] = set()
        self._in_flight = 0
        self._schemas: dict[bytes, float] = {}  # schema key -> loop time its compile is done
        self._prefix_cache = PrefixCache()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._name_header = header_line(b"x-sim-name", name)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, self.host, self.port, backlog=4096, reuse_address=True, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.call_later(0.25, self._sweep)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        await asyncio.sleep(0)  # let the transports report connection_lost
        self._server = None

    def stats(self) -> dict[str, Any]:
        """The GET /sim/stats dict: a copy, safe to take from another thread (each copy step holds the GIL)."""
        return self._stats.snapshot(
            name=self.name,
            region=self.region,
            in_flight=self._in_flight,
            connections_open=len(self._conns),
            schemas_seen=len(self._schemas),
            profile=self.profile.to_dict(),
        )

    def reset_stats(self) -> None:
        self._stats = SimStats(max_in_flight=self._in_flight)

    # -- connections (protocol.Handler) ------------------------------------------------------------------
    def _new_connection(self) -> Connection:
        assert self._loop is not None
        self._conn_serial += 1
        return Connection(self, self._loop, self._conn_serial)

    def connection_opened(self, conn: Connection) -> None:
        self._conns.add(conn)
        self._stats.connections_opened += 1

    def connection_closed(self, conn: Connection) -> None:
        self._conns.discard(conn)

    def _sweep(self) -> None:
        """Close keep-alive connections idle for idle_close_s, as a load balancer would."""
        assert self._loop is not None
        idle_s = self.profile.idle_close_s
        if idle_s > 0:
            now = self._loop.time()
            for conn in list(self._conns):
                if conn.idle and now - conn.last_active >= idle_s:
                    self._stats.idle_closed += 1
                    conn.close()
        interval = max(0.005, min(0.25, idle_s / 20)) if idle_s > 0 else 0.25
        self._sweeper = self._loop.call_later(interval, self._sweep)

    # -- requests ----------------------------------------------------------------------------------------
    def handle(self, conn: Connection, req: Request) -> Exchange | None:
        path = req.path
        if path.startswith("/sim/"):
            self._admin(conn, req)
            return None
        self._stats.requests += 1
        endpoint = ROUTES.get(path)
        if endpoint is None:
            if path == "/v1/models" or path.startswith("/v1/models/"):
                self._models(conn, req)
            else:
                conn.respond(
                    404,
                    error_body(f"Invalid URL ({req.method} {path})", "invalid_request_error", "unknown_url"),
                )
            return None
        if req.method != "POST":
            conn.respond(
                405,
                error_body(
                    f"Method {req.method} not allowed for {path}; use POST.",
                    "invalid_request_error",
                    "method_not_allowed",
                ),
            )
            return None
        rec = self._record(conn, req)
        try:
            prof = self.profile.with_overrides(req.overrides) if req.overrides else self.profile
        except ValueError as exc:
            self._stats.bad_requests += 1
            self._answer(
                conn, rec, 400, error_body(str(exc), "invalid_request_error", "invalid_sim_override")
            )
            return None
        if not self._authorized(prof, req):
            self._stats.unauthorized += 1
            self._answer(conn, rec, 401, self._unauthorized_body(), Outcome.UNAUTHORIZED)
            return None
        try:
            ask = read_ask(endpoint, req.body)
        except BadRequest as exc:
            self._stats.bad_requests += 1
            self._answer(
                conn, rec, 400, error_body(exc.message, "invalid_request_error", exc.code, exc.param)
            )
            return None
        rec["model"] = ask.model
        rec["stream"] = ask.stream
        if ask.stream:
            self._stats.streams += 1
        return self._generate(conn, req, rec, endpoint, prof, ask)

    def _generate(
        self,
        conn: Connection,
        req: Request,
        rec: dict[str, Any],
        endpoint: Endpoint,
        prof: SimProfile,
        ask: Ask,
    ) -> Exchange | None:
        rng = self._rng
        if happens(prof.error_rate, rng):
            status = prof.error_status
            self._stats.errors_injected[str(status)] += 1
            extra = header_line(b"retry-after", prof.retry_after) if prof.retry_after is not None else b""
            self._answer(conn, rec, status, injected_error_body(status), Outcome.ERROR, extra)
            return None
        stall = happens(prof.stall_rate, rng)
        reset = not stall and happens(prof.reset_rate, rng)
        ttft_ms = 0.0
        if stall:
            self._stats.stalled += 1
            rec["outcome"] = Outcome.STALLED.value
        else:
            ttft_ms = sample_ttft_ms(prof, rng)
            if ask.schema_key is not None:
                ttft_ms += self._schema_wait_ms(ask.schema_key, prof, req.t0, rec)
            if prof.prefix_cache_tokens or prof.prefill_ms_per_1k:
                ttft_ms += self._prefill_ms(req.body, ask.prompt_tokens, prof, rec)
            rec["ttft_ms"] = round(ttft_ms, 3)
        tokens, finish = prof.tokens, "stop"
        if ask.max_tokens is not None and ask.max_tokens < tokens:
            tokens, finish = ask.max_tokens, "length"
        answer = Answer(
            sim=self.name,
            serial=rec["serial"],
            model=ask.model,
            tokens=tokens,
            finish_reason=finish,
            prompt_tokens=ask.prompt_tokens,
            include_usage=ask.include_usage,
            created=int(req.started_at),
            cached_tokens=rec.get("cached_tokens") or 0,
        )
        if ask.content is not None:
            shape, tokens = rich_shape(endpoint, answer, ask.content, prof.tokens, ask.max_tokens)
            rec["content"] = ask.content.mode.value
        else:
            shape = self._shape(endpoint, answer, ask, prof)
        if endpoint is Endpoint.EMBEDDINGS:
            tokens = 1  # one answer at ttft; the token count means nothing here
        request_id = req.headers.get("x-request-id") or f"req_{self.name}_{rec['serial']}"
        plan = Plan(
            endpoint=endpoint,
            shape=shape,
            stream=ask.stream,
            tokens=tokens,
            ttft_s=ttft_ms / 1000.0,
            itl_s=prof.itl_ms / 1000.0,
            stall=stall,
            reset_after=prof.reset_after_tokens if reset else None,
            headers=self._name_header + header_line(b"x-request-id", request_id),
        )
        self._in_flight += 1
        if self._in_flight > self._stats.max_in_flight:
            self._stats.max_in_flight = self._in_flight
        ex = Exchange(conn, plan, rec, req.t0, self._ended, time.time)
        ex.start()
        if ex.done:
            return None
        ex.attached = True
        return ex

    @staticmethod
    def _shape(endpoint: Endpoint, answer: Answer, ask: Ask, prof: SimProfile) -> Shape:
        if endpoint is Endpoint.CHAT:
            return ChatShape(answer)
        if endpoint is Endpoint.COMPLETIONS:
            return CompletionShape(answer)
        if endpoint is Endpoint.RESPONSES:
            return ResponsesShape(answer, ask.max_tokens)
        return EmbeddingsShape(answer, ask.inputs, ask.dimensions or prof.embedding_dim, ask.as_base64)

    def _schema_wait_ms(self, key: bytes, prof: SimProfile, t0: float, rec: dict[str, Any]) -> float:
        """The first request with a schema pays its compile; requests during the compile wait for it."""
        ready = self._schemas.get(key)
        if ready is None:
            if len(self._schemas) >= MAX_SCHEMAS:
                self._schemas.pop(next(iter(self._schemas)))
            self._schemas[key] = t0 + prof.cold_schema_ms / 1000.0
            self._stats.cold_schema_hits += 1
            rec["cold_schema"] = True
            return prof.cold_schema_ms
        return max(0.0, ready - t0) * 1000.0

    def _prefill_ms(self, raw: bytes, prompt_tokens: int, prof: SimProfile, rec: dict[str, Any]) -> float:
        """Prefill of the prompt tokens the prefix cache does not hold (all of them without a cache)."""
        cached = 0
        if prof.prefix_cache_tokens:
            cached = min(
                prompt_tokens,
                self._prefix_cache.lookup_and_fill(prompt_text(orjson.loads(raw)), prof.prefix_cache_tokens),
            )
        rec["cached_tokens"] = cached
        self._stats.prompt_tokens_cached += cached
        self._stats.prompt_tokens_uncached += prompt_tokens - cached
        return (prompt_tokens - cached) / 1000.0 * prof.prefill_ms_per_1k

    def _ended(self, ex: Exchange, outcome: Outcome) -> None:
        self._in_flight -= 1
        rec = ex.rec
        rec["ended_at"] = time.time()
        st = self._stats
        if outcome is Outcome.OK:
            st.served[ex.plan.endpoint.value] += 1
            st.tokens_out += ex.plan.tokens
        elif outcome is Outcome.CANCELLED:
            if ex.first_byte:
                st.cancelled_mid_stream += 1
            else:
                st.cancelled_before_first_byte += 1
        elif outcome is Outcome.RESET:
            st.resets += 1
        if ex.first_byte:
            rec["status"] = 200
        if rec["outcome"] is None:  # a stalled request stays "stalled" when its client gives up
            rec["outcome"] = outcome.value

    def _record(self, conn: Connection, req: Request) -> dict[str, Any]:
        self._serial += 1
        h = req.headers
        seen = {}
        for k, v in h.items():
            if k.startswith(_SEEN_PREFIXES):
                seen[k] = "***" if _SECRET.search(k) else v
        rec = {
            "serial": self._serial,
            "path": req.path,
            "model": None,
            "stream": False,
            "request_id": h.get("x-request-id"),
            "traceparent": h.get("traceparent"),
            "tracestate": h.get("tracestate"),
            "user_agent": h.get("user-agent"),
            "authorization_present": "authorization" in h or "api-key" in h,
            "headers_seen": seen,
            "started_at": req.started_at,
            "first_byte_at": None,
            "ended_at": None,
            "outcome": None,
            "status": None,
            "content": None,
            "cold_schema": False,
            "ttft_ms": None,
            "connection": conn.id,
        }
        self._stats.recent.append(rec)
        return rec

    def _answer(
        self,
        conn: Connection,
        rec: dict[str, Any],
        status: int,
        body: bytes,
        outcome: Outcome = Outcome.ERROR,
        headers: bytes = b"",
    ) -> None:
        """An immediate answer to a generation request that will not generate (error, 401, bad request)."""
        now = time.time()
        rec.update(status=status, outcome=outcome.value, first_byte_at=now, ended_at=now)
        request_id = rec["request_id"] or f"req_{self.name}_{rec['serial']}"
        conn.respond(
            status, body, headers=self._name_header + header_line(b"x-request-id", request_id) + headers
        )

    @staticmethod
    def _authorized(prof: SimProfile, req: Request) -> bool:
        key = prof.require_key
        if key is None:
            return True
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and auth[7:].strip() == key:
            return True
        return req.headers.get("api-key") == key

    def _unauthorized_body(self) -> bytes:
        return error_body(
            f"Incorrect API key provided to simulated provider {self.name!r}. "
            "Check the deployment's api_key.",
            "invalid_request_error",
            "invalid_api_key",
        )

    def _models(self, conn: Connection, req: Request) -> None:
        if req.method != "GET":
            conn.respond(
                405,
                error_body(
                    f"Method {req.method} not allowed for {req.path}; use GET.",
                    "invalid_request_error",
                    "method_not_allowed",
                ),
            )
            return
        try:
            prof = self.profile.with_overrides(req.overrides) if req.overrides else self.profile
        except ValueError as exc:
            conn.respond(400, error_body(str(exc), "invalid_request_error", "invalid_sim_override"))
            return
        if not self._authorized(prof, req):
            self._stats.unauthorized += 1
            conn.respond(401, self._unauthorized_body())
            return
        self._stats.served[Endpoint.MODELS.value] += 1
        if req.path == "/v1/models":
            conn.respond(200, models_body(list(SIM_MODELS)))
        else:
            conn.respond(200, orjson.dumps(model_entry(req.path[len("/v1/models/") :])))

    # -- admin -------------------------------------------------------------------------------------------
    def _admin(self, conn: Connection, req: Request) -> None:
        path, method = req.path, req.method
        if path == "/sim/profile" and method == "GET":
            conn.respond(200, orjson.dumps(self.profile.to_dict()))
        elif path == "/sim/profile" and method in ("POST", "PATCH"):
            try:
                patch = orjson.loads(req.body or b"{}")
                self.profile.update(patch)
            except (orjson.JSONDecodeError, ValueError) as exc:
                conn.respond(400, error_body(str(exc), "invalid_request_error", "invalid_knob"))
                return
            conn.respond(200, orjson.dumps(self.profile.to_dict()))
        elif path == "/sim/stats" and method == "GET":
            conn.respond(200, orjson.dumps(self.stats()))
        elif path == "/sim/reset" and method == "POST":
            self.reset_stats()
            conn.respond(200, b'{"ok":true}')
        elif path in ("/sim/profile", "/sim/stats", "/sim/reset"):
            conn.respond(
                405,
                error_body(
                    f"Method {method} not allowed for {path}.", "invalid_request_error", "method_not_allowed"
                ),
            )
        else:
            conn.respond(
                404, error_body(f"Invalid URL ({method} {path})", "invalid_request_error", "unknown_url")
            )
