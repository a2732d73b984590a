"""Retry and hedge budgets: an outage must not turn into a retry storm, hedges stay a share of traffic."""

from __future__ import annotations

from fake_clock import FakeClock

from gateway.policy.budget import (
    HOPELESS_AT,
    LIKELY_BELOW,
    PRIOR,
    WINDOW_S,
    BudgetVerdict,
    FailureRate,
    RetryBudget,
    TokenBucket,
)


def failing(budget: RetryBudget, dep: str, clock: FakeClock, n: int) -> None:
    for _ in range(n):
        budget.observe(dep, True, clock())


def test_a_fresh_deployment_is_presumed_fine_and_failing_needs_evidence():
    clock = FakeClock()
    r = FailureRate(clock())
    assert r.rate(clock()) == 0.0
    for _ in range(3):
        r.observe(True, clock())
    assert (
        r.rate(clock()) == 3 / (3 + PRIOR) < LIKELY_BELOW
    )  # three failures in a row: bad luck, not an outage


def test_the_failure_rate_forgets_over_the_window():
    clock = FakeClock()
    r = FailureRate(clock())
    for _ in range(100):
        r.observe(True, clock())
    assert r.rate(clock()) >= HOPELESS_AT
    clock.advance(WINDOW_S * 5)  # quiet for a while: the deployment gets a fresh chance
    assert r.rate(clock()) < 0.3


def test_successes_between_folds_count_with_the_failures():
    clock = FakeClock()
    r = FailureRate(clock())
    for i in range(1000):
        r.observe(i % 10 < 3, clock.advance(0.001))  # 30 % failing, 1,000 attempts a second
    assert abs(r.rate(clock()) - 0.3) < 0.02


def test_a_retry_likely_to_succeed_is_free_and_holds_no_slot():
    clock = FakeClock()
    budget = RetryBudget(deployments=("a",), now=clock())
    budget.request_started()
    for _ in range(100):
        assert budget.check("a", clock()) is BudgetVerdict.FREE
    assert budget.retries_in_flight == 0


def test_a_hopeless_target_gets_no_retry():
    clock = FakeClock()
    budget = RetryBudget(deployments=("a",), now=clock())
    failing(budget, "a", clock, 60)
    assert budget.failure_rate("a", clock()) >= HOPELESS_AT
    assert budget.check("a", clock()) is BudgetVerdict.HOPELESS
    assert budget.exhausted_total == 1


def test_a_failing_target_is_charged_with_envoys_concurrency_cap():
    clock = FakeClock()
    budget = RetryBudget(
        percent=20, min_retry_concurrency=3, min_retries_per_s=100, deployments=("a",), now=clock()
    )
    failing(budget, "a", clock, 10)  # rate 10/16: more likely to fail than not, not hopeless
    for _ in range(100):
        budget.request_started()
    assert budget.concurrency_limit() == 20
    assert all(budget.check("a", clock()) is BudgetVerdict.CHARGED for _ in range(20))
    assert budget.check("a", clock()) is BudgetVerdict.CONCURRENCY  # the 21st concurrent retry
    budget.release()
    assert budget.check("a", clock()) is BudgetVerdict.CHARGED


def test_min_retry_concurrency_is_the_floor_at_low_traffic():
    clock = FakeClock()
    budget = RetryBudget(percent=20, min_retry_concurrency=3, deployments=("a",), now=clock())
    failing(budget, "a", clock, 10)
    budget.request_started()  # one active request: 20 % of it would allow none
    assert [budget.check("a", clock()) for _ in range(4)] == [BudgetVerdict.CHARGED] * 3 + [
        BudgetVerdict.CONCURRENCY
    ]


def test_charged_retries_are_the_floor_plus_percent_of_requests_over_the_window():
    clock = FakeClock()
    budget = RetryBudget(
        percent=20, min_retry_concurrency=1000, min_retries_per_s=1.0, deployments=("a",), now=clock()
    )
    failing(budget, "a", clock, 10)
    for _ in range(100):
        budget.request_started()
    granted = 0
    while budget.check("a", clock()) is BudgetVerdict.CHARGED:
        granted += 1
    assert granted == 20 + 10  # 20 % of 100 requests plus 1/s over the 10 s window (Finagle's floor)
    assert budget.check("a", clock()) is BudgetVerdict.RATIO


def test_the_floor_alone_covers_a_cold_start():
    clock = FakeClock()
    budget = RetryBudget(min_retries_per_s=1.0, deployments=("a",), now=clock())
    failing(budget, "a", clock, 10)
    budget.request_started()
    assert [budget.check("a", clock()) for _ in range(3)] == [
        BudgetVerdict.CHARGED
    ] * 3  # no traffic history yet


def test_release_and_finish_never_go_negative():
    budget = RetryBudget(percent=20, min_retry_concurrency=3)
    budget.release()
    budget.request_finished()
    assert budget.retries_in_flight == 0 and budget.active_requests == 0


def test_an_attempt_playing_a_retry_takes_a_concurrency_slot_only():
    budget = RetryBudget(percent=20, min_retry_concurrency=2)
    budget.request_started()
    assert [budget.try_acquire() for _ in range(3)] == [True, True, False]


# ---------------------------------------------------------------- hedge bucket


def test_hedges_stay_within_budget_percent_of_requests():
    bucket = TokenBucket(percent=5)
    hedges = 0
    for _ in range(1000):  # every request is slow enough to want a hedge
        bucket.deposit()
        hedges += bucket.try_take()
    assert 50 <= hedges <= 51  # 5% of 1000 plus the initial token
    assert bucket.suppressed_total == 1000 - hedges
    assert bucket.taken_total == hedges


def test_ten_deposits_of_ten_percent_make_a_whole_token_despite_float_rounding():
    bucket = TokenBucket(percent=10, initial=0.0)
    for _ in range(9):
        bucket.deposit()
    assert not bucket.try_take()
    bucket.deposit()  # ten 0.1s add up to 0.9999999999999999 in floats; still one token
    assert bucket.try_take()


def test_a_quiet_period_saves_up_at_most_cap_hedges():
    bucket = TokenBucket(percent=5, cap=5.0)
    for _ in range(10_000):
        bucket.deposit()
    assert bucket.balance == 5.0
    assert [bucket.try_take() for _ in range(6)] == [True] * 5 + [False]


def test_zero_percent_allows_only_the_initial_token():
    bucket = TokenBucket(percent=0, initial=1.0)
    for _ in range(100):
        bucket.deposit()
    assert [bucket.try_take() for _ in range(2)] == [True, False]


def test_a_failed_health_check_makes_the_deployment_hopeless_and_a_passed_one_forgives_it():
    clock = FakeClock()
    budget = RetryBudget(deployments=("a",), now=clock())
    budget.mark_reachable("a", False, clock())
    assert budget.check("a", clock()) is BudgetVerdict.HOPELESS
    budget.mark_reachable("a", True, clock())
    assert budget.failure_rate("a", clock()) == 0.0
