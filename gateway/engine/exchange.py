"""One client request, from first byte in to last byte out.

The Exchange asks ``policy/`` where to go, when to retry, when to hedge and how long is left; runs
Attempts (concurrently when hedging), commits the first usable one, cancels the rest, relays bytes
downstream as they arrive, and ends as exactly one access-log record plus metrics.
"""

from __future__ import annotations

import asyncio
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from gateway import errors
from gateway.engine.alarms import Alarm
from gateway.engine.attempt import Attempt, AttemptKind, AttemptState
from gateway.engine.registry import DeploymentRuntime, ModelRuntime
from gateway.engine.relay import relay_stream
from gateway.engine.sse import usage_of
from gateway.errors import GatewayError
from gateway.policy.attribution import Blame, blame, censored_latency_ms, retry_evidence
from gateway.policy.deadline import SDK_SOURCES, Deadline, DeadlineSource, attempt_timeout, resolve_deadline
from gateway.policy.fallback import FallbackReason, fallback_reason_for, should_degrade
from gateway.policy.hedging import hedge_delay, loser_sample_ms
from gateway.policy.outlier import OutlierVerdict, record_outcome
from gateway.policy.retry import FailureKind, RetryVerdict
from gateway.policy.retry_state import RetryState
from gateway.policy.routing import RouteReason, choose
from gateway.telemetry.timing import iso_utc, ms, now, round3, union_length
from gateway.telemetry.tracing import TraceContext, new_span_id

if TYPE_CHECKING:
    from gateway.engine.engine import Engine

MIN_ATTEMPT_MS = 50.0


class ExchangeState(StrEnum):
    ROUTING = "routing"
    WAITING_FIRST_TOKEN = "waiting-first-token"
    STREAMING = "streaming"
    DONE = "done"
    FAILED = "failed"


