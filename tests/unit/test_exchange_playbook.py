"""Playbooks of one Exchange: the real engine against scripted providers, on a fake clock.

Each test is a script: what the providers do and when (tests/unit/scripted_upstream.py), then what the
client receives and what the access log says. Time moves only when the test plays it, so a 30-second
Retry-After or a stalled stream costs nothing and no window can be missed on a busy machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from scripted_upstream import DONE, Playbook, Reply, Request, sse

from gateway.engine.interrupt import CancelReason
from gateway.upstream.errors import UpstreamConnectError, UpstreamProtocolError

OK = {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "ok"}}],
      "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
STREAM_TIMEOUTS = {"ttft_ms": 5000, "per_try_ms": 60000, "idle_ms": 30000}


def play(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))  # a real-time guard only against a hang of the test itself


def model(name: str, *deployments: str, **cfg: Any) -> dict[str, Any]:
    return {"name": name, "deployments": list(deployments), "routing": {"strategy": "round-robin"}, **cfg}


def by_deployment(**replies: Callable[[Request], Reply] | Reply) -> Callable[[Request], Reply]:
    def handler(req: Request) -> Reply:
        r = replies[req.deployment]
        return r(req) if callable(r) else r
    return handler


# ---------------------------------------------------------------------------------------------- hedging


def test_a_hedge_that_wins_interrupts_the_primary() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", "b", hedging={"enabled": True, "delay_ms": 100}, timeouts=STREAM_TIMEOUTS)],
                      by_deployment(a=Reply.stream((2.0, sse("slow")), (0, DONE)),
                                    b=Reply.stream((0.05, sse("fast")), (0.01, DONE))))
        call = pb.call("m", stream=True)
        await pb.play(0.099)
        assert [r.deployment for r in pb.upstream.requests] == ["a"]  # the primary alone, until the hedge delay
        await pb.play(0.002)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b"]  # the hedge goes out at 100 ms
        rec = await pb.finish(call)
        a, b = pb.upstream.requests
        assert a.closed_at is not None and a.closed_at == pytest.approx(1000.151, abs=0.002)  # interrupted at b's token
        assert b.closed_at is None and b.released
        assert call.down.status == 200 and call.down.events() == [
            '{"choices":[{"index":0,"delta":{"content":"fast"}}]}', "[DONE]"]
        assert (rec["hedge_count"], rec["hedge_winner"], rec["hedge_loser"]) == (1, "hedge", "a")
        assert (rec["response_code"], rec["response_flags"], rec["upstream_cluster"]) == (200, "-", "b")

    play(scenario)


def test_a_hedge_that_fails_while_the_primary_waits_counts_as_the_retry() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", "b", hedging={"enabled": True, "delay_ms": 100},
                             retry={"max_retries": 1, "backoff_base_ms": 0})],
                      by_deployment(a=Reply.json(OK, after=0.3),
                                    b=Reply.json({"error": {"message": "busy"}}, after=0.05, status=503)))
        call = pb.call("m")
        await pb.play(0.2)  # the hedge went out at 100 ms and failed at 150 ms; the primary still waits
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b"]
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b"]  # no third attempt: b was the retry
        assert call.down.status == 200 and call.down.json() == OK
        assert (rec["retry_count"], rec["hedge_count"], rec["attempts"]) == (1, 1, 2)
        assert (rec["upstream_cluster"], rec["hedge_winner"], rec["response_flags"]) == ("a", "primary", "-")

    play(scenario)


# ---------------------------------------------------------------------------------------------- retries


def test_a_retry_after_beyond_the_deadline_is_answered_at_once() -> None:
    async def scenario() -> None:
        limited = Reply.json({"error": {"message": "slow down", "type": "rate_limit"}}, status=429,
                             headers={"retry-after": "30"})
        pb = Playbook([model("m", "a", retry={"max_retries": 2})], by_deployment(a=limited))
        call = pb.call("m", headers={"x-gateway-timeout-ms": "2000"})
        await pb.play(0.0)  # no time passes: the answer must not wait for anything
        assert call.task.done()
        rec = await pb.finish(call)
        assert len(pb.upstream.requests) == 1
        assert call.down.status == 429 and call.down.headers["retry-after"] == "30"
        assert call.down.json()["error"]["message"] == "slow down"  # the provider's own answer, passed through
        assert rec["retry_count"] == 0 and rec["duration_ms"] == 0.0

    play(scenario)


def test_a_connect_failure_is_retried_on_another_deployment() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", "b", retry={"max_retries": 1, "backoff_base_ms": 0})],
                      by_deployment(a=Reply(fail=UpstreamConnectError("refused"), head_after=0.01),
                                    b=Reply.json(OK, after=0.02)))
        call = pb.call("m")
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b"]
        assert call.down.status == 200
        assert (rec["retry_count"], rec["upstream_cluster"], rec["response_flags"]) == (1, "b", "-")

    play(scenario)


def test_a_malformed_provider_answer_is_a_502_with_flag_upe() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", "b", retry={"max_retries": 1, "backoff_base_ms": 0}),
                       model("n", "c", retry={"retry_on": ["connect-failure", "5xx"]})],
                      lambda req: Reply(fail=UpstreamProtocolError("status line 'HTTP/1.1 99x'")))
        call = pb.call("m")
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b"]  # retried as a reset is
        assert call.down.status == 502
        assert call.down.json()["error"]["code"] == "upstream_protocol_error"
        assert (rec["response_code"], rec["response_flags"]) == (502, "URX,UPE")
        call = pb.call("n")  # "reset" not in retry_on: no retry
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b", "c"]
        assert (rec["response_code"], rec["response_flags"], rec["retry_count"]) == (502, "UPE", 0)

    play(scenario)


# ---------------------------------------------------------------------------------------------- streams


def test_a_stalled_stream_ends_with_an_sse_error_at_the_hard_end() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts={"ttft_ms": 1000, "per_try_ms": 60000, "idle_ms": 30000})],
                      by_deployment(a=Reply.stream((0.1, sse("one")), stall=True)))
        call = pb.call("m", stream=True, headers={"x-gateway-timeout-ms": "3000"})
        await pb.play(2.9)
        assert call.down.events() == ['{"choices":[{"index":0,"delta":{"content":"one"}}]}']  # relayed, then silence
        assert not call.down.complete
        await pb.play(0.2)  # the request deadline (3 s) is the hard end, before idle_ms and per_try_ms
        rec = await pb.finish(call)
        last = call.down.events()[-1]
        assert '"code":"timeout"' in last and "request deadline" in last
        assert call.down.complete and pb.upstream.requests[0].closed_at == pytest.approx(1003.0, abs=0.002)
        assert (rec["response_code"], rec["response_flags"], rec["timeout_flag"]) == (200, "DT", "total")

    play(scenario)


def test_a_stream_idle_too_long_ends_with_ut() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts={"ttft_ms": 1000, "per_try_ms": 60000, "idle_ms": 500})],
                      by_deployment(a=Reply.stream((0.1, sse("one")), (0.3, sse("two")), stall=True)))
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        assert len(call.down.events()) == 3 and "idle_ms=500" in call.down.events()[-1]
        assert pb.upstream.requests[0].closed_at == pytest.approx(1000.9, abs=0.002)  # 500 ms after "two"
        assert (rec["response_flags"], rec["timeout_flag"]) == ("UT", "idle")

    play(scenario)


# ---------------------------------------------------------------------------------------------- the client leaves


def test_the_client_leaves_while_waiting_for_the_first_token() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts=STREAM_TIMEOUTS)],
                      by_deployment(a=Reply.stream((4.0, sse("late")), (0, DONE))))
        call = pb.call("m", stream=True)
        await pb.play(0.5)
        call.exchange.cancel(CancelReason.CLIENT_GONE)
        rec = await pb.finish(call)
        assert call.down.messages == []  # nothing was ever sent
        assert pb.upstream.requests[0].closed_at == pytest.approx(1000.5, abs=0.002)  # aborted at once
        assert (rec["response_code"], rec["response_flags"]) == (499, "DC")

    play(scenario)


def test_the_client_leaves_mid_stream() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts=STREAM_TIMEOUTS)],
                      by_deployment(a=Reply.stream((0.1, sse("one")), (0.1, sse("two")), (5.0, sse("three")))))
        call = pb.call("m", stream=True)
        await pb.play(0.5)
        assert len(call.down.events()) == 2
        call.exchange.cancel(CancelReason.CLIENT_GONE)
        rec = await pb.finish(call)
        assert not call.down.complete and len(call.down.events()) == 2
        assert pb.upstream.requests[0].closed_at == pytest.approx(1000.5, abs=0.002)
        assert (rec["response_code"], rec["response_flags"]) == (200, "DC")
        assert rec["bytes_sent"] == len(call.down.body)

    play(scenario)


def test_the_client_leaves_during_a_hedge_race() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", "b", hedging={"enabled": True, "delay_ms": 100}, timeouts=STREAM_TIMEOUTS)],
                      by_deployment(a=Reply.stream((3.0, sse("a"))), b=Reply.stream((3.0, sse("b")))))
        call = pb.call("m", stream=True)
        await pb.play(0.2)
        assert len(pb.upstream.requests) == 2
        call.exchange.cancel(CancelReason.CLIENT_GONE)
        rec = await pb.finish(call)
        assert all(r.closed_at == pytest.approx(1000.2, abs=0.002) for r in pb.upstream.requests)
        assert (rec["response_code"], rec["response_flags"], rec["hedge_count"]) == (499, "DC", 1)

    play(scenario)


# ---------------------------------------------------------------------------------------------- fallbacks


def test_a_failing_model_falls_back_to_the_next() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", retry={"max_retries": 0}, fallbacks=["m2"]), model("m2", "c")],
                      by_deployment(a=Reply.json({"error": {"message": "down"}}, status=503, after=0.01),
                                    c=Reply.json(OK, after=0.01)))
        call = pb.call("m")
        rec = await pb.finish(call)
        assert [(r.deployment, r.body["model"]) for r in pb.upstream.requests] == [("a", "m"), ("c", "m2")]
        assert call.down.status == 200
        assert (rec["fallback_from"], rec["fallback_reason"], rec["upstream_cluster"]) == ("m", "5xx", "c")

    play(scenario)


def test_too_little_time_left_degrades_to_the_fallback_without_trying() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", fallbacks=["m2"], degrade={"when_remaining_ms_below": 1000}),
                       model("m2", "c")],
                      by_deployment(a=Reply.json(OK), c=Reply.json(OK, after=0.01)))
        call = pb.call("m", headers={"x-gateway-timeout-ms": "800"})
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["c"]  # the big model was never asked
        assert (rec["fallback_from"], rec["fallback_reason"], rec["response_code"]) == ("m", "degrade", 200)

    play(scenario)


# ---------------------------------------------------------------------------------------------- gateway bugs


def test_an_unexpected_exception_is_an_openai_shaped_500_with_flag_ge() -> None:
    def broken(req: Request) -> Reply:
        raise KeyError("a bug, not an upstream failure")

    async def scenario() -> None:
        pb = Playbook([model("m", "a")], broken)
        call = pb.call("m")
        rec = await pb.finish(call)
        assert call.down.status == 500
        err = call.down.json()["error"]
        assert (err["type"], err["code"]) == ("server_error", "internal_error")
        assert set(err) == {"message", "type", "param", "code"}
        assert (rec["response_code"], rec["response_flags"], rec["error_type"]) == (500, "GE", "internal_error")
        assert pb.engine.inflight == 0

    play(scenario)


def test_an_unexpected_exception_mid_stream_ends_the_stream_with_an_error_event() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts=STREAM_TIMEOUTS)],
                      by_deployment(a=Reply(200, {"content-type": "text/event-stream"}, [(0.1, sse("one"))],
                                            then_fail=RuntimeError("a bug in a client"))))
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        events = call.down.events()
        assert events[0] == '{"choices":[{"index":0,"delta":{"content":"one"}}]}'
        assert '"code":"internal_error"' in events[-1] and call.down.complete
        assert pb.upstream.requests[0].closed_at is not None
        assert (rec["response_code"], rec["response_flags"], rec["bytes_sent"]) == (200, "GE", len(call.down.body))

    play(scenario)


# ---------------------------------------------------------------------------------------------- shutdown


def test_shutdown_cuts_a_waiting_request_short_with_a_503_draining() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts=STREAM_TIMEOUTS)],
                      by_deployment(a=Reply.stream((4.0, sse("late")))))
        call = pb.call("m", stream=True)
        await pb.play(0.5)
        call.exchange.cancel(CancelReason.DRAIN)
        rec = await pb.finish(call)
        assert call.down.status == 503 and call.down.headers["retry-after"] == "1"
        assert call.down.json()["error"]["code"] == "draining"
        assert pb.upstream.requests[0].closed_at == pytest.approx(1000.5, abs=0.002)
        assert (rec["response_code"], rec["response_flags"]) == (503, "LR")

    play(scenario)


def test_shutdown_ends_a_started_stream_with_an_error_event() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts=STREAM_TIMEOUTS)],
                      by_deployment(a=Reply.stream((0.1, sse("one")), (5.0, sse("two")))))
        call = pb.call("m", stream=True)
        await pb.play(0.5)
        call.exchange.cancel(CancelReason.DRAIN)
        rec = await pb.finish(call)
        assert '"code":"draining"' in call.down.events()[-1] and call.down.complete
        assert (rec["response_code"], rec["response_flags"]) == (200, "LR")

    play(scenario)


def test_the_client_leaving_outranks_a_pending_first_token_timeout() -> None:
    async def scenario() -> None:
        pb = Playbook([model("m", "a", timeouts={"ttft_ms": 500, "per_try_ms": 60000, "idle_ms": 30000},
                             retry={"max_retries": 2})],
                      by_deployment(a=Reply.stream((4.0, sse("late")))))
        call = pb.call("m", stream=True)
        await pb.play(0.499)
        pb.clock.advance(0.002)  # the first-token alarm fires: its interrupt is pending, not yet delivered
        call.exchange.cancel(CancelReason.CLIENT_GONE)  # the client leaves in the same loop turn
        rec = await pb.finish(call)
        assert len(pb.upstream.requests) == 1  # no retry for a client that has gone
        assert (rec["response_code"], rec["response_flags"], rec["timeout_flag"]) == (499, "DC", None)

    play(scenario)


def test_a_retry_after_within_the_deadline_is_waited_out_on_the_clock() -> None:
    async def scenario() -> None:
        replies = iter([Reply.json({"error": {"message": "slow down"}}, status=429, headers={"retry-after": "0.5"}),
                        Reply.json(OK, after=0.01)])
        pb = Playbook([model("m", "a", retry={"max_retries": 1})], lambda req: next(replies))
        call = pb.call("m", headers={"x-gateway-timeout-ms": "3000"})
        await pb.play(0.499)
        assert len(pb.upstream.requests) == 1  # waiting out Retry-After
        await pb.play(0.002)
        assert len(pb.upstream.requests) == 2 and pb.upstream.requests[1].at == pytest.approx(1000.5)
        rec = await pb.finish(call)
        assert call.down.status == 200
        assert (rec["retry_count"], rec["backoff_ms"], rec["response_flags"]) == (1, 500.0, "-")

    play(scenario)
