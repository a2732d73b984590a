"""Warm-up retries and reachability re-checks: nothing a provider did once is kept forever.

The network is replaced by scripted answers and ``sleep`` by a recorder, so the schedule is exact.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.config import WarmupConfig
from gateway.upstream.prewarm import PrewarmResult
from gateway.upstream.reachability import ReachabilityBoard
from gateway.upstream.schemas import WarmupResult
from gateway.upstream.warmup import ModelWarmup, SchemaWarmup, retry_delay_s

SCHEMA = {"name": "turn", "schema": {"type": "object"}}


class Provider:
    """Fails every warm-up request until ``up_after`` passes have been made."""

    def __init__(self, up_after: int) -> None:
        self.up_after = up_after
        self.passes = 0

    async def warm(self, mw: ModelWarmup, jobs: list[Any]) -> list[WarmupResult]:
        self.passes += 1
        ok = self.passes > self.up_after
        return [WarmupResult(mw.name, "a", "turn", ok, 1.0, "ok" if ok else "HTTP 503") for _ in jobs]


def run(models: list[ModelWarmup], provider: Provider) -> tuple[SchemaWarmup, list[float], list[bool]]:
    slept: list[float] = []
    done_seen: list[bool] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        done_seen.append(run_.done)

    run_ = SchemaWarmup(models, lambda mw, jobs, results: None, sleep=sleep, warm=provider.warm)
    asyncio.run(run_.run())
    return run_, slept, done_seen


def model(required: bool) -> ModelWarmup:
    return ModelWarmup(
        "chat", WarmupConfig(schemas=[SCHEMA], required=required), [(None, "chat", "m", SCHEMA)]
    )


def test_a_required_warm_up_is_retried_with_backoff_until_the_provider_is_back():
    warm, slept, done_seen = run([model(required=True)], Provider(up_after=7))
    assert slept == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # never more than 10 s after the provider is back
    assert done_seen == [False] * 7 and warm.done
    assert warm.detail()["models"]["chat"] == {
        "state": "done",
        "ok": 1,
        "failed": 0,
        "passes": 8,
        "next_retry_s": 10.0,
    }


def test_an_optional_warm_up_that_fails_is_reported_once_and_never_holds_readiness():
    warm, slept, _ = run([model(required=False)], Provider(up_after=100))
    assert slept == [] and warm.done
    assert warm.detail()["models"]["chat"]["state"] == "failed"


def test_the_retry_delay_is_capped():
    assert [retry_delay_s(n) for n in (0, 1, 4, 5, 50)] == [0.5, 1.0, 8.0, 10.0, 10.0]


def test_a_deployment_down_at_start_up_is_rechecked_until_it_answers():
    changes: list[tuple[str, bool]] = []
    board = ReachabilityBoard(["a", "b"], lambda d, ok: changes.append((d, ok)))
    board.record_check(PrewarmResult("a", False, 0, "unreachable: ConnectionRefusedError"), 0.0)
    board.record_check(PrewarmResult("b", True, 1, "ok"), 0.0)
    answers = iter([False, False, True])
    checked: list[str] = []

    async def check(client: Any) -> PrewarmResult:
        checked.append(client)
        ok = next(answers)
        return PrewarmResult("a", ok, 1 if ok else 0, "ok" if ok else "unreachable")

    async def sleep(_s: float) -> None:
        if not board.unreachable():
            raise asyncio.CancelledError  # stop the loop once nothing is down

    async def main() -> None:
        try:
            await board.recheck({"a": "client-a", "b": "client-b"}, check=check, sleep=sleep)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert checked == ["client-a"] * 3  # only the one that was down, until it answered
    assert board.view()["a"] == {"reachable": True, "detail": "ok"}
    # every failed check is news (it renews "unreachable" for the retry budget), recovery once
    assert changes == [("a", False), ("b", True), ("a", False), ("a", False), ("a", True)]


def test_a_deployment_without_a_start_up_check_is_not_called_reachable():
    board = ReachabilityBoard(["a"], lambda d, ok: None)
    board.record_check(PrewarmResult("a", True, 0, "skipped"), 0.0)
    assert board.view()["a"]["reachable"] is None and board.unreachable() == []


def test_only_a_closed_door_or_a_refused_key_is_avoided_and_only_until_it_answers():
    board = ReachabilityBoard(["a", "b", "c"], lambda d, ok: None)
    board.record_check(PrewarmResult("a", False, 0, "unreachable: connection refused", avoid=True), 0.0)
    board.record_check(PrewarmResult("b", False, 1, "rejected the API key (HTTP 401)", avoid=True), 0.0)
    board.record_check(PrewarmResult("c", False, 1, "answered HTTP 500 to GET /models"), 0.0)
    assert [board.entries[d].avoid for d in "abc"] == [
        True,
        True,
        False,
    ]  # /models failing says nothing of chat
    board.record_check(PrewarmResult("a", True, 1, "ok"), 5.0)
    assert not board.entries["a"].avoid and board.entries["a"].reachable
