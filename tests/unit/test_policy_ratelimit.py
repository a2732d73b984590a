"""GCRA, the per-key limit: a burst up to the limit, then a continuous refill; refusals cost nothing."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from gateway.policy.ratelimit import ADMITTED, LimitCheck, gcra


class Bucket:
    """The stored TATs of some keys, as Redis (or the local fallback) keeps them."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.tats: dict[str, float] = {}

    def take(self, *checks: LimitCheck) -> tuple[int, float]:
        decision, new = gcra([self.tats.get(c.key, 0.0) for c in checks], checks, self.clock(), 60.0)
        if decision is ADMITTED:
            self.tats.update({c.key: t for c, t in zip(checks, new, strict=True)})
        return decision.refused, decision.retry_after_s


def rpm(limit: int, cost: int = 1) -> LimitCheck:
    return LimitCheck("rpm", cost, limit)


def test_an_idle_key_may_spend_its_whole_limit_at_once_then_waits_one_interval():
    b = Bucket(FakeClock())
    assert [b.take(rpm(3))[0] for _ in range(3)] == [-1, -1, -1]
    refused, retry = b.take(rpm(3))
    assert refused == 0 and retry == pytest.approx(20.0)  # 60 s / 3


def test_the_limit_refills_continuously_not_at_the_top_of_the_minute():
    clock = FakeClock()
    b = Bucket(clock)
    for _ in range(6):
        b.take(rpm(6))
    clock.advance(9.9)
    assert b.take(rpm(6))[0] == 0
    clock.advance(0.1)  # one interval (10 s) after the burst: exactly one more
    assert b.take(rpm(6))[0] == -1
    assert b.take(rpm(6))[0] == 0


def test_a_steady_rate_at_the_limit_is_always_admitted_and_one_more_is_not():
    clock = FakeClock()
    b = Bucket(clock)
    for _ in range(600):  # ten minutes at exactly 60 rpm, after a full burst
        assert b.take(rpm(60))[0] == -1
        clock.advance(1.0)
    for _ in range(60):
        b.take(rpm(60))
    assert b.take(rpm(60))[0] == 0


def test_a_request_costing_the_whole_limit_needs_an_idle_key():
    clock = FakeClock()
    b = Bucket(clock)
    b.take(rpm(1000, cost=1))
    assert b.take(rpm(1000, cost=1000))[0] == 0
    clock.advance(60.0)
    assert b.take(rpm(1000, cost=1000))[0] == -1


def test_a_refusal_by_any_limit_charges_none_of_them():
    clock = FakeClock()
    b = Bucket(clock)
    tpm = LimitCheck("tpm", 600, 1000)
    assert b.take(rpm(10), tpm)[0] == -1
    before = dict(b.tats)
    refused, retry = b.take(rpm(10), tpm)  # rpm has room, tpm has 400 left of 1000
    assert refused == 1 and retry == pytest.approx(12.0)  # 200 tokens at 1000/60 s
    assert b.tats == before


def test_keys_are_independent():
    b = Bucket(FakeClock())
    assert b.take(LimitCheck("a", 1, 1))[0] == -1
    assert b.take(LimitCheck("b", 1, 1))[0] == -1
    assert b.take(LimitCheck("a", 1, 1))[0] == 0
