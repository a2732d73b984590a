"""One client request's retries within one model, shaped like Envoy's ``RetryState``: it counts, decides
with an enum verdict, and knows which retries are charged to the model's budget.

A retry is one of three kinds, and only one of them can make an outage worse:
- a *failover*: another deployment of the model, not tried by this request, healthy and failing less
  than half the time, takes it. The failed deployment sees nothing more; nothing is charged.
- a retry *likely to succeed*: the target fails less than half the time (a transient error). Free too.
- any other retry is charged to the budget (``policy/budget.py``), and refused outright when the
  target fails nearly everything (``HOPELESS``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from gateway.policy.budget import LIKELY_BELOW, BudgetVerdict, RetryBudget
from gateway.policy.retry import (
    FailureKind,
    RetryVerdict,
    full_jitter_backoff,
    is_retriable,
    retry_delay_s,
)


class RetryPlan(NamedTuple):
    verdict: RetryVerdict
    delay_s: float = 0.0  # the wait before the retry starts (RETRY and FAILOVER)
    target: str | None = None  # the deployment judged (the failover target, or the retried one)
    charged: bool = False  # the retry holds a budget slot: release it when the retry ends

    @property
    def retry(self) -> bool:
        return self.verdict is RetryVerdict.RETRY or self.verdict is RetryVerdict.FAILOVER


_NOT_RETRIABLE = RetryPlan(RetryVerdict.NOT_RETRIABLE)
_LIMIT = RetryPlan(RetryVerdict.LIMIT)
_DEADLINE = RetryPlan(RetryVerdict.DEADLINE)
_RETRY_AFTER_TOO_LONG = RetryPlan(RetryVerdict.RETRY_AFTER_TOO_LONG)

_BUDGET_VERDICTS = {
    BudgetVerdict.HOPELESS: RetryVerdict.HOPELESS,
    BudgetVerdict.CONCURRENCY: RetryVerdict.BUDGET,
    BudgetVerdict.RATIO: RetryVerdict.BUDGET,
}


class RetryState:
    """Per request and model: ``decide`` after each failed attempt; ``count`` failures another attempt
    already in flight answers for (hedging)."""

    __slots__ = ("budget", "max_retries", "retry_on", "retries")

    def __init__(self, budget: RetryBudget, max_retries: int, retry_on: frozenset[str]) -> None:
        self.budget = budget
        self.max_retries = max_retries
        self.retry_on = retry_on
        self.retries = 0

    def count(self, n: int = 1) -> None:
        self.retries += n

    def decide(
        self,
        *,
        failure: FailureKind,
        status: int | None,
        failed: str,
        alternatives: Sequence[str],
        retry_after_s: float | None,
        remaining_s: float,
        min_attempt_s: float,
        base_ms: float,
        max_ms: float,
        rng: random.Random,
        now: float,
    ) -> RetryPlan:
        """Whether to retry the attempt that failed on ``failed``; the first rule that refuses names the verdict.

        ``alternatives``: the model's deployments this request has not tried that are healthy now (not
        ejected, not cooling down, not at capacity). Order: not retriable, retry limit, failover (no
        backoff, Retry-After binds only the deployment that said it), then for a retry of the same
        target: Retry-After or backoff that does not fit the deadline, and the budget last, so a refusal
        for another reason never counts as budget exhaustion. A charged RETRY holds a budget slot: the
        caller releases it (``budget.release()``) when that retry ends or cannot start, if ``charged``.
        """
        if not is_retriable(failure, status, self.retry_on):
            return _NOT_RETRIABLE
        if self.retries >= self.max_retries:
            return _LIMIT
        budget = self.budget
        best, best_rate = None, 1.0
        for d in alternatives:
            r = budget.failure_rate(d, now)
            if best is None or r < best_rate:
                best, best_rate = d, r
        if best is not None and best_rate < LIKELY_BELOW:
            if min_attempt_s > remaining_s:
                return _DEADLINE
            self.retries += 1
            return RetryPlan(RetryVerdict.FAILOVER, 0.0, best)
        target = best if best is not None else failed
        if best is not None:  # Retry-After binds only the deployment that said it
            retry_after_s = None
        if retry_after_s is not None and retry_after_s + min_attempt_s > remaining_s:
            return _RETRY_AFTER_TOO_LONG
        delay = retry_delay_s(retry_after_s, full_jitter_backoff(self.retries, base_ms, max_ms, rng))
        if delay + min_attempt_s > remaining_s:
            return _DEADLINE
        verdict = budget.check(target, now)
        if verdict is BudgetVerdict.CHARGED or verdict is BudgetVerdict.FREE:
            self.retries += 1
            return RetryPlan(RetryVerdict.RETRY, delay, target, verdict is BudgetVerdict.CHARGED)
        return RetryPlan(_BUDGET_VERDICTS[verdict], 0.0, target)
