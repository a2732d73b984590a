"""Retry and hedge budgets: an outage must not turn into a retry storm, hedges stay a share of traffic."""

from __future__ import annotations

from gateway.policy.budget import RetryBudget, TokenBucket


def run_outage(budget: RetryBudget, requests: int, max_retries: int) -> tuple[int, int]:
    """Sequential client requests against an upstream failing 100%: each retries as often as allowed.

    Returns (retries granted, retries refused).
    """
    retries = refused = 0
    for _ in range(requests):
        budget.request_started()
        for _ in range(max_retries):
            if not budget.try_acquire():
                refused += 1
                break
            retries += 1
            budget.release()  # the retry failed too
        budget.request_finished()
    return retries, refused


def test_a_total_outage_gets_at_most_budget_percent_of_requests_as_retries():
    budget = RetryBudget(percent=20, min_retry_concurrency=3)
    retries, refused = run_outage(budget, requests=1000, max_retries=2)
    assert retries <= 0.2 * 1000 + 3  # the ratio, plus the initial allowance
    assert retries >= 0.2 * 1000 - 1  # and the budget is really available, not just refused
    assert budget.exhausted_total == refused > 700  # every refusal counted (for the metric and URX)
    # Upstream requests: 1000 originals + retries <= (1 + 20%) of client requests, plus the allowance.
    assert 1000 + retries <= 1.2 * 1000 + 3


def test_concurrency_limit_is_percent_of_active_requests():
    budget = RetryBudget(percent=20, min_retry_concurrency=3, cap=1000)  # large cap: isolate concurrency
    for _ in range(100):
        budget.request_started()
    assert budget.concurrency_limit() == 20
    assert all(budget.try_acquire() for _ in range(20))
    assert budget.retries_in_flight == 20
    assert not budget.try_acquire()  # the 21st concurrent retry
    budget.release()
    assert budget.try_acquire()  # one ended, one may start


def test_min_retry_concurrency_is_the_floor_at_low_traffic():
    budget = RetryBudget(percent=20, min_retry_concurrency=3)
    budget.request_started()  # one active request: 20% of it would allow none
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert budget.exhausted_total == 1


def test_the_saved_up_allowance_is_capped_so_a_quiet_period_cannot_fund_a_storm():
    budget = RetryBudget(percent=20, min_retry_concurrency=3, cap=10)
    for _ in range(10_000):  # a long healthy period
        budget.request_started()
        budget.request_finished()
    assert budget.balance == 10
    budget.request_started()
    granted = 0
    while budget.try_acquire():
        granted += 1
        budget.release()
    assert granted == 10


def test_release_and_finish_never_go_negative():
    budget = RetryBudget(percent=20, min_retry_concurrency=3)
    budget.release()
    budget.request_finished()
    assert budget.retries_in_flight == 0 and budget.active_requests == 0


def test_zero_percent_allows_only_the_initial_allowance_ever():
    budget = RetryBudget(percent=0, min_retry_concurrency=3)
    assert run_outage(budget, requests=100, max_retries=2)[0] == 3


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
