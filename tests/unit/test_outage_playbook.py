"""Outage playbooks (issue 18): the real Exchange against scripted providers, on a fake clock.

Each scenario sends many requests one after another, so the retry state, the failure rates and the
outlier detector evolve as they would in production, and then checks what clients got and what the
providers saw (tests/unit/scripted_upstream.py records every upstream request).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from scripted_upstream import DONE, OK, Playbook, Reply, Request, model, play, sse

from gateway.upstream.errors import UpstreamConnectError, UpstreamResetError

BUSY = {"error": {"message": "overloaded", "type": "server_error"}}
PLAY_GUARD_S = 60  # many requests each: more real time than one exchange's playbook


async def serve(
    pb: Playbook,
    n: int,
    headers: dict[str, str] | None = None,
) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    """``n`` requests one after another: (status, response headers, access-log record) of each."""
    out = []
    for _ in range(n):
        call = pb.call("m", headers=headers)
        rec = await pb.finish(call)
        assert call.down.status is not None
        out.append((call.down.status, call.down.headers, rec))
    return out


def test_one_of_two_deployments_failing_everything_is_failed_over_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        def handler(req: Request) -> Reply:
            if req.deployment == "a":
                return Reply.json(BUSY, status=503, after=0.01)
            return Reply.json(OK, after=0.02)

        pb = Playbook([model("m", "a", "b")], handler)
        results = await serve(pb, 40)
        assert [s for s, _, _ in results] == [200] * 40
        assert {rec["upstream_cluster"] for _, _, rec in results} == {"b"}
        # A failover to the healthy deployment waits no backoff and leaves the client no sign of trouble.
        assert all(rec["backoff_ms"] == 0.0 and rec["response_flags"] == "-" for _, _, rec in results)
        assert all(rec["retry_count"] <= 1 for _, _, rec in results)
        # The failing deployment sees at most one attempt per request, and none once it is ejected.
        to_a = pb.upstream.to("a")
        assert 1 <= len(to_a) <= 5  # outlier.consecutive_failures
        assert len(pb.upstream.requests) <= 40 + len(to_a)
        failovers = pb.engine.metrics.child(pb.engine.metrics.retries, "m", "failover")
        assert failovers.value == len(to_a)
        assert len(to_a) == 5  # ejected: the log names the failures that did it (not the counter reset since)
        assert "deployment a ejected for 30 s after 5 consecutive failures" in caplog.text

    caplog.set_level(logging.WARNING, logger="llmgw")
    play(scenario, PLAY_GUARD_S)


def test_the_only_deployment_failing_30_percent_is_retried_and_every_request_served() -> None:
    async def scenario() -> None:
        seen = [0]

        def handler(req: Request) -> Reply:
            seen[0] += 1
            if seen[0] % 10 in (1, 4, 7):  # 3 of every 10 upstream requests fail
                return Reply.json(BUSY, status=503, after=0.01)
            return Reply.json(OK, after=0.02)

        pb = Playbook([model("m", "a")], handler)
        results = await serve(pb, 100)
        assert [s for s, _, _ in results] == [200] * 100
        retried = [rec for _, _, rec in results if rec["retry_count"]]
        assert retried and all(rec["response_flags"] == "-" for rec in retried)
        # A deployment failing less than half the time gets free retries: about 1/(1 - 0.3) requests each.
        assert len(pb.upstream.requests) <= 150
        budget = pb.engine.registry.models["m"].retry_budget
        assert budget.exhausted_total == 0 and budget.acquired_total == 0  # never charged, never refused

    play(scenario, PLAY_GUARD_S)


def test_a_dead_deployment_is_hopeless_and_its_load_bounded() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [model("m", "a")], lambda req: Reply(fail=UpstreamConnectError("refused"), head_after=0.001)
        )
        results = await serve(pb, 100)
        assert {s for s, _, _ in results} == {502}
        # The failure rate climbs with every refused connect until retrying is hopeless: from then on a
        # request costs the provider one attempt and the client is told a retry cannot help.
        hopeless = [(h, rec) for _, h, rec in results if rec["retry_verdict"] == "hopeless"]
        assert len(hopeless) >= 50
        assert all(
            h.get("x-should-retry") == "false" and rec["attempts"] == 1 and "URX" in rec["response_flags"]
            for h, rec in hopeless
        )
        assert all(rec["retry_verdict"] == "hopeless" for _, _, rec in results[-50:])
        assert len(pb.upstream.requests) <= 100 * 1.5  # not max_retries + 1 = 11 per request
        metrics = pb.engine.metrics
        assert metrics.child(metrics.retries, "m", "hopeless").value == len(hopeless)

    play(scenario, PLAY_GUARD_S)


def test_a_client_deadline_shorter_than_the_provider_never_ejects_it() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", "b")], lambda req: Reply.json(OK, after=2.0))
        calls, results = [], []
        for _ in range(20):
            calls.append(call := pb.call("m", headers={"x-gateway-timeout-ms": "500"}))
            rec = await pb.finish(call)
            results.append((call.down.status, call.down.headers, rec))
        assert {s for s, _, _ in results} == {504}
        assert calls[0].down.json()["error"]["message"] == (
            "Request deadline of 500 ms (x-gateway-timeout-ms) ran out waiting for deployment 'a'. "
            "Attempts: 'a' 500 ms (cut by the deadline)."
        )
        for _, h, rec in results:
            assert h["x-should-retry"] == "false"  # the same deadline would run out again
            assert rec["response_flags"] == "DT" and rec["timeout_flag"] == "total"
        m = pb.engine.registry.models["m"]
        t = pb.clock.t
        assert all(
            d.healthy(t) for d in m.deployments
        )  # cut by the client's deadline: not the provider's fault
        assert pb.engine.metrics.child(pb.engine.metrics.ejections, "a").value == 0
        assert m.retry_budget.failure_rate("a", t) == 0.0 and m.retry_budget.failure_rate("b", t) == 0.0
        cut = pb.engine.metrics.child(pb.engine.metrics.attempts, "m", "a", "deadline").value
        assert cut >= 10
        # A client with time to wait is served by the same providers.
        call = pb.call("m")
        rec = await pb.finish(call)
        assert call.down.status == 200 and rec["response_flags"] == "-"

    play(scenario, PLAY_GUARD_S)


def test_streams_the_provider_breaks_mid_way_count_against_it_and_eject_it() -> None:
    """A stream's first token is a success; a provider that then breaks the stream (UC) or stalls it past
    idle_ms (UT) has failed, and five such streams in a row eject it like five failed attempts would."""

    async def scenario() -> None:
        broken = Reply.stream((0.01, sse("one")), then_fail=UpstreamResetError("peer closed"))
        stalled = Reply.stream((0.01, sse("one")), stall=True)
        pb = Playbook(
            [model("m", "a", "b", timeouts={"ttft_ms": 1000, "per_try_ms": 60000, "idle_ms": 200})],
            lambda req: (
                (broken if len(pb.upstream.to("a")) % 2 else stalled)
                if req.deployment == "a"
                else Reply.stream((0.01, sse("fine")), (0.01, DONE))
            ),
        )
        flags = []
        for _ in range(10):
            call = pb.call("m", stream=True)
            flags.append((await pb.finish(call))["response_flags"])
        a = pb.engine.registry.models["m"].by_id["a"]
        assert (
            flags.count("UC") + flags.count("UT") == 5
        )  # round-robin: a served every other request until ejected
        assert a.outlier.ejected_until > pb.clock.t  # ejected: the broken streams counted against it
        assert pb.upstream.to("a")[-1] is pb.upstream.to("a")[4]  # nothing more went to it

    play(scenario, PLAY_GUARD_S)


def test_streams_cut_by_the_clients_own_deadline_never_count_against_the_provider() -> None:
    async def scenario() -> None:
        slow = Reply.stream((0.01, sse("one")), (5.0, sse("two")), (0.01, DONE))
        pb = Playbook([model("m", "a")], lambda req: slow)
        for _ in range(8):
            call = pb.call("m", stream=True, headers={"x-gateway-timeout-ms": "1000"})
            assert (await pb.finish(call))["response_flags"] == "DT"
        a = pb.engine.registry.models["m"].by_id["a"]
        assert a.outlier.ejected_until <= pb.clock.t and a.outlier.consecutive_failures == 0

    play(scenario, PLAY_GUARD_S)


def test_a_deadline_too_short_for_any_attempt_says_how_much_was_left_without_rounding_it_up() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a")], lambda req: Reply.json(OK))
        call = pb.call("m", headers={"x-gateway-timeout-ms": "49.96"})
        rec = await pb.finish(call)
        assert call.down.status == 504 and rec["attempts"] == 0 and not pb.upstream.requests
        message = call.down.json()["error"]["message"]
        # "50 ms left, less than the 50 ms an upstream attempt needs" read as a contradiction
        assert (
            "ran out: 49.9 ms left" in message and "less than the 50 ms an upstream attempt needs" in message
        )
        assert rec["response_flags"] == "DT"

    play(scenario, PLAY_GUARD_S)