class Exchange:
    __slots__ = ("engine", "task", "path", "upstream_path", "body", "model_name", "stream", "headers", "t_received",
                 "t_body", "wall_start", "request_id", "client", "api_key_id", "trace", "state", "attempts", "waits",
                 "flags", "retries", "hedges", "retry_state", "model_hedges", "hedge_delay_ms", "route_reason",
                 "winner", "last_failure", "error", "timeout_flag", "fallback_from", "fallback_reason",
                 "served_model", "status", "bytes_received", "bytes_sent", "t_routed", "t_first_sent", "t_last_sent",
                 "prompt_tokens", "completion_tokens", "client_gone", "committed", "finished", "closing", "_bodies",
                 "_base_headers", "deadline", "retry_verdict")

    def __init__(self, engine: Engine, task: asyncio.Task, *, path: str, upstream_path: str, body: dict[str, Any], raw_len: int,
                 headers: dict[str, str], t_received: float, t_body: float, wall_start: float,
                 request_id: str, client: str | None, api_key_id: str | None = None) -> None:
        self.engine = engine
        self.task = task  # the request's task: inline attempts, the relay and the race run in it
        self.path = path
        self.upstream_path = upstream_path
        self.body = body
        self.model_name: str = body["model"]
        self.stream = body.get("stream") is True
        self.headers = headers
        self.t_received = t_received
        self.t_body = t_body
        self.wall_start = wall_start
        self.request_id = request_id
        self.client = client
        self.api_key_id = api_key_id
        self.trace = TraceContext(headers.get("traceparent"), headers.get("tracestate"))
        if engine.tracing is not None:
            engine.tracing.adopt_server_span(self)
        self.state = ExchangeState.ROUTING
        self.attempts: list[Attempt] = []
        self.waits: list[tuple[float, float]] = []  # backoff intervals on the critical path
        self.flags: list[str] = []
        self.retries = 0  # totals over the whole request (all models of the fallback chain), for the log
        self.hedges = 0
        self.retry_state: RetryState | None = None  # this model's retries (its max_retries and budget)
        self.retry_verdict: RetryVerdict | None = None  # why retries stopped, when they did
        self.model_hedges = 0
        self.hedge_delay_ms: float | None = None
        self.route_reason: RouteReason | None = None
        self.winner: Attempt | None = None
        self.last_failure: Attempt | None = None
        self.error: GatewayError | None = None
        self.timeout_flag: str | None = None
        self.fallback_from: str | None = None
        self.fallback_reason: str | None = None
        self.served_model: ModelRuntime | None = None
        self.status = 0
        self.bytes_received = raw_len
        self.bytes_sent = 0
        self.t_routed: float | None = None
        self.t_first_sent: float | None = None
        self.t_last_sent: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.client_gone = False
        self.committed = False
        self.finished = False
        self.closing = False  # the final body is being sent: a disconnect now changes nothing
        self._bodies: dict[str, bytes] = {}
        self._base_headers: dict[str, str] | None = None
        self.deadline: Deadline | None = None

    # ------------------------------------------------------------------ entry

    async def run(self, send: Any) -> None:
        eng = self.engine
        try:
            model = eng.registry.models.get(self.model_name)
            if model is None:
                raise errors.model_not_found(self.model_name)
            try:
                self.deadline = resolve_deadline(self.t_received, model.total_s * 1000.0,
                                                 self.headers.get("x-gateway-timeout-ms"),
                                                 self.headers.get("x-stainless-timeout"),
                                                 self.headers.get("x-stainless-read-timeout"),
                                                 model.cfg.timeouts.sdk_reply_margin_ms)
            except ValueError as exc:
                raise errors.bad_request(str(exc), code="invalid_header") from None
            winner = await self._run_chain(model)
            if winner is not None:
                await self._deliver(winner, send)
            else:
                await self._send_error(send, self._failure_error())
        except GatewayError as exc:
            await self._send_error(send, exc)
        except asyncio.CancelledError:
            # The client went away (the disconnect watcher cancelled us): abort everything upstream.
            self._abort_all()
            if not self.client_gone:
                raise
            self.task.uncancel()
            self.flags.append("DC")
            if not self.status:
                self.status = 499
        finally:
            self._abort_all()
            self.finished = True
            eng.finish(self)

    # ------------------------------------------------------------------ models and fallbacks

    async def _run_chain(self, primary: ModelRuntime) -> Attempt | None:
        chain = primary.chain
        fallback_on = primary.cfg.fallback_on
        for i, m in enumerate(chain):
            last = i == len(chain) - 1
            if not last:
                t = now()
                reason = None
                if "unhealthy" in fallback_on and m.all_ejected(t):
                    reason = FallbackReason.UNHEALTHY
                elif self._should_degrade(m, t):
                    reason = FallbackReason.DEGRADE
                if reason is not None:
                    self._note_fallback(m, chain[i + 1], reason)
                    continue
            winner = await self._run_model(m)
            if winner is not None:
                self.served_model = m
                return winner
            if last or self.committed:
                return None
            reason = self._fallback_reason()
            if reason is None or reason.value not in fallback_on:
                return None
            self._note_fallback(m, chain[i + 1], reason)
        return None

    def _should_degrade(self, m: ModelRuntime, t: float) -> bool:
        d = m.cfg.degrade
        if d.when_remaining_ms_below is None and not d.when_expected_ttft_exceeds_remaining:
            return False
        return should_degrade(remaining_ms=self.deadline.remaining(t) * 1000.0,
                              when_remaining_ms_below=d.when_remaining_ms_below,
                              expected_ttft_ms=m.expected_ttft_ms(t, self.stream),
                              when_expected_exceeds_remaining=d.when_expected_ttft_exceeds_remaining)

    def _fallback_reason(self) -> FallbackReason | None:
        if self.error is not None and self.error.flag == "UO":
            return FallbackReason.OVERLOAD
        f = self.last_failure
        if f is None:
            return FallbackReason.TIMEOUT if self.error is not None and self.error.status == 504 else None
        return fallback_reason_for(f.status, f.failure.value if f.failure else None)

    def _note_fallback(self, frm: ModelRuntime, to: ModelRuntime, reason: FallbackReason) -> None:
        if self.fallback_from is None:
            self.fallback_from = frm.name
        self.fallback_reason = reason.value
        self.engine.metrics.child(self.engine.metrics.fallbacks, frm.name, to.name, reason.value).inc()
        self.last_failure = None
        self.error = None
        self.retry_verdict = None  # the next model's retries decide what the client is told

    # ------------------------------------------------------------------ attempts within one model

    def _start(self, m: ModelRuntime, kind: AttemptKind, tried: set[str]) -> Attempt | None:
        t = now()
        h = self.headers
        decision = choose([d.candidate(t, self.stream) for d in m.deployments], strategy=m.strategy,
                          locality=m.locality, home_region=self.engine.home_region,
                          preferred_region=h.get("x-gateway-region"), pinned=h.get("x-gateway-deployment"),
                          exclude=frozenset(tried), cross_region_penalty_ms=m.penalty_ms,
                          rng=self.engine.registry.rng, rr_counter=m.rr)
        m.rr += 1
        if decision is None:
            self.error = errors.GatewayError(503, f"No deployment of model '{m.name}' is available in this region.",
                                             "server_error", "no_healthy_upstream", flag="UH")
            return None
        dep = m.by_id[decision.deployment_id]
        if dep.at_capacity():
            self.error = errors.overloaded(f"deployment '{dep.id}'")
            self.engine.metrics.child(self.engine.metrics.overflow, "deployment").inc()
            return None
        per_try = attempt_timeout(self.deadline, t, dep.per_try_s * 1000.0, MIN_ATTEMPT_MS)
        if per_try is None:
            self.error = errors.deadline_exceeded(
                f"{self._deadline_text()} ran out: {max(self.deadline.remaining(t), 0.0) * 1000.0:.0f} ms left, "
                f"less than the {MIN_ATTEMPT_MS:.0f} ms an upstream attempt needs. {self._attempts_text()}", "DT")
            self.timeout_flag = "total"
            return None
        if kind is AttemptKind.PRIMARY or self.route_reason is None:
            self.route_reason = decision.reason
        if self.t_routed is None:
            self.t_routed = t
        self.engine.metrics.child(self.engine.metrics.route_decisions, m.name, dep.id, decision.reason).inc()
        tried.add(dep.id)
        att = Attempt(kind, dep, len(self.attempts))
        self.attempts.append(att)
        self.state = ExchangeState.WAITING_FIRST_TOKEN
        return att

    def _run_attempt(self, att: Attempt, task: asyncio.Task | None) -> Any:
        """The attempt's coroutine; ``task`` is the one it will run in (None: find out when it starts)."""
        dep = att.dep
        t = att.t_start
        remaining = self.deadline.remaining(t)
        limit, flag = dep.ttft_s, "ttft"
        if dep.per_try_s < limit:
            limit, flag = dep.per_try_s, "per_try"
        if remaining < limit:
            limit, flag = remaining, "total"
        return att.run(self.upstream_path, self._body_for(dep), self._headers_for(att), self.stream,
                       max(limit, 0.001), flag, time.time(), self.engine.alarms, task)

    async def _run_model(self, m: ModelRuntime) -> Attempt | None:
        m.retry_budget.request_started()
        try:
            return await self._attempts(m)
        finally:
            m.retry_budget.request_finished()

    async def _attempts(self, m: ModelRuntime) -> Attempt | None:
        self.retry_state = RetryState(m.retry_budget, m.cfg.retry.max_retries, m.retry_on)
        self.model_hedges = 0
        tried: set[str] = set()
        att = self._start(m, AttemptKind.PRIMARY, tried)
        if att is None:
            return None
        hedge_s = self._hedge_delay(m)
        if hedge_s is None:
            while True:  # no hedging: attempts run inline, one after another
                await self._run_attempt(att, self.task)
                self._record(m, att)
                if att.ok:
                    return att
                att.finish()
                att = await self._next_after_failure(m, att, tried)
                if att is None:
                    return None
        return await self._race(m, att, tried, hedge_s)

    async def _race(self, m: ModelRuntime, first: Attempt, tried: set[str], hedge_s: float) -> Attempt | None:
        """Hedging: start another attempt when the first is late; the first usable token wins.

        An attempt that starts alone runs inline in this task: most requests never hedge, and a task per
        attempt cost ~6 % of the gateway's instructions. Hedges start from a timer as tasks (see _Race).
        """
        race = _Race(self, m, tried, hedge_s)
        race.inline = first
        race.arm(first.t_start)
        tasks = race.tasks
        try:
            while True:
                loser = None
                a = race.inline
                if a is not None:
                    try:
                        await self._run_attempt(a, self.task)
                        finished = [a]
                    except asyncio.CancelledError:
                        if not race.interrupted or self.task.uncancel() > 0:  # also cancelled from outside
                            raise
                        loser, finished = a, []
                    race.inline = None
                    race.interrupted = False
                    if tasks:  # hedges that ended meanwhile
                        finished.extend(tasks.pop(t) for t in [t for t in tasks if t.done()])
                else:
                    finished = [tasks.pop(t) for t in await race.wait()]
                winner = None
                failed: list[Attempt] = []
                for a in finished:
                    self._record(m, a)
                    if a.ok and winner is None:
                        winner = a
                    elif a.ok:
                        a.abort()  # two finished in the same tick: the second is a loser too
                        self._lost(m, a)
                    else:
                        failed.append(a)
                for a in failed:
                    a.finish()
                if winner is not None:
                    t_win = now()
                    if loser is not None:
                        self._lost(m, loser)
                        self._censored(loser, t_win, hedge_s)
                    for t, a in tasks.items():
                        t.cancel()
                        self._lost(m, a)
                        self._censored(a, t_win, hedge_s)
                    tasks.clear()
                    if winner.kind is AttemptKind.HEDGE:
                        self.engine.metrics.child(self.engine.metrics.hedges, m.name, "won").inc()
                    return winner
                if tasks:
                    self._plays_retry(m, len(failed), next(iter(tasks.values())))
                    continue
                race.disarm()  # nothing in flight: the retry (if any) gets a hedge timer of its own
                race.inline = await self._next_after_failure(m, failed[-1], tried)
                if race.inline is None:
                    return None
                race.arm(race.inline.t_start)
        finally:
            race.close()

    def _hedge(self, m: ModelRuntime, tried: set[str]) -> Attempt | None:
        """The hedge timer fired: start a hedge if the budget and a deployment allow."""
        if not m.hedge_bucket.try_take():
            self.engine.metrics.child(self.engine.metrics.hedges, m.name, "suppressed").inc()
            if "HS" not in self.flags:
                self.flags.append("HS")
            return None
        err = self.error
        h = self._start(m, AttemptKind.HEDGE, tried)
        if h is None:  # no room for a hedge: the attempts in flight still run, their outcome decides
            self.error = err
            return None
        self.hedges += 1
        self.model_hedges += 1
        return h

    def _plays_retry(self, m: ModelRuntime, failures: int, running: Attempt) -> None:
        """Failures while another attempt runs: that attempt now plays the retry, and takes a retry-budget
        slot when one is free (it is already running either way)."""
        self.retries += failures
        self.retry_state.count(failures)
        if running.budget is None and m.retry_budget.try_acquire():
            running.budget = m.retry_budget

    def _censored(self, a: Attempt, t: float, hedge_s: float) -> None:
        ms = loser_sample_ms(started=a.t_start, first_byte=a.t_first, cancelled=t, delay_s=hedge_s)
        if ms is not None:
            (a.dep.ttft_window if self.stream else a.dep.latency_window).add(ms, t)

    def _lost(self, m: ModelRuntime, a: Attempt) -> None:
        a.state = AttemptState.CANCELLED
        a.abort()
        a.finish()
        self.engine.metrics.child(self.engine.metrics.hedges, m.name, "cancelled").inc()
        if a.kind is AttemptKind.HEDGE:
            self.engine.metrics.child(self.engine.metrics.hedges, m.name, "lost").inc()
        self.engine.metrics.child(self.engine.metrics.attempts, m.name, a.dep.id, "cancelled").inc()

    async def _next_after_failure(self, m: ModelRuntime, failed: Attempt, tried: set[str]) -> Attempt | None:
        """Decide whether to retry a failed attempt; wait the backoff; start the retry."""
        self.last_failure = failed
        t = now()
        rc = m.cfg.retry
        # Retry-After binds the deployment that said it; when another deployment can take the retry, go there.
        retry_after = failed.retry_after_s
        if retry_after is not None and self._other_available(m, failed.dep, t):
            retry_after = None
        plan = self.retry_state.decide(
            failure=failed.failure, status=failed.status, failed=failed.dep.id,
            alternatives=[d.id for d in m.deployments if d.id not in tried and d.healthy(t)],
            retry_after_s=retry_after, remaining_s=self.deadline.remaining(t), min_attempt_s=MIN_ATTEMPT_MS / 1000.0,
            base_ms=rc.backoff_base_ms, max_ms=rc.backoff_max_ms, rng=self.engine.registry.rng, now=t)
        metrics = self.engine.metrics
        verdict = plan.verdict
        if not plan.retry:
            self.retry_verdict = verdict
            if verdict is RetryVerdict.BUDGET or verdict is RetryVerdict.HOPELESS:
                metrics.child(metrics.retry_budget_exhausted, m.name).inc()
            if verdict is RetryVerdict.BUDGET or verdict is RetryVerdict.LIMIT or verdict is RetryVerdict.HOPELESS:
                self.flags.append("URX")
            if verdict is not RetryVerdict.NOT_RETRIABLE:
                metrics.child(metrics.retries, m.name, verdict.value).inc()
            return None
        metrics.child(metrics.retries, m.name, verdict.value).inc()
        att = None
        try:
            if plan.delay_s > 0:
                w0 = now()
                await asyncio.sleep(plan.delay_s)
                self.waits.append((w0, now()))
            self.retries += 1
            att = self._start(m, AttemptKind.RETRY, tried)
            return att
        finally:
            if plan.charged:
                if att is None:
                    m.retry_budget.release()
                else:
                    att.budget = m.retry_budget  # the retry holds its budget slot until it ends

    def _other_available(self, m: ModelRuntime, dep: DeploymentRuntime, t: float) -> bool:
        return any(d is not dep and d.healthy(t) for d in m.deployments)

    def _hedge_delay(self, m: ModelRuntime) -> float | None:
        hc = m.cfg.hedging
        header = self.headers.get("x-gateway-hedge")
        if not hc.enabled and header is None:
            return None
        dep0 = self.attempts[0].dep
        window = dep0.ttft_window if self.stream else dep0.latency_window
        try:
            d = hedge_delay(enabled=hc.enabled or header is not None,
                            fixed_delay_ms=None if hc.delay_ms == "auto" else float(hc.delay_ms),
                            quantile=hc.quantile, min_delay_ms=hc.min_delay_ms, max_delay_ms=hc.max_delay_ms,
                            window=window, header=header, now=now())
        except ValueError as exc:
            raise errors.bad_request(str(exc), code="invalid_header") from None
        m.hedge_bucket.deposit()
        if d.delay_s is None:
            return None
        self.hedge_delay_ms = round3(d.delay_s * 1000.0)
        if m.hedge_delay_s != d.delay_s:
            m.hedge_delay_s = d.delay_s
            self.engine.metrics.child(self.engine.metrics.hedge_delay, m.name).set(d.delay_s)
        return d.delay_s

    # ------------------------------------------------------------------ bookkeeping per attempt

    def _record(self, m: ModelRuntime, a: Attempt) -> None:
        """Feed what an attempt showed into routing stats, outlier detection and metrics."""
        dep = a.dep
        t = now()
        metrics = self.engine.metrics
        who = blame(a.ok, a.failure, a.status, a.timeout_flag)
        if a.ok:
            dep.observe((a.t_first - a.t_start) * 1000.0, t, self.stream)
            failed = False
            outcome = "success"
        else:
            kind = a.failure
            failed = who is Blame.PROVIDER_FAILURE
            if kind is FailureKind.TIMEOUT:
                peak = (t - a.t_start) * 1000.0  # a stall counts as at least this slow
                ewma = dep.ttft if self.stream else dep.latency
                if failed:
                    ewma.observe(peak, t)
                else:  # the request's deadline cut it: "slower than peak", never a failure
                    sample = censored_latency_ms(ewma.value(t), peak)
                    if sample is not None:
                        ewma.observe(sample, t)
                outcome = "timeout" if failed else "deadline"
            elif kind is FailureKind.STATUS:
                outcome = str(a.status)
                if a.status == 429:
                    dep.cooldown_until = t + (a.retry_after_s if a.retry_after_s is not None else 1.0)
            else:
                outcome = kind.value
        if a.wire.connect_end is not None and a.wire.connect_start is not None:
            metrics.child(metrics.connect, dep.id).observe(a.wire.connect_end - a.wire.connect_start)
        metrics.child(metrics.attempts, m.name, dep.id, outcome).inc()
        evidence = retry_evidence(who, a.status)
        if evidence is not None:
            m.retry_budget.observe(dep.id, evidence, t)
        if who is Blame.NEUTRAL or who is Blame.DEADLINE:
            return  # client errors, 429 and the request's own deadline say nothing about the deployment's health
        verdict = record_outcome(dep.outlier, failed=failed, now=t,
                                 consecutive_threshold=m.cfg.outlier.consecutive_failures,
                                 base_ejection_s=m.cfg.outlier.base_ejection_s,
                                 max_ejection_s=m.cfg.outlier.max_ejection_s,
                                 ejected_share=m.ejected_share(t),
                                 max_ejection_percent=m.cfg.outlier.max_ejection_percent,
                                 deployments=len(m.deployments))
        if verdict is OutlierVerdict.EJECT:
            self.engine.on_ejected(dep)

    # ------------------------------------------------------------------ upstream request

    def _body_for(self, dep: DeploymentRuntime) -> bytes:
        b = self._bodies.get(dep.upstream_model)
        if b is None:
            self.body["model"] = dep.upstream_model
            b = self._bodies[dep.upstream_model] = orjson.dumps(self.body)
        return b

    def _headers_for(self, att: Attempt) -> dict[str, str]:
        base = self._base_headers
        if base is None:
            base = self._base_headers = self.engine.upstream_headers(self.headers, self.request_id)
        h = dict(base)
        h.update(att.dep.client.static_headers)  # the deployment's own headers (auth, static) always win
        # Retries and hedges get span ids of their own, unless OTLP export is on: then every attempt names
        # the exported server span, so no provider record hangs off a span that was never sent.
        span = self.trace.span_id if att.index == 0 or self.engine.tracing is not None else new_span_id()
        h["traceparent"] = f"00-{self.trace.trace_id}-{span}-{self.trace.flags}"
        if self.trace.tracestate:
            h["tracestate"] = self.trace.tracestate
        return h

    # ------------------------------------------------------------------ downstream

    async def _deliver(self, w: Attempt, send: Any) -> None:
        self.winner = w
        self.committed = True
        if w.kind is AttemptKind.RETRY and "URX" in self.flags:
            self.flags.remove("URX")
        if self.stream:
            self.state = ExchangeState.STREAMING
            if self.deadline.source in SDK_SOURCES:
                # An SDK's timeout bounds the wait for the response to start (and each read), not a
                # stream's length: from here on only the gateway's own limits and the client's header apply.
                self.deadline = resolve_deadline(self.t_received, self.engine.registry.models[self.model_name].total_s
                                                 * 1000.0, self.headers.get("x-gateway-timeout-ms"), None)
            await relay_stream(self, w, send)
        else:
            body = w.body
            p, c = usage_of(body)
            self.prompt_tokens, self.completion_tokens = p, c
            headers = self._response_headers(w, "application/json", len(body))
            up_ms = (w.t_end - w.t_start) * 1000.0
            gw_ms = (now() - self.t_received) * 1000.0 - up_ms
            headers.append((b"x-gateway-upstream-service-time", b"%d" % round(up_ms)))
            headers.append((b"server-timing", b"gateway;dur=%.3f, upstream;dur=%.3f" % (gw_ms, up_ms)))
            self.status = 200
            self.t_first_sent = now()
            self.closing = True
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            self.t_last_sent = now()
            self.bytes_sent = len(body)
            w.finish()
        self.state = ExchangeState.DONE

    def _response_headers(self, w: Attempt | None, content_type: str, length: int | None) -> list[tuple[bytes, bytes]]:
        h = [(b"content-type", content_type.encode()), (b"x-request-id", self.request_id.encode())]
        if length is not None:
            h.append((b"content-length", b"%d" % length))
        if w is not None:
            h.append((b"x-gateway-upstream", w.dep.id.encode()))
            if w.resp_headers:
                for k, v in w.resp_headers.items():
                    if k != "content-type":
                        h.append((k.encode(), v.encode("latin-1", "replace")))
        return h

    def _failure_error(self) -> GatewayError | tuple[int, bytes, Attempt]:
        if self.error is not None:
            return self.error
        f = self.last_failure
        if f is None:
            return errors.GatewayError(503, f"No deployment of model '{self.model_name}' could take the request.",
                                       "server_error", "no_healthy_upstream", flag="UH")
        if f.failure is FailureKind.STATUS:
            return (f.status, f.body, f)
        if f.failure is FailureKind.TIMEOUT:
            self.timeout_flag = f.timeout_flag
            if f.timeout_flag == "total":
                return errors.deadline_exceeded(
                    f"{self._deadline_text()} ran out waiting for deployment '{f.dep.id}'. {self._attempts_text()}",
                    "DT")
            limit = f.dep.cfg.timeouts.ttft_ms if f.timeout_flag == "ttft" else f.dep.cfg.timeouts.per_try_ms
            return errors.deadline_exceeded(
                f"Upstream timeout: deployment '{f.dep.id}' gave no {'first token' if self.stream else 'response'} "
                f"within {f.timeout_flag}_ms={limit:.0f}.", "UT")
        if f.failure is FailureKind.CONNECT:
            self.timeout_flag = f.timeout_flag  # "connect" when connect_ms ran out, else None (refused, DNS)
            return errors.upstream_unreachable(f"deployment '{f.dep.id}': {f.error_detail}", "UF")
        return errors.upstream_unreachable(f"deployment '{f.dep.id}' reset the connection: {f.error_detail}", "UC")

    def _deadline_ms(self) -> float:
        return (self.deadline.expires_at + self.deadline.margin_s - self.t_received) * 1000.0

    def _deadline_text(self) -> str:
        """Which limit fired, as the client set it: "Request deadline of 150 ms (x-stainless-timeout, ...)"."""
        d = self.deadline
        early = f", answered {d.margin_s * 1000.0:.0f} ms early so the SDK reads it" if d.margin_s else ""
        return f"Request deadline of {self._deadline_ms():.0f} ms ({d.source.value}{early})"

    def _attempts_text(self) -> str:
        """How long each attempt ran and how it ended, for the 504's message."""
        if not self.attempts:
            return "No upstream attempt was made."
        parts = []
        for a in self.attempts:
            ran = ((a.t_end if a.t_end is not None else now()) - a.t_start) * 1000.0
            if a.ok:
                how = "answered"
            elif a.failure is FailureKind.TIMEOUT:
                how = "cut by the deadline" if a.timeout_flag == "total" else f"{a.timeout_flag}_ms timeout"
            elif a.failure is FailureKind.STATUS:
                how = f"HTTP {a.status}"
            elif a.failure is not None:
                how = a.failure.value
            else:
                how = "cancelled" if a.state is AttemptState.CANCELLED else "running"
            parts.append(f"'{a.dep.id}' {ran:.0f} ms ({how})")
        return f"Attempts: {', '.join(parts)}."

    async def _send_error(self, send: Any, err: GatewayError | tuple[int, bytes, Attempt]) -> None:
        if isinstance(err, tuple):  # an upstream HTTP error, passed through with its status and body
            status, body, att = err
            headers = self._response_headers(att, (att.resp_headers or {}).get("content-type", "application/json"),
                                             len(body))
        else:
            self.error = err
            status, body = err.status, err.body()
            headers = self._response_headers(None, "application/json", len(body))
            if err.retry_after:
                headers.append((b"retry-after", err.retry_after.encode()))
            if err.flag and err.flag not in self.flags:
                self.flags.append(err.flag)
        if "DT" in self.flags or self.retry_verdict is RetryVerdict.HOPELESS:
            # The deadline is spent, or the deployment fails nearly everything: a client retry cannot
            # succeed and would only add load. The official SDKs honour this header.
            headers.append((b"x-should-retry", b"false"))
        self.status = status
        self.state = ExchangeState.FAILED
        self.t_first_sent = now()
        self.closing = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self.t_last_sent = now()
        self.bytes_sent = len(body)

    def _abort_all(self) -> None:
        for a in self.attempts:
            if a is not self.winner or not self.committed or self.client_gone:
                a.abort()
            a.finish()

    # ------------------------------------------------------------------ the record

    def upstream_wait_s(self) -> float:
        """Time the critical path spent waiting on upstreams: attempts in flight and backoff waits."""
        spans = [(a.t_start, a.t_end) for a in self.attempts if a.t_end is not None]
        spans.extend(self.waits)
        return union_length(spans)

    def record(self) -> dict[str, Any]:
        end = self.t_last_sent or now()
        w = self.winner or self.last_failure or (self.attempts[-1] if self.attempts else None)
        duration = (end - self.t_received) * 1000.0
        overhead = duration - self.upstream_wait_s() * 1000.0 if self.attempts else duration
        dep = w.dep if w is not None else None
        wire = w.wire if w is not None else None
        hedge_winner = None
        loser = None
        if self.hedges and self.winner is not None:
            hedge_winner = "hedge" if self.winner.kind is AttemptKind.HEDGE else "primary"
            losers = [a.dep.id for a in self.attempts if a is not self.winner and a.state is AttemptState.CANCELLED]
            loser = losers[0] if losers else None
        flags = ",".join(self.flags) if self.flags else "-"
        return {
            "start_time": iso_utc(self.wall_start),
            "request_id": self.request_id,
            "traceparent": self.trace.incoming or self.trace.traceparent,
            "method": "POST",
            "path": self.path,
            "model": self.model_name,
            "stream": self.stream,
            "response_code": self.status,
            "response_flags": flags,
            "duration_ms": round3(duration),
            "request_duration_ms": ms(self.t_received, self.t_body),
            "response_duration_ms": ms(self.t_received, w.t_headers) if w is not None else None,
            "response_tx_duration_ms": ms(w.t_headers, end) if w is not None and w.t_headers else None,
            "ttft_ms": ms(self.t_received, self.t_first_sent) if self.winner is not None else None,
            "upstream_service_time_ms": ms(w.t_start, w.t_end) if w is not None else None,
            "gateway_overhead_ms": round3(max(overhead, 0.0)),
            "upstream_host": dep.client.host if dep else None,
            "upstream_cluster": dep.id if dep else None,
            "upstream_region": dep.region if dep else None,
            "upstream_model": dep.upstream_model if dep else None,
            "upstream_connect_ms": wire.connect_ms if wire else None,
            "upstream_reused_connection": (wire.reused or wire.connect_start is None) if wire else None,
            "pool_wait_ms": wire.pool_wait_ms if wire else None,
            "attempts": len(self.attempts),
            "retry_count": self.retries,
            "hedge_count": self.hedges,
            "hedge_winner": hedge_winner,
            "hedge_delay_ms": self.hedge_delay_ms,
            "hedge_loser": loser,
            "backoff_ms": round3(sum(b - a for a, b in self.waits) * 1000.0) if self.waits else 0.0,
            "timeout_flag": self.timeout_flag,
            "retry_verdict": self.retry_verdict,  # why retries stopped (a StrEnum), None when they did not
            "route_reason": self.route_reason,  # a StrEnum: logged as its value
            "fallback_from": self.fallback_from,
            "fallback_reason": self.fallback_reason,
            "error_type": self.error.code if self.error is not None else None,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "user_agent": self.headers.get("user-agent"),
            "downstream_remote_address": self.client,
            "api_key_id": self.api_key_id,
        }




