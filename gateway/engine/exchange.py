"""One client request, from first byte in to last byte out.

The Exchange asks ``policy/`` where to go, when to retry, when to hedge and how long is left; runs
Attempts (concurrently when hedging), commits the first usable one, cancels the rest, relays bytes
downstream as they arrive, and ends as exactly one access-log record plus metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from enum import StrEnum
from typing import Any, Final

import orjson

from gateway import errors
from gateway.engine.alarms import Alarm
from gateway.engine.attempt import Attempt, AttemptKind, AttemptState
from gateway.engine.engine import Engine
from gateway.engine.interrupt import CancelReason, Interrupt
from gateway.engine.registry import DeploymentRuntime, ModelRuntime
from gateway.engine.relay import Downstream, RelayOutcome, Send, relay_stream, wait_delivery
from gateway.engine.sse import error_event, usage_of
from gateway.errors import MAX_ECHOED, GatewayError, echoed
from gateway.flags import ResponseFlag
from gateway.policy.attribution import Blame, blame, censored_latency_ms, retry_evidence
from gateway.policy.deadline import SDK_SOURCES, Deadline, DeadlineSource, attempt_timeout, resolve_deadline
from gateway.policy.fallback import FallbackReason, fallback_reason_for, should_degrade
from gateway.policy.hedging import hedge_delay, loser_sample_ms
from gateway.policy.outlier import OutlierVerdict, record_outcome
from gateway.policy.retry import FailureKind, RetryVerdict, cooldown_s
from gateway.policy.retry_state import RetryState
from gateway.policy.routing import RouteReason, choose
from gateway.telemetry.logs import REQUEST_ID
from gateway.telemetry.timing import iso_utc, ms, round3, union_length
from gateway.telemetry.tracing import TraceContext

log = logging.getLogger("llmgw")

MIN_ATTEMPT_MS: Final = 50.0
# How a committed stream can end that counts against its provider (broken, stalled, badly framed).
_PROVIDER_BROKE_STREAM = frozenset(
    {ResponseFlag.UPSTREAM_RESET, ResponseFlag.UPSTREAM_TIMEOUT, ResponseFlag.UPSTREAM_PROTOCOL_ERROR}
)


class ExchangeState(StrEnum):
    ROUTING = "routing"
    WAITING_FIRST_TOKEN = "waiting-first-token"
    STREAMING = "streaming"
    DONE = "done"
    FAILED = "failed"


class Exchange:
    __slots__ = (
        "engine",
        "path",
        "upstream_path",
        "body",
        "model_name",
        "stream",
        "headers",
        "t_received",
        "t_body",
        "upload_wait_s",
        "queue_wait_s",
        "downstream",
        "wall_start",
        "request_id",
        "client",
        "api_key_id",
        "trace",
        "state",
        "attempts",
        "waits",
        "flags",
        "retries",
        "hedges",
        "retry_state",
        "model_hedges",
        "hedge_delay_ms",
        "route_reason",
        "winner",
        "last_failure",
        "error",
        "timeout_flag",
        "fallback_from",
        "fallback_reason",
        "served_model",
        "status",
        "bytes_received",
        "bytes_sent",
        "t_routed",
        "t_first_sent",
        "t_last_sent",
        "prompt_tokens",
        "completion_tokens",
        "committed",
        "finished",
        "_closing",
        "_bodies",
        "_base_headers",
        "deadline",
        "rejected",
        "now",
        "interrupt",
        "relay",
        "affinity_key",
        "_fallbacks",
        "retry_verdict",
    )

    def __init__(
        self,
        engine: Engine,
        task: asyncio.Task,
        *,
        path: str,
        upstream_path: str,
        body: dict[str, Any],
        raw_len: int,
        headers: dict[str, str],
        t_received: float,
        t_body: float,
        wall_start: float,
        request_id: str,
        client: str | None,
        deadline: Deadline,
        rejected: GatewayError | None = None,
        api_key_id: str | None = None,
        # after every argument without a default: mypyc's text signature fails on a default before one without
        upload_wait_s: float = 0.0,
    ) -> None:
        """``deadline``: from ``Engine.check_request``; ``rejected``: the error it found (answered at once)."""
        self.engine = engine
        self.now = engine.clock.now
        # The request's task runs the inline attempts, the race and the relay; this is how to stop what it waits for.
        self.interrupt = Interrupt(task)
        self.path = path
        self.upstream_path = upstream_path
        self.body = body
        self.model_name: str = body["model"]
        self.stream = body.get("stream") is True
        self.headers = headers
        self.t_received = t_received
        self.t_body = t_body
        self.upload_wait_s = upload_wait_s  # waiting for the rest of a body sent in parts: the client's time
        # Set by the edge when its server tells: a pipelined request's wait behind earlier responses (the
        # client's queueing, not overhead), and the client's connection.
        self.queue_wait_s = 0.0
        self.downstream: Downstream | None = None
        self.wall_start = wall_start
        self.request_id = request_id
        self.client = client
        self.api_key_id = api_key_id
        self.trace = TraceContext(headers.get("traceparent"), headers.get("tracestate"))
        if engine.tracing is not None:
            engine.tracing.sample(self.trace)
        REQUEST_ID.set(request_id)  # log lines of this request's task (and the tasks it starts) carry it
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
        self._fallbacks: list[
            tuple[str, str, FallbackReason]
        ] = []  # hops decided, logged once a model they led to runs
        self.served_model: ModelRuntime | None = None
        self.status = 0
        self.bytes_received = raw_len
        self.bytes_sent = 0
        self.t_routed: float | None = None
        self.t_first_sent: float | None = None
        self.t_last_sent: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.committed = False
        self.finished = False
        self._closing = False  # the final body is being sent: a disconnect now changes nothing
        self._bodies: dict[str, bytes] = {}
        self._base_headers: dict[str, str] | None = None
        self.affinity_key: int | None = None  # routing.affinity: the request's key, once derived
        self.deadline = deadline
        self.rejected = rejected
        self.relay: RelayOutcome | None = None

    @property
    def closing(self) -> bool:
        """The final body is being sent: a disconnect now changes nothing."""
        return self._closing or (self.relay is not None and self.relay.closing)

    def cancel(self, reason: CancelReason) -> None:
        """Stop what the request's task waits for, for ``reason`` (see engine/interrupt.py)."""
        self.interrupt.cancel(reason)

    # ------------------------------------------------------------------ entry

    async def run(self, send: Send) -> None:
        eng = self.engine
        try:
            if self.rejected is not None:
                raise self.rejected
            model = eng.registry.models.get(self.model_name)
            if model is None:
                raise errors.model_not_found(self.model_name)
            winner = await self._run_chain(model)
            if winner is not None:
                await self._deliver(winner, send)
            else:
                await self._send_error(send, self._failure_error())
        except GatewayError as exc:
            await self._send_error(send, exc)
        except asyncio.CancelledError:
            # The client went away (the disconnect watcher interrupted us) or shutdown cut the request
            # short: abort everything upstream.
            self._abort_all(winner_too=True)
            reason = self.interrupt.claim(CancelReason.CLIENT_GONE, CancelReason.DRAIN)
            if reason is None:
                raise
            if reason is CancelReason.CLIENT_GONE:
                self.flags.append(ResponseFlag.CLIENT_GONE)
                if not self.status:
                    self.status = 499
            else:
                await self._end_early(send, errors.draining())
        except Exception:  # a gateway bug: answer like an API (500, flag GE), log it, never status 0
            log.exception("request %s failed inside the gateway", self.request_id)
            self._abort_all(winner_too=True)
            await self._end_early(send, errors.internal_error())
        finally:
            self._abort_all()
            for a in self.attempts:  # every attempt counted once: what is still open was cut short
                if a.outcome is None:
                    self._count(a, self._stream_outcome() if a is self.winner else "cancelled")
            self.finished = True
            eng.finish(self)

    # ------------------------------------------------------------------ models and fallbacks

    async def _run_chain(self, primary: ModelRuntime) -> Attempt | None:
        chain = primary.chain
        fallback_on = primary.cfg.fallback_on
        for i, m in enumerate(chain):
            last = i == len(chain) - 1
            if not last:
                t = self.now()
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
        return should_degrade(
            remaining_ms=self.deadline.remaining(t) * 1000.0,
            when_remaining_ms_below=d.when_remaining_ms_below,
            expected_ttft_ms=m.expected_ttft_ms(t, self.stream),
            when_expected_exceeds_remaining=d.when_expected_ttft_exceeds_remaining,
        )

    def _fallback_reason(self) -> FallbackReason | None:
        if self.error is not None and self.error.flag == ResponseFlag.OVERFLOW:
            return FallbackReason.OVERLOAD
        f = self.last_failure
        if f is None:
            return FallbackReason.TIMEOUT if self.error is not None and self.error.status == 504 else None
        return fallback_reason_for(f.status, f.failure.value if f.failure else None)

    def _note_fallback(self, frm: ModelRuntime, to: ModelRuntime, reason: FallbackReason) -> None:
        """A fallback decided; logged and counted only once an attempt of a model it led to starts (a
        fallback the deadline left no time for never ran)."""
        self._fallbacks.append((frm.name, to.name, reason))
        self.last_failure = None
        self.error = None
        # The next model's retries decide what the client is told, and its answer what the flags say: the
        # hop is fallback_from/fallback_reason, this model's retries running out llmgw_retries_total.
        self.retry_verdict = None
        if ResponseFlag.RETRY_LIMIT_EXCEEDED in self.flags:
            self.flags.remove(ResponseFlag.RETRY_LIMIT_EXCEEDED)

    def _fallbacks_ran(self) -> None:
        for frm, to, reason in self._fallbacks:
            if self.fallback_from is None:
                self.fallback_from = frm
            self.fallback_reason = reason.value
            self.engine.metrics.child(self.engine.metrics.fallbacks, frm, to, reason.value).inc()
        self._fallbacks.clear()

    # ------------------------------------------------------------------ attempts within one model

    def _start(self, m: ModelRuntime, kind: AttemptKind, tried: set[str]) -> Attempt | None:
        t = self.now()
        h = self.headers
        cands = [d.candidate(t, self.stream) for d in m.deployments]
        decision = None
        if (
            m.affinity is not None and "x-gateway-deployment" not in h
        ):  # routing.affinity: the key's ring first
            decision = m.affinity.route(self, m, cands, tried, t)
        if decision is None:
            decision = choose(
                cands,
                strategy=m.strategy,
                locality=m.locality,
                home_region=self.engine.home_region,
                preferred_region=h.get("x-gateway-region"),
                pinned=h.get("x-gateway-deployment"),
                exclude=frozenset(tried),
                cross_region_penalty_ms=m.penalty_ms,
                rng=self.engine.registry.rng,
                rr_counter=m.rr,
                now=t,
                probe_interval_s=m.probe_interval_s,
            )
        m.rr += 1
        if m.affinity is not None and kind is AttemptKind.PRIMARY:
            m.affinity.count(self, m, decision)
        if decision is None:
            self.error = errors.GatewayError(
                503,
                f"No deployment of model '{m.name}' is available in this region.",
                "server_error",
                "no_healthy_upstream",
                flag=ResponseFlag.NO_HEALTHY_UPSTREAM,
            )
            return None
        dep = m.by_id[decision.deployment_id]
        if dep.at_capacity():
            self.error = errors.overloaded(f"deployment '{dep.id}'")
            self.engine.metrics.child(self.engine.metrics.overflow, "deployment").inc()
            return None
        per_try = attempt_timeout(self.deadline, t, dep.per_try_s * 1000.0, MIN_ATTEMPT_MS)
        if per_try is None:
            left_ms = int(max(self.deadline.remaining(t), 0.0) * 10000.0) / 10.0  # down: 49.96 is not "50.0"
            self.error = errors.deadline_exceeded(
                f"{self._deadline_text()} ran out: {left_ms:.1f} ms left, "
                f"less than the {MIN_ATTEMPT_MS:.0f} ms an upstream attempt needs. {self._attempts_text()}",
                ResponseFlag.DEADLINE,
            )
            self.timeout_flag = "total"
            if self.attempts and kind is not AttemptKind.HEDGE:  # a retry or a fallback the deadline stopped
                self.retry_verdict = RetryVerdict.DEADLINE
            return None
        if kind is AttemptKind.PRIMARY or self.route_reason is None:
            self.route_reason = decision.reason
        if self.t_routed is None:
            self.t_routed = t
        self.engine.metrics.child(self.engine.metrics.route_decisions, m.name, dep.id, decision.reason).inc()
        tried.add(dep.id)
        att = Attempt(kind, dep, len(self.attempts), self.now)
        dep.picked_at = att.t_start
        if decision.reason is RouteReason.PROBE:
            dep.probe_at = att.t_start
        self.attempts.append(att)
        if self._fallbacks:
            self._fallbacks_ran()
        self.state = ExchangeState.WAITING_FIRST_TOKEN
        return att

    def _run_attempt(self, att: Attempt, interrupt: Interrupt) -> Coroutine[Any, Any, Attempt]:
        """The attempt's coroutine; ``interrupt`` stops the task it will run in."""
        dep = att.dep
        t = att.t_start
        remaining = self.deadline.remaining(t)
        limit, flag = dep.ttft_s, "ttft"
        if dep.per_try_s < limit:
            limit, flag = dep.per_try_s, "per_try"
        if remaining < limit:
            limit, flag = remaining, "total"
        return att.run(
            self.upstream_path,
            self._body_for(dep),
            self._headers_for(att),
            self.stream,
            max(limit, 0.001),
            flag,
            time.time(),
            self.engine.alarms,
            interrupt,
        )

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
                await self._run_attempt(att, self.interrupt)
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
                        await self._run_attempt(a, self.interrupt)
                        finished = [a]
                    except asyncio.CancelledError:
                        if (
                            self.interrupt.claim(CancelReason.HEDGE_WON) is None
                        ):  # not the race's own interrupt
                            raise
                        loser, finished = a, []
                    race.inline = None
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
                    t_win = self.now()
                    if loser is not None:
                        self._lost(m, loser)
                        self._censored(loser, t_win, hedge_s)
                    for a in tasks.values():
                        a.stop(CancelReason.RACE_LOST)
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
            if ResponseFlag.HEDGE_SUPPRESSED not in self.flags:
                self.flags.append(ResponseFlag.HEDGE_SUPPRESSED)
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
        assert self.retry_state is not None  # set by _attempts for the model being tried
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
        self._count(a, "cancelled")

    def _count(self, a: Attempt, outcome: str) -> None:
        """``llmgw_upstream_attempts_total``: each attempt once, with how it ended."""
        if a.outcome is None:
            a.outcome = outcome
            metrics = self.engine.metrics
            metrics.child(metrics.attempts, a.dep.model_name, a.dep.id, outcome).inc()

    def _stream_outcome(self) -> str:
        """How the committed stream ended: relayed to its end, timed out, reset, or cut short (the client
        left, shutdown, a gateway error)."""
        out = self.relay
        if out is None:
            return "cancelled"
        flag = out.failure_flag
        if flag is None:
            return "success" if out.closing else "cancelled"
        if flag is ResponseFlag.UPSTREAM_RESET:
            return "reset"
        if flag is ResponseFlag.UPSTREAM_PROTOCOL_ERROR:
            return FailureKind.PROTOCOL.value  # as for an answer refused before it started
        return "timeout"

    async def _next_after_failure(self, m: ModelRuntime, failed: Attempt, tried: set[str]) -> Attempt | None:
        """Decide whether to retry a failed attempt; wait the backoff; start the retry."""
        self.last_failure = failed
        t = self.now()
        assert failed.failure is not None  # a failed attempt says why
        rc = m.cfg.retry
        # Retry-After binds the deployment that said it; when another deployment can take the retry, go there.
        retry_after = failed.retry_after_s
        if retry_after is not None and self._other_available(m, failed.dep, t):
            retry_after = None
        assert self.retry_state is not None  # set by _attempts for the model being tried
        plan = self.retry_state.decide(
            failure=failed.failure,
            status=failed.status,
            failed=failed.dep.id,
            alternatives=[d.id for d in m.deployments if d.id not in tried and d.healthy(t)],
            retry_after_s=retry_after,
            remaining_s=self.deadline.remaining(t),
            min_attempt_s=MIN_ATTEMPT_MS / 1000.0,
            base_ms=rc.backoff_base_ms,
            max_ms=rc.backoff_max_ms,
            rng=self.engine.registry.rng,
            now=t,
        )
        metrics = self.engine.metrics
        verdict = plan.verdict
        if not plan.retry:
            self.retry_verdict = verdict
            if verdict is RetryVerdict.BUDGET or verdict is RetryVerdict.HOPELESS:
                metrics.child(metrics.retry_budget_exhausted, m.name).inc()
            if (
                verdict is RetryVerdict.BUDGET
                or verdict is RetryVerdict.LIMIT
                or verdict is RetryVerdict.HOPELESS
            ):
                self.flags.append(ResponseFlag.RETRY_LIMIT_EXCEEDED)
            if verdict is not RetryVerdict.NOT_RETRIABLE:
                metrics.child(metrics.retries, m.name, verdict.value).inc()
            return None
        att = None
        try:
            if plan.delay_s > 0:
                w0 = self.now()
                try:
                    await self.engine.clock.sleep(plan.delay_s)
                finally:  # also when cut short (the client left): waiting for a retry is no gateway time
                    w1 = self.now()
                    self.waits.append((w0, w1))
                    metrics.child(metrics.backoff, m.name).inc(w1 - w0)
            metrics.child(metrics.retries, m.name, verdict.value).inc()  # made, as retry_count counts it
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
            d = hedge_delay(
                enabled=hc.enabled or header is not None,
                fixed_delay_ms=None if hc.delay_ms == "auto" else float(hc.delay_ms),
                quantile=hc.quantile,
                min_delay_ms=hc.min_delay_ms,
                max_delay_ms=hc.max_delay_ms,
                window=window,
                header=header,
                now=self.now(),
            )
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
        t = self.now()
        metrics = self.engine.metrics
        ok = a.ok
        who = blame(ok, a.failure, a.status, a.timeout_flag)
        if ok:
            assert a.t_first is not None  # set with READY
            dep.observe((a.t_first - a.t_start) * 1000.0, t, self.stream, a.t_start == dep.probe_at)
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
                    dep.cooldown_until = t + cooldown_s(a.retry_after_s, m.cfg.outlier.max_ejection_s)
            else:
                outcome = kind.value if kind is not None else "failed"
        if a.wire.connect_end is not None and a.wire.connect_start is not None:
            metrics.child(metrics.connect, dep.id).observe(a.wire.connect_end - a.wire.connect_start)
        if ok and self.stream:
            return  # a stream's outcome is known when its relay ends (_stream_outcome, _stream_ended)
        self._count(a, outcome)
        evidence = retry_evidence(who, a.status)
        if evidence is not None:
            m.retry_budget.observe(dep.id, evidence, t)
        if who is Blame.NEUTRAL or who is Blame.DEADLINE:
            return  # client errors, 429 and the request's own deadline say nothing about the deployment's health
        self._judge(m, dep, failed, t)

    def _judge(self, m: ModelRuntime, dep: DeploymentRuntime, failed: bool, t: float) -> None:
        """One provider-caused outcome for outlier detection (ejection)."""
        verdict = record_outcome(
            dep.outlier,
            failed=failed,
            now=t,
            consecutive_threshold=m.cfg.outlier.consecutive_failures,
            base_ejection_s=m.cfg.outlier.base_ejection_s,
            max_ejection_s=m.cfg.outlier.max_ejection_s,
            ejected_share=m.ejected_share(t),
            max_ejection_percent=m.cfg.outlier.max_ejection_percent,
            deployments=len(m.deployments),
        )
        if verdict is OutlierVerdict.EJECT:
            self.engine.on_ejected(dep, m.cfg.outlier.consecutive_failures)

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
        # Each attempt names its own span id (with export on: the id of its exported attempt span).
        h["traceparent"] = self.trace.attempt_traceparent(att.index)
        if self.trace.tracestate:
            h["tracestate"] = self.trace.tracestate
        return h

    # ------------------------------------------------------------------ downstream

    async def _deliver(self, w: Attempt, send: Send) -> None:
        self.winner = w
        self.committed = True
        if w.kind is AttemptKind.RETRY and ResponseFlag.RETRY_LIMIT_EXCEEDED in self.flags:
            self.flags.remove(ResponseFlag.RETRY_LIMIT_EXCEEDED)
        if self.stream:
            self.state = ExchangeState.STREAMING
            if self.deadline.source in SDK_SOURCES:
                # An SDK's timeout bounds the wait for the response to start (and each read), not a
                # stream's length: from here on only the gateway's own limits and the client's header apply.
                self.deadline = resolve_deadline(
                    self.t_received,
                    self.engine.registry.models[self.model_name].total_s * 1000.0,
                    self.headers.get("x-gateway-timeout-ms"),
                    None,
                )
            out = self.relay = RelayOutcome()
            self.status = 200
            try:
                await relay_stream(
                    w,
                    send,
                    out,
                    headers=self._response_headers(w, "text/event-stream; charset=utf-8", None),
                    deadline=self.deadline,
                    alarms=self.engine.alarms,
                    interrupt=self.interrupt,
                    now=self.now,
                )
            finally:
                self._took(out)
            self._stream_ended(w, out)
        else:
            body = w.body
            p, c = usage_of(body)
            self.prompt_tokens, self.completion_tokens = p, c
            headers = self._response_headers(w, "application/json", len(body))
            assert w.t_end is not None  # a non-stream winner has its whole body
            up_ms = (w.t_end - w.t_start) * 1000.0
            gw_ms = (self.now() - self.t_received - self.queue_wait_s) * 1000.0 - up_ms
            headers.append((b"x-gateway-upstream-service-time", b"%d" % round(up_ms)))
            headers.append((b"server-timing", b"gateway;dur=%.3f, upstream;dur=%.3f" % (gw_ms, up_ms)))
            self.status = 200
            self.t_first_sent = self.now()
            self._closing = True
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            self.t_last_sent = self.now()
            self.bytes_sent = len(body)
            w.finish()
        await self._sent()
        self.state = ExchangeState.DONE

    async def _sent(self) -> None:
        """The response, a success or an error, was handed to the server whole: wait for its end to leave
        the gateway. If it never did (the client read nothing until server.send_timeout_s cut it, or reset
        the connection), the client did not get it: DC next to its status, as a stream cut mid-way."""
        if not await wait_delivery(self.downstream):
            self.flags.append(ResponseFlag.CLIENT_GONE)

    def _stream_ended(self, w: Attempt, out: RelayOutcome) -> None:
        """A committed stream's health, once its relay ended: relayed to its end (ok), or broken or stalled by
        the provider (UC, UPE, or UT: idle_ms / per_try_ms). Cut by the request's own deadline (DT), the client or
        a shutdown, it says nothing about the provider. Its first token alone proved nothing yet."""
        flag = out.failure_flag
        if flag in _PROVIDER_BROKE_STREAM:
            failed = True
        elif flag is None and out.closing:
            failed = False
        else:
            return
        m = self.served_model
        if m is None:
            return
        t = self.now()
        m.retry_budget.observe(w.dep.id, failed, t)
        self._judge(m, w.dep, failed, t)

    def _response_headers(
        self, w: Attempt | None, content_type: str, length: int | None
    ) -> list[tuple[bytes, bytes]]:
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
            return errors.GatewayError(
                503,
                f"No deployment of model '{self.model_name}' could take the request.",
                "server_error",
                "no_healthy_upstream",
                flag=ResponseFlag.NO_HEALTHY_UPSTREAM,
            )
        if f.failure is FailureKind.STATUS and f.status is not None:
            return (f.status, f.body, f)
        if f.failure is FailureKind.TIMEOUT:
            self.timeout_flag = f.timeout_flag
            if f.timeout_flag == "total":
                return errors.deadline_exceeded(
                    f"{self._deadline_text()} ran out waiting for deployment '{f.dep.id}'. {self._attempts_text()}",
                    ResponseFlag.DEADLINE,
                )
            limit = f.dep.cfg.timeouts.ttft_ms if f.timeout_flag == "ttft" else f.dep.cfg.timeouts.per_try_ms
            return errors.deadline_exceeded(
                f"Upstream timeout: deployment '{f.dep.id}' gave no {'first token' if self.stream else 'response'} "
                f"within {f.timeout_flag}_ms={limit:.0f}.",
                ResponseFlag.UPSTREAM_TIMEOUT,
            )
        if f.failure is FailureKind.CONNECT:
            self.timeout_flag = f.timeout_flag  # "connect" when connect_ms ran out, else None (refused, DNS)
            return errors.upstream_unreachable(
                f"deployment '{f.dep.id}': {f.error_detail}", ResponseFlag.UPSTREAM_CONNECT_FAILURE
            )
        if f.failure is FailureKind.PROTOCOL:
            return errors.upstream_protocol_error(f"deployment '{f.dep.id}': {f.error_detail}")
        return errors.upstream_unreachable(
            f"deployment '{f.dep.id}' reset the connection: {f.error_detail}", ResponseFlag.UPSTREAM_RESET
        )

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
            ran = ((a.t_end if a.t_end is not None else self.now()) - a.t_start) * 1000.0
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

    async def _send_error(self, send: Send, err: GatewayError | tuple[int, bytes, Attempt]) -> None:
        if isinstance(err, tuple):  # an upstream HTTP error, passed through with its status and body
            status, body, att = err
            headers = self._response_headers(
                att, (att.resp_headers or {}).get("content-type", "application/json"), len(body)
            )
        else:
            self.error = err
            status, body = err.status, err.body()
            headers = self._response_headers(None, "application/json", len(body))
            if err.retry_after:
                headers.append((b"retry-after", err.retry_after.encode()))
            if err.flag and err.flag not in self.flags:
                self.flags.append(err.flag)
        if self._client_retry_futile():
            # The official SDKs honour this header: a provider's own x-should-retry gives way to it.
            headers = [h for h in headers if h[0] != b"x-should-retry"]
            headers.append((b"x-should-retry", b"false"))
        self.status = status
        self.state = ExchangeState.FAILED
        self.t_first_sent = self.now()
        self._closing = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self.t_last_sent = self.now()
        self.bytes_sent = len(body)
        await self._sent()

    def _client_retry_futile(self) -> bool:
        """Whether a retry by the client could only add load: the deadline is spent, the deployment fails
        nearly everything, the model's retry budget is spent (an outage), or the gateway already retried up
        to max_retries (the SDK's own retries would multiply them: 3 x 3 upstream calls)."""
        v = self.retry_verdict
        return (
            ResponseFlag.DEADLINE in self.flags
            or v is RetryVerdict.HOPELESS
            or v is RetryVerdict.BUDGET
            or (v is RetryVerdict.LIMIT and self.retries > 0)
        )

    def _took(self, out: RelayOutcome) -> None:
        """What the relay did, into the record (also when the client cut it short)."""
        self.bytes_sent = out.bytes_sent
        self.t_first_sent = out.t_first_sent
        self.t_last_sent = out.t_last_sent
        if out.failure_flag is not None:
            self.flags.append(out.failure_flag)
            self.timeout_flag = out.timeout_flag
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens

    async def _end_early(self, send: Send, err: GatewayError) -> None:
        """Answer ``err`` as the response when none has started; else end the started one with it (a final
        SSE error event for a stream), so the client is never left with a silent cut."""
        self.error = err
        if err.flag and err.flag not in self.flags:
            self.flags.append(err.flag)
        try:
            started = self.t_first_sent is not None or (self.relay is not None and self.relay.started)
            if not started:
                await self._send_error(send, err)
            elif not self.closing:
                self._closing = True
                if self.stream:
                    ev = error_event(
                        err.message,
                        err.type,
                        err.code or "error",
                        self.relay is None or self.relay.at_event_end,
                    )
                    await send({"type": "http.response.body", "body": ev, "more_body": True})
                    self.bytes_sent += len(ev)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.t_last_sent = self.now()
                await self._sent()
        except Exception:  # the client is gone too: the record still says what happened
            log.debug("could not answer request %s after %s", self.request_id, err.code)
        if not self.status:
            self.status = err.status

    def _abort_all(self, winner_too: bool = False) -> None:
        """Abort attempts still holding a connection; the committed winner too when the request was cut short."""
        for a in self.attempts:
            if a is not self.winner or not self.committed or winner_too:
                a.abort()
            a.finish()

    # ------------------------------------------------------------------ the record

    def upstream_wait_s(self) -> float:
        """Time the critical path spent waiting on upstreams: attempts in flight and backoff waits."""
        spans = [(a.t_start, a.t_end) for a in self.attempts if a.t_end is not None]
        spans.extend(self.waits)
        return union_length(spans)

    def record(self) -> dict[str, Any]:
        end = self.t_last_sent or self.now()
        w = self.winner or self.last_failure or (self.attempts[-1] if self.attempts else None)
        duration = (end - self.t_received) * 1000.0
        overhead = duration - (self.upload_wait_s + self.queue_wait_s) * 1000.0
        if self.attempts:
            overhead -= self.upstream_wait_s() * 1000.0
        dep = w.dep if w is not None else None
        wire = w.wire if w is not None else None
        hedge_winner = None
        loser = None
        if self.hedges and self.winner is not None:
            hedge_winner = "hedge" if self.winner.kind is AttemptKind.HEDGE else "primary"
            losers = [
                a.dep.id for a in self.attempts if a is not self.winner and a.state is AttemptState.CANCELLED
            ]
            loser = losers[0] if losers else None
        flags = ",".join(self.flags) if self.flags else "-"
        return {
            "start_time": iso_utc(self.wall_start),
            "request_id": self.request_id,
            "traceparent": self.trace.incoming or self.trace.traceparent,
            "method": "POST",
            "path": self.path,
            "model": model if len(model := self.model_name) <= MAX_ECHOED else echoed(model),
            "stream": self.stream,
            "response_code": self.status,
            "response_flags": flags,
            "duration_ms": round3(duration),
            "request_duration_ms": ms(self.t_received, self.t_body),
            "response_duration_ms": ms(self.t_received, w.t_headers) if w is not None else None,
            "response_tx_duration_ms": ms(w.t_headers, end) if w is not None and w.t_headers else None,
            # the first content token: none for a stream that ended (or was committed) without one
            "ttft_ms": ms(self.t_received, self.t_first_sent)
            if self.winner is not None and self.winner.token_seen
            else None,
            "upstream_service_time_ms": ms(w.t_start, w.t_end) if w is not None else None,
            "gateway_overhead_ms": round3(max(overhead, 0.0)),
            "pipeline_wait_ms": round3(q * 1000.0) if (q := self.queue_wait_s) else None,
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
            "affinity_key": f"{self.affinity_key:016x}" if self.affinity_key is not None else None,
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

    The attempt that started alone runs inline in the exchange's task (``inline``); hedges run as tasks,
    each with an ``Interrupt`` of its own. A hedge whose first token comes while ``inline`` still waits
    interrupts the exchange's task (HEDGE_WON), which the race claims; losers are interrupted (RACE_LOST).
    A hedge that fails meanwhile is accounted at once (its deployment's health must not wait for the
    primary). A class rather than closures: closures that call each other form a reference cycle per
    request, and freeing those wakes the cyclic GC (measured: +4 % instructions per request). The race
    and the exchange's alarms reference each other only while an alarm is armed.
    """

    __slots__ = ("ex", "m", "tried", "hedge_s", "tasks", "inline", "alarm", "waiter")

    def __init__(self, ex: Exchange, m: ModelRuntime, tried: set[str], hedge_s: float) -> None:
        self.ex = ex
        self.m = m
        self.tried = tried
        self.hedge_s = hedge_s
        self.tasks: dict[asyncio.Task, Attempt] = {}
        self.inline: Attempt | None = None
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
            h.interrupt = interrupt = Interrupt(None)
            t = asyncio.get_running_loop().create_task(self.ex._run_attempt(h, interrupt))
            interrupt.task = t
            t.add_done_callback(self._on_done)
            self.tasks[t] = h
            self.arm(h.t_start)

    def _on_done(self, t: asyncio.Task) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.inline is None or self.ex.interrupt.pending is not None or t.cancelled():
            return
        a = self.tasks.get(t)
        if a is None:
            return
        if a.ok:
            self.ex.interrupt.cancel(CancelReason.HEDGE_WON)
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
        for a in self.tasks.values():
            a.stop(CancelReason.RACE_LOST)


__all__ = ["Exchange", "ExchangeState", "DeadlineSource"]
