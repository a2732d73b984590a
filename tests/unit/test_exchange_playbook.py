"""Playbooks of one Exchange: the real engine against scripted providers, on a fake clock.

Each test is a script: what the providers do and when (tests/unit/scripted_upstream.py), then what the
client receives and what the access log says. Time moves only when the test plays it, so a 30-second
Retry-After or a stalled stream costs nothing and no window can be missed on a busy machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from scripted_upstream import DONE, OK, Downstream, Playbook, Reply, Request, model, play, sse

from gateway.engine.interrupt import CancelReason
from gateway.upstream.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamResetError

STREAM_TIMEOUTS = {"ttft_ms": 5000, "per_try_ms": 60000, "idle_ms": 30000}


def by_deployment(**replies: Callable[[Request], Reply] | Reply) -> Callable[[Request], Reply]:
    def handler(req: Request) -> Reply:
        r = replies[req.deployment]
        return r(req) if callable(r) else r

    return handler


def streaming(a: Reply) -> Playbook:
    """Model m streamed from deployment a alone."""
    return Playbook([model("m", "a", timeouts=STREAM_TIMEOUTS)], by_deployment(a=a))


def hedged_streaming(a: Reply, b: Reply) -> Playbook:
    """Model m streamed from deployment a, hedged to b after 100 ms."""
    hedging = {"enabled": True, "delay_ms": 100}
    return Playbook(
        [model("m", "a", "b", hedging=hedging, timeouts=STREAM_TIMEOUTS)], by_deployment(a=a, b=b)
    )


# ---------------------------------------------------------------------------------------------- hedging


def test_a_hedge_that_wins_interrupts_the_primary() -> None:
    async def scenario() -> None:
        pb = hedged_streaming(
            a=Reply.stream((2.0, sse("slow")), (0, DONE)), b=Reply.stream((0.05, sse("fast")), (0.01, DONE))
        )
        call = pb.call("m", stream=True)
        await pb.play(0.099)
        assert [r.deployment for r in pb.upstream.requests] == [
            "a"
        ]  # the primary alone, until the hedge delay
        await pb.play(0.002)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b"]  # the hedge goes out at 100 ms
        rec = await pb.finish(call)
        a, b = pb.upstream.requests
        assert a.closed_at is not None and a.closed_at == pytest.approx(
            1000.151, abs=0.002
        )  # interrupted at b's token
        assert b.closed_at is None and b.released
        assert call.down.status == 200 and call.down.events() == [
            '{"choices":[{"index":0,"delta":{"content":"fast"}}]}',
            "[DONE]",
        ]
        assert (rec["hedge_count"], rec["hedge_winner"], rec["hedge_loser"]) == (1, "hedge", "a")
        assert (rec["response_code"], rec["response_flags"], rec["upstream_cluster"]) == (200, "-", "b")

    play(scenario)


def test_a_hedge_that_fails_while_the_primary_waits_counts_as_the_retry() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [
                model(
                    "m",
                    "a",
                    "b",
                    hedging={"enabled": True, "delay_ms": 100},
                    retry={"max_retries": 1, "backoff_base_ms": 0},
                )
            ],
            by_deployment(
                a=Reply.json(OK, after=0.3),
                b=Reply.json({"error": {"message": "busy"}}, after=0.05, status=503),
            ),
        )
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
        limited = Reply.json(
            {"error": {"message": "slow down", "type": "rate_limit"}},
            status=429,
            headers={"retry-after": "30"},
        )
        pb = Playbook([model("m", "a", retry={"max_retries": 2})], by_deployment(a=limited))
        call = pb.call("m", headers={"x-gateway-timeout-ms": "2000"})
        await pb.play(0.0)  # no time passes: the answer must not wait for anything
        assert call.task.done()
        rec = await pb.finish(call)
        assert len(pb.upstream.requests) == 1
        assert call.down.status == 429 and call.down.headers["retry-after"] == "30"
        assert (
            call.down.json()["error"]["message"] == "slow down"
        )  # the provider's own answer, passed through
        assert rec["retry_count"] == 0 and rec["duration_ms"] == 0.0

    play(scenario)


def test_a_connect_failure_is_retried_on_another_deployment() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [model("m", "a", "b", retry={"max_retries": 1, "backoff_base_ms": 0})],
            by_deployment(
                a=Reply(fail=UpstreamConnectError("refused"), head_after=0.01), b=Reply.json(OK, after=0.02)
            ),
        )
        call = pb.call("m")
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b"]
        assert call.down.status == 200
        assert (rec["retry_count"], rec["upstream_cluster"], rec["response_flags"]) == (1, "b", "-")

    play(scenario)


def test_a_malformed_provider_answer_is_a_502_with_flag_upe() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [
                model("m", "a", "b", retry={"max_retries": 1, "backoff_base_ms": 0}),
                model("n", "c", retry={"retry_on": ["connect-failure", "5xx"]}),
            ],
            lambda req: Reply(fail=UpstreamProtocolError("status line 'HTTP/1.1 99x'")),
        )
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
        pb = Playbook(
            [model("m", "a", timeouts={"ttft_ms": 1000, "per_try_ms": 60000, "idle_ms": 30000})],
            by_deployment(a=Reply.stream((0.1, sse("one")), stall=True)),
        )
        call = pb.call("m", stream=True, headers={"x-gateway-timeout-ms": "3000"})
        await pb.play(2.9)
        assert call.down.events() == [
            '{"choices":[{"index":0,"delta":{"content":"one"}}]}'
        ]  # relayed, then silence
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
        pb = Playbook(
            [model("m", "a", timeouts={"ttft_ms": 1000, "per_try_ms": 60000, "idle_ms": 500})],
            by_deployment(a=Reply.stream((0.1, sse("one")), (0.3, sse("two")), stall=True)),
        )
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        assert len(call.down.events()) == 3 and "idle_ms=500" in call.down.events()[-1]
        assert pb.upstream.requests[0].closed_at == pytest.approx(1000.9, abs=0.002)  # 500 ms after "two"
        assert (rec["response_flags"], rec["timeout_flag"]) == ("UT", "idle")

    play(scenario)


def test_a_stream_badly_framed_mid_way_ends_with_upe_and_counts_against_the_provider() -> None:
    async def scenario() -> None:
        bad = Reply.stream((0.01, sse("one")), then_fail=UpstreamProtocolError("invalid chunk size"))
        pb = streaming(a=bad)
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        last = orjson.loads(call.down.events()[-1])
        assert last["error"]["code"] == "upstream_protocol_error" and "'a'" in last["error"]["message"]
        assert (rec["response_code"], rec["response_flags"]) == (200, "UPE")
        assert pb.engine.registry.models["m"].by_id["a"].outlier.consecutive_failures == 1

    play(scenario)


class SlowReader:
    """A client that stops reading at its ``stop_at``-th body message: that send waits (as uvicorn's does
    while the socket is full) until ``resume`` is set; the message counts as received only then."""

    def __init__(self, call: Any, stop_at: int) -> None:
        self.resume = asyncio.Event()
        self._down = call.down
        self._stop_at = stop_at
        self._bodies = 0
        call.down.send = self.send  # read by the exchange when its task first runs

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self._bodies += 1
            if self._bodies == self._stop_at:
                await self.resume.wait()
        await Downstream.send(self._down, message)


def test_a_client_that_stops_reading_is_not_the_providers_idleness() -> None:
    """idle_ms is the provider's silence: while a send waits for the client, the gateway reads nothing from
    the provider, so a client that pauses longer than idle_ms and then reads on gets the whole stream."""

    async def scenario() -> None:
        chunks = [sse("one"), sse("two"), sse("three"), DONE]
        pb = Playbook(
            [model("m", "a", timeouts={"ttft_ms": 1000, "per_try_ms": 60000, "idle_ms": 500})],
            by_deployment(a=Reply.stream(*((0.01, c) for c in chunks))),
        )
        call = pb.call("m", stream=True)
        reader = SlowReader(call, stop_at=2)
        await pb.play(3.0)  # six idle_ms with the client not reading
        assert not call.task.done()
        reader.resume.set()
        rec = await pb.finish(call)
        assert call.down.body == b"".join(chunks)
        assert (rec["response_flags"], rec["timeout_flag"]) == ("-", None)

    play(scenario)


def test_the_hard_end_finding_the_client_not_reading_is_dt_and_not_held_against_the_provider() -> None:
    async def scenario() -> None:
        chunks = [sse("one"), sse("two"), DONE]
        pb = Playbook(
            [model("m", "a", timeouts={"ttft_ms": 1000, "per_try_ms": 2000, "idle_ms": 500})],
            by_deployment(a=Reply.stream(*((0.01, c) for c in chunks))),
        )
        for _ in range(6):  # more than outlier.consecutive_failures (5)
            call = pb.call("m", stream=True)
            reader = SlowReader(call, stop_at=2)
            await pb.play(2.5)  # per_try_ms (2 s) passes while the client does not read
            reader.resume.set()
            rec = await pb.finish(call)
            assert (rec["response_flags"], rec["timeout_flag"]) == ("DT", "per_try")
            assert "while the client was not reading" in call.down.events()[-1]
        a = pb.engine.registry.models["m"].by_id["a"]
        assert a.outlier.consecutive_failures == 0 and a.outlier.ejected_until <= pb.clock.t

    play(scenario)


# ---------------------------------------------------------------------------------------------- the client leaves


def test_the_client_leaves_while_waiting_for_the_first_token() -> None:
    async def scenario() -> None:
        pb = streaming(a=Reply.stream((4.0, sse("late")), (0, DONE)))
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
        pb = streaming(a=Reply.stream((0.1, sse("one")), (0.1, sse("two")), (5.0, sse("three"))))
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
        pb = hedged_streaming(a=Reply.stream((3.0, sse("a"))), b=Reply.stream((3.0, sse("b"))))
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
        pb = Playbook(
            [model("m", "a", retry={"max_retries": 0}, fallbacks=["m2"]), model("m2", "c")],
            by_deployment(
                a=Reply.json({"error": {"message": "down"}}, status=503, after=0.01),
                c=Reply.json(OK, after=0.01),
            ),
        )
        call = pb.call("m")
        rec = await pb.finish(call)
        assert [(r.deployment, r.body["model"]) for r in pb.upstream.requests] == [("a", "m"), ("c", "m2")]
        assert call.down.status == 200
        assert (rec["fallback_from"], rec["fallback_reason"], rec["upstream_cluster"]) == ("m", "5xx", "c")

    play(scenario)


def _retries_ran_out_then(fallback: Reply) -> tuple[Playbook, Any]:
    """Model m retries once (a, then b), both 503: its retries run out; then it falls back to m2 (c)."""
    busy = Reply.json({"error": {"message": "busy"}}, status=503, after=0.01)
    pb = Playbook(
        [
            model("m", "a", "b", retry={"max_retries": 1}, fallbacks=["m2"]),
            model("m2", "c", retry={"max_retries": 0}),
        ],
        by_deployment(a=busy, b=busy, c=fallback),
    )
    return pb, pb.call("m")


def _metric(pb: Playbook, line_start: str) -> float:
    text = pb.engine.metrics.render()[0].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_a_fallback_that_answers_leaves_no_retry_flag_of_the_model_before_it() -> None:
    """Flags and retry_verdict describe the answer the client got: a fallback that answered is a success
    (the first model's retries running out is its fallback_reason and llmgw_retries_total), not a URX with a
    null retry_verdict."""

    async def scenario() -> None:
        pb, call = _retries_ran_out_then(Reply.json(OK, after=0.01))
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["a", "b", "c"]
        assert (call.down.status, rec["response_flags"], rec["retry_verdict"]) == (200, "-", None)
        assert (rec["retry_count"], rec["fallback_from"], rec["fallback_reason"]) == (1, "m", "5xx")
        assert _metric(pb, 'llmgw_retries_total{model="m",reason="retry-limit"}') == 1
        assert _metric(pb, 'llmgw_fallbacks_total{from="m",reason="5xx",to="m2"}') == 1
        assert _metric(pb, "llmgw_requests_total{") == 1
        assert _metric(pb, 'llmgw_requests_total{code="200",deployment="c",flags="-",') == 1

    play(scenario)


def test_a_fallback_that_fails_too_is_flagged_for_its_own_retries_once() -> None:
    async def scenario() -> None:
        pb, call = _retries_ran_out_then(Reply.json({"error": {"message": "down"}}, status=503, after=0.01))
        rec = await pb.finish(call)
        assert (call.down.status, rec["response_flags"], rec["retry_verdict"]) == (503, "URX", "retry-limit")
        assert (rec["upstream_cluster"], rec["fallback_from"]) == ("c", "m")

    play(scenario)


def test_too_little_time_left_degrades_to_the_fallback_without_trying() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [model("m", "a", fallbacks=["m2"], degrade={"when_remaining_ms_below": 1000}), model("m2", "c")],
            by_deployment(a=Reply.json(OK), c=Reply.json(OK, after=0.01)),
        )
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
        assert (rec["response_code"], rec["response_flags"], rec["error_type"]) == (
            500,
            "GE",
            "internal_error",
        )
        assert pb.engine.inflight == 0

    play(scenario)


def test_an_unexpected_exception_mid_stream_ends_the_stream_with_an_error_event() -> None:
    async def scenario() -> None:
        pb = streaming(a=Reply.stream((0.1, sse("one")), then_fail=RuntimeError("a bug in a client")))
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        events = call.down.events()
        assert events[0] == '{"choices":[{"index":0,"delta":{"content":"one"}}]}'
        assert '"code":"internal_error"' in events[-1] and call.down.complete
        assert pb.upstream.requests[0].closed_at is not None
        assert (rec["response_code"], rec["response_flags"], rec["bytes_sent"]) == (
            200,
            "GE",
            len(call.down.body),
        )

    play(scenario)


# ---------------------------------------------------------------------------------------------- shutdown


def test_shutdown_cuts_a_waiting_request_short_with_a_503_draining() -> None:
    async def scenario() -> None:
        pb = streaming(a=Reply.stream((4.0, sse("late"))))
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
        pb = streaming(a=Reply.stream((0.1, sse("one")), (5.0, sse("two"))))
        call = pb.call("m", stream=True)
        await pb.play(0.5)
        call.exchange.cancel(CancelReason.DRAIN)
        rec = await pb.finish(call)
        assert '"code":"draining"' in call.down.events()[-1] and call.down.complete
        assert (rec["response_code"], rec["response_flags"]) == (200, "LR")

    play(scenario)


def test_the_client_leaving_outranks_a_pending_first_token_timeout() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [
                model(
                    "m",
                    "a",
                    timeouts={"ttft_ms": 500, "per_try_ms": 60000, "idle_ms": 30000},
                    retry={"max_retries": 2},
                )
            ],
            by_deployment(a=Reply.stream((4.0, sse("late")))),
        )
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
        replies = iter(
            [
                Reply.json({"error": {"message": "slow down"}}, status=429, headers={"retry-after": "0.5"}),
                Reply.json(OK, after=0.01),
            ]
        )
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


@pytest.mark.parametrize("retry_after", ["0", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_retry_after_of_zero_or_in_the_past_still_backs_off(retry_after: str) -> None:
    """A rate-limited provider saying "now" (or a date its skewed clock put in the past) is retried after the
    usual jittered backoff, as one that said nothing is: never harder."""

    async def scenario() -> dict[str, Any]:
        limited = Reply.json(
            {"error": {"message": "slow down"}}, status=429, headers={"retry-after": retry_after}
        )
        pb = Playbook(
            [model("m", "a", retry={"max_retries": 3, "backoff_base_ms": 100, "backoff_max_ms": 100})],
            lambda req: limited,
        )
        return await pb.finish(pb.call("m"))

    rec = play(scenario)
    assert (rec["response_code"], rec["retry_count"]) == (429, 3)
    assert rec["backoff_ms"] > 0  # three draws from [0, 100] ms: all zero only with probability 0


def test_a_retry_after_far_away_cools_the_deployment_down_no_longer_than_its_longest_ejection() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [model("m", "a", "b", outlier={"max_ejection_s": 60})],
            by_deployment(
                a=Reply.json(
                    {"error": {"message": "later"}}, status=429, headers={"retry-after": "99999999999"}
                ),
                b=Reply.json(OK),
            ),
        )
        rec = await pb.finish(pb.call("m"))
        assert (rec["response_code"], rec["attempts"]) == (200, 2)  # b took it at once
        a = pb.engine.registry.models["m"].by_id["a"]
        assert a.cooldown_until - pb.clock.now() == pytest.approx(60.0, abs=0.1)
        await pb.play(60.1)
        assert a.healthy(pb.clock.now())  # back in rotation

    play(scenario)


@pytest.mark.parametrize(
    ("max_retries", "should_retry"),
    [(2, "false"), (0, None)],
    ids=[
        "the gateway retried: the SDK must not multiply it",
        "no gateway retries: the SDK's are the retries",
    ],
)
def test_after_the_gateway_retried_to_its_limit_the_client_is_told_not_to_retry(
    max_retries: int, should_retry: str | None
) -> None:
    async def scenario() -> None:
        failing = Reply.json({"error": {"message": "busy"}}, status=503, headers={"x-should-retry": "true"})
        pb = Playbook([model("m", "a", retry={"max_retries": max_retries})], lambda req: failing)
        call = pb.call("m")
        rec = await pb.finish(call)
        assert (rec["response_code"], rec["retry_count"], rec["retry_verdict"]) == (
            503,
            max_retries,
            "retry-limit",
        )
        assert call.down.headers.get("x-should-retry") == (should_retry or "true")  # else the provider's word
        start = next(m for m in call.down.messages if m["type"] == "http.response.start")
        assert [k for k, _ in start["headers"]].count(b"x-should-retry") == 1  # one answer, never two

    play(scenario)


def test_a_client_leaving_during_the_backoff_leaves_the_wait_as_backoff_not_gateway_overhead() -> None:
    """The wait before a retry is no gateway time, also when the client leaves during it (it was logged as
    gateway overhead, feeding the overhead alert, and the retry that never started was counted as made)."""

    async def scenario() -> None:
        limited = Reply.json({"error": {"message": "later"}}, status=429, headers={"retry-after": "3"})
        pb = Playbook([model("m", "a", retry={"max_retries": 2})], lambda req: limited)
        call = pb.call("m")
        await pb.play(0.5)  # the 429 came at once; the gateway waits out Retry-After
        call.exchange.cancel(CancelReason.CLIENT_GONE)
        rec = await pb.finish(call)
        assert (rec["response_code"], rec["response_flags"], rec["retry_count"]) == (499, "DC", 0)
        assert rec["backoff_ms"] == pytest.approx(500, abs=1)
        assert rec["gateway_overhead_ms"] < 5
        m = pb.engine.metrics
        assert m.child(m.backoff, "m").value == pytest.approx(0.5, abs=0.001)
        assert m.child(m.retries, "m", "retry").value == 0

    play(scenario)


OVERLOADED = (
    b'data: {"error":{"message":"upstream overloaded","type":"server_error","code":"overloaded"}}\n\n'
)


def test_an_error_event_before_the_first_token_loses_the_race_to_a_healthy_hedge() -> None:
    """An error event is no content token: it committed the stream, won the race and cancelled the hedge,
    and the client got a 200 of one error event (logged "-", counted a success)."""

    async def scenario() -> None:
        pb = hedged_streaming(
            a=Reply.stream((0.3, OVERLOADED)), b=Reply.stream((0.5, sse("fine")), (0.01, DONE))
        )
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        assert (
            call.down.status == 200
            and call.down.events()[0] == '{"choices":[{"index":0,"delta":{"content":"fine"}}]}'
        )
        assert (rec["upstream_cluster"], rec["hedge_winner"], rec["response_flags"]) == ("b", "hedge", "-")
        m = pb.engine.metrics
        assert m.child(m.attempts, "m", "a", "protocol-error").value == 1  # a failure of a, not a success

    play(scenario)


def test_an_error_event_before_the_first_token_alone_is_a_502_naming_the_deployment_and_the_error() -> None:
    async def scenario() -> None:
        pb = streaming(a=Reply.stream((0.01, OVERLOADED)))
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        assert call.down.status == 502
        err = call.down.json()["error"]
        assert err["code"] == "upstream_protocol_error" and "'a'" in err["message"]
        assert "upstream overloaded" in err["message"] and "before the first token" in err["message"]
        assert (rec["response_code"], "UPE" in rec["response_flags"]) == (502, True)

    play(scenario)


def test_a_fallback_the_deadline_leaves_no_room_for_says_retries_stopped_for_the_deadline() -> None:
    async def scenario() -> None:
        stall = Reply.stream(stall=True)
        pb = Playbook(
            [
                model("m", "a", timeouts={"ttft_ms": 400}, retry={"max_retries": 0}, fallbacks=["n"]),
                model("n", "b"),
            ],
            by_deployment(a=stall, b=Reply.json(OK)),
        )
        call = pb.call("m", stream=True, headers={"x-gateway-timeout-ms": "430"})
        rec = await pb.finish(call)
        assert (rec["response_code"], rec["timeout_flag"], rec["retry_verdict"]) == (504, "total", "deadline")
        assert rec["response_flags"] == "DT"  # not m's URX: its retries are not what stopped the request

    play(scenario)


# ---------------------------------------------------------------------------------------------- cut mid-event


def _whole_events(call: Any) -> list[dict[str, Any]]:
    """Every event the client got parses as JSON (what the openai SDK does with each), in order."""
    body = call.down.body.decode()
    assert body.endswith("\n\n")
    return [orjson.loads(e[len("data: ") :]) for e in body.split("\n\n") if e and e != "data: [DONE]"]


def test_a_stream_broken_in_the_middle_of_an_event_ends_with_a_separate_error_event() -> None:
    async def scenario() -> None:
        pb = streaming(
            a=Reply.stream(
                (0.1, sse("one")),
                (0.1, b'data: {"id":"x","obj'),
                then_fail=UpstreamResetError("peer closed"),
            )
        )
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        events = _whole_events(call)  # no half event glued to the error event
        assert events[0]["choices"][0]["delta"]["content"] == "one"
        assert len(events) == 2 and events[1]["error"]["code"] == "upstream_reset"
        assert "unfinished event (20 bytes) was dropped" in events[1]["error"]["message"]
        assert (rec["response_flags"], rec["bytes_sent"]) == ("UC", len(call.down.body))

    play(scenario)


def test_a_slow_stream_cut_at_per_try_mid_event_ends_with_a_separate_error_event() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [model("m", "a", timeouts={"ttft_ms": 1000, "per_try_ms": 2000, "idle_ms": 30000})],
            by_deployment(a=Reply.stream((0.1, sse("one")), (0.5, b'data: {"choices":[{"ind'), stall=True)),
        )
        call = pb.call("m", stream=True)
        await pb.play(1.0)
        assert call.down.body == sse("one")  # the unfinished event is held back until it is whole
        rec = await pb.finish(call)
        events = _whole_events(call)
        assert (
            len(events) == 2
            and events[1]["error"]["code"] == "timeout"
            and "per_try_ms=2000" in events[1]["error"]["message"]
        )
        assert (rec["response_flags"], rec["timeout_flag"]) == ("UT", "per_try")

    play(scenario)


def test_events_split_across_reads_are_relayed_whole_and_nothing_is_lost() -> None:
    two = sse("two")

    async def scenario() -> None:
        pb = streaming(
            a=Reply.stream(
                (0.1, sse("one") + two[:9]), (0.1, two[9:-1]), (0.1, two[-1:]), (0.1, b"data: [DONE]\n")
            )
        )  # the last one lacks its blank line
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        bodies = [m["body"] for m in call.down.messages if m["type"] == "http.response.body" and m["body"]]
        assert bodies == [
            sse("one"),
            two,
            b"data: [DONE]\n",
        ]  # whole events; a clean end relays the rest as it came
        assert (rec["response_flags"], rec["bytes_sent"]) == ("-", len(call.down.body))

    play(scenario)


# ---------------------------------------------------------------------------------------------- attempts counted once


def _attempts_metric(pb: Playbook) -> dict[tuple[str, str], float]:
    text = pb.engine.metrics.render()[0].decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("llmgw_upstream_attempts_total{"):
            labels, value = line.rsplit(" ", 1)
            dep = labels.split('deployment="')[1].split('"')[0]
            outcome = labels.split('outcome="')[1].split('"')[0]
            out[(dep, outcome)] = out.get((dep, outcome), 0) + float(value)
    return out


def test_a_client_cancel_counts_each_attempt_once_as_cancelled() -> None:
    async def scenario() -> None:
        pb = hedged_streaming(
            a=Reply.stream((0.05, sse("one")), (0.05, sse("two")), (5.0, sse("three"))),
            b=Reply.stream((3.0, sse("b"))),
        )
        mid = pb.call("m", stream=True)  # cancelled after two chunks: a stream, not a success
        await pb.play(0.5)
        mid.exchange.cancel(CancelReason.CLIENT_GONE)
        rec = await pb.finish(mid)
        assert rec["bytes_sent"] == len(mid.down.body) > 0 and rec["response_flags"] == "DC"
        assert _attempts_metric(pb) == {("a", "cancelled"): 1}
        pb.upstream.handler = by_deployment(a=Reply.stream((3.0, sse("a"))), b=Reply.stream((3.0, sse("b"))))
        early = pb.call("m", stream=True)  # cancelled before any first token, during a hedge race
        await pb.play(0.2)
        early.exchange.cancel(CancelReason.CLIENT_GONE)
        await pb.finish(early)
        assert _attempts_metric(pb) == {("a", "cancelled"): 2, ("b", "cancelled"): 1}
        pb.upstream.handler = lambda req: Reply.stream((0.05, sse("x")), (0.01, DONE))
        done = pb.call("m", stream=True)  # relayed to its end: a success, counted once
        await pb.finish(done)
        won = done.record["upstream_cluster"]
        assert _attempts_metric(pb) == {("a", "cancelled"): 2, ("b", "cancelled"): 1, (won, "success"): 1}

    play(scenario)


# ---------------------------------------------------------------------------------------------- fallbacks that never ran


def test_a_deadline_504_does_not_log_or_count_a_fallback_that_never_ran() -> None:
    async def scenario() -> None:
        pb = Playbook(
            [
                model(
                    "m",
                    "a",
                    fallbacks=["m2"],
                    fallback_on=["timeout"],
                    timeouts={"ttft_ms": 5000, "per_try_ms": 5000},
                    retry={"max_retries": 0},
                ),
                model("m2", "c"),
            ],
            by_deployment(a=Reply.json(OK, after=10.0), c=Reply.json(OK)),
        )
        call = pb.call("m", headers={"x-gateway-timeout-ms": "1000"})
        rec = await pb.finish(call)
        assert [r.deployment for r in pb.upstream.requests] == ["a"]  # no time was left for m2
        assert call.down.status == 504
        assert (rec["fallback_from"], rec["fallback_reason"], rec["timeout_flag"]) == (None, None, "total")
        assert "llmgw_fallbacks_total{" not in pb.engine.metrics.render()[0].decode()

    play(scenario)