class _Race:
    """The moving parts of one hedging race: the hedge timer, the hedge tasks, and the interrupt.

    The attempt that started alone runs inline in the exchange's task (``inline``); hedges run as tasks.
    A hedge whose first token comes while ``inline`` still waits cancels the exchange's task, the way
    asyncio.timeout interrupts a wait, and sets ``interrupted`` so the race knows that cancel is its own.
    A hedge that fails meanwhile is accounted at once (its deployment's health must not wait for the
    primary). A class rather than closures: closures that call each other form a reference cycle per
    request, and freeing those wakes the cyclic GC (measured: +4 % instructions per request). The race
    and the exchange's alarms reference each other only while an alarm is armed.
    """

    __slots__ = ("ex", "m", "tried", "hedge_s", "tasks", "inline", "interrupted", "alarm", "waiter")

    def __init__(self, ex: Exchange, m: ModelRuntime, tried: set[str], hedge_s: float) -> None:
        self.ex = ex
        self.m = m
        self.tried = tried
        self.hedge_s = hedge_s
        self.tasks: dict[asyncio.Task, Attempt] = {}
        self.inline: Attempt | None = None
        self.interrupted = False
        self.alarm: Alarm | None = None
        self.waiter: asyncio.Future[None] | None = None

    def arm(self, started: float) -> None:
        """Hedge ``hedge_s`` after ``started`` unless this model's hedges are used up."""
        self.alarm = None
        if self.ex.model_hedges < self.m.cfg.hedging.max_hedges:
            self.alarm = self.ex.engine.alarms.at(started + self.hedge_s, self._fire)

    def disarm(self) -> None:
        self.ex.engine.alarms.cancel(self.alarm)
        self.alarm = None

    def _fire(self) -> None:
        self.alarm = None
        h = self.ex._hedge(self.m, self.tried)
        if h is not None:
            t = asyncio.get_running_loop().create_task(self.ex._run_attempt(h, None))
            t.add_done_callback(self._on_done)
            self.tasks[t] = h
            self.arm(h.t_start)

    def _on_done(self, t: asyncio.Task) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.inline is None or self.interrupted or t.cancelled():
            return
        a = self.tasks.get(t)
        if a is None:
            return
        if a.ok:
            self.interrupted = True
            self.ex.task.cancel()
        else:
            del self.tasks[t]
            self.ex._record(self.m, a)
            a.finish()
            self.ex._plays_retry(self.m, 1, self.inline)

    async def wait(self) -> list[asyncio.Task]:
        """The hedge tasks that are done: at least one (with no inline attempt, ``tasks`` is not empty).

        ``asyncio.wait(FIRST_COMPLETED)`` without its set-up on every call: each task got its done-callback
        at launch, and a wait is one future.
        """
        done = [t for t in self.tasks if t.done()]
        if done:
            return done
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        return [t for t in self.tasks if t.done()]

    def close(self) -> None:
        self.disarm()
        for t in self.tasks:
            t.cancel()


__all__ = ["Exchange", "ExchangeState", "DeadlineSource"]
