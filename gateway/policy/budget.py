"""Budgets that keep retries and hedges a bounded share of traffic, so an outage never becomes a storm."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Final

# Float sums of percent/100 drift (twenty 0.05s are not exactly 1.0); a whole token is "1 within this".
_EPS = 1e-9

# How far back a failure rate and the retry ratio look: outcomes weigh exp(-age / WINDOW_S).
WINDOW_S: Final = 10.0
# Outcomes are folded into the decayed counts at most this often (a success costs an add, not an exp()).
_FOLD_S: Final = 0.5
# Pseudo-successes every estimate starts from: a fresh process, or a deployment quiet for a while, is
# presumed fine, and "failing" needs evidence (PRIOR more failures than successes) before it binds.
PRIOR = 6.0
# A retry is more likely to fail than to succeed at or above this failure rate: charged to the budget.
LIKELY_BELOW = 0.5
# At or above this failure rate a retry against the target is hopeless: none is made.
HOPELESS_AT = 0.9


class FailureRate:
    """One deployment's provider-caused failure rate, decayed over ``WINDOW_S`` (time passed in).

    ``rate = failed / (failed + ok + PRIOR)``: a shrunk estimate, 0 with no evidence, and only near 1
    after tens of failures in a row, so a short streak of bad luck is not mistaken for an outage.
    """

    __slots__ = ("ok", "failed", "t", "_ok_new", "_failed_new")

    def __init__(self, now: float = 0.0) -> None:
        self.ok = 0.0
        self.failed = 0.0
        self.t = now
        self._ok_new = 0
        self._failed_new = 0

    def observe(self, failed: bool, now: float) -> None:
        if failed:
            self._failed_new += 1
        else:
            self._ok_new += 1
        if now - self.t >= _FOLD_S:
            self._fold(now)

    def _fold(self, now: float) -> None:
        dt = now - self.t
        k = math.exp(-dt / WINDOW_S) if dt > 0.0 else 1.0
        self.ok = self.ok * k + self._ok_new
        self.failed = self.failed * k + self._failed_new
        self._ok_new = self._failed_new = 0
        if dt > 0.0:
            self.t = now

    def rate(self, now: float) -> float:
        self._fold(now)
        return self.failed / (self.failed + self.ok + PRIOR)


# What a failed health check weighs: hopeless for ~30 s without further news (checks repeat every 5 s).
_UNREACHABLE_FAILURES = 1000.0


class BudgetVerdict(StrEnum):
    CHARGED = "charged"  # allowed, and charged: the retry holds a slot until it ends
    FREE = "free"  # the target is likely to answer: not charged, no slot
    HOPELESS = "hopeless"  # the target fails nearly everything: a retry would only add load
    CONCURRENCY = "concurrency"  # Envoy's cap: too many retries in flight for the active requests
    RATIO = "ratio"  # charged retries over the window exceed ``percent`` of requests plus the floor


class RetryBudget:
    """The retry allowance of one model (per process): the failure rate of each deployment decides.

    - A retry against a target failing less than half the time (``LIKELY_BELOW``) is likely to succeed:
      it is not charged. Such retries cost at most 1/(1 - rate) < 2 upstream requests per request, and
      load that makes the target fail more moves it into the charged regime by itself.
    - A retry against a target failing more often is charged: Envoy's concurrency cap (retries in flight
      <= max(``min_retry_concurrency``, ``percent`` of active requests)) and a ratio over ``WINDOW_S``
      (retries <= ``percent`` of requests + ``min_retries_per_s`` x WINDOW_S, Finagle's budget with its
      ``minRetriesPerSec`` floor, which covers cold starts and low traffic).
    - A target failing ``HOPELESS_AT`` or more gets no retry at all.

    Retries that fail over to a different, healthy deployment are decided by ``RetryState`` and never
    reach this budget. The caller reports ``request_started``/``request_finished`` per client request
    and calls ``release`` once for every admitted retry when it ends.
    """

    __slots__ = (
        "percent",
        "min_retry_concurrency",
        "min_retries_per_s",
        "rates",
        "active_requests",
        "retries_in_flight",
        "_requests",
        "_retries",
        "_t",
        "_requests_new",
        "exhausted_total",
        "acquired_total",
    )

    def __init__(
        self,
        percent: float = 20.0,
        min_retry_concurrency: int = 3,
        min_retries_per_s: float = 1.0,
        deployments: tuple[str, ...] = (),
        now: float = 0.0,
    ) -> None:
        self.percent = percent
        self.min_retry_concurrency = min_retry_concurrency
        self.min_retries_per_s = min_retries_per_s
        self.rates = {d: FailureRate(now) for d in deployments}
        self.active_requests = 0
        self.retries_in_flight = 0
        self._requests = 0.0  # decayed count of client requests over WINDOW_S
        self._retries = 0.0  # decayed count of charged retries
        self._t = now
        self._requests_new = 0
        self.exhausted_total = 0  # refusals, for the metric and the URX flag
        self.acquired_total = 0

    # ------------------------------------------------------------------ facts

    def request_started(self) -> None:
        self.active_requests += 1
        self._requests_new += 1

    def request_finished(self) -> None:
        if self.active_requests > 0:
            self.active_requests -= 1

    def observe(self, deployment: str, failed: bool, now: float) -> None:
        """A provider-caused outcome of one attempt (client deadlines, disconnects and 4xx are not)."""
        r = self.rates.get(deployment)
        if r is None:
            r = self.rates[deployment] = FailureRate(now)
        r.observe(failed, now)

    def mark_reachable(self, deployment: str, reachable: bool, now: float) -> None:
        """A health check's verdict: unreachable makes the deployment hopeless at once (retrying a closed
        port only delays the answer); reachable again starts it afresh, as a new deployment."""
        r = self.rates[deployment] = FailureRate(now)
        if not reachable:
            r.failed = _UNREACHABLE_FAILURES

    def failure_rate(self, deployment: str, now: float) -> float:
        r = self.rates.get(deployment)
        return r.rate(now) if r is not None else 0.0

    # ------------------------------------------------------------------ decisions

    def concurrency_limit(self) -> float:
        """Charged retries that may be in flight at once right now (Envoy's budget)."""
        share = self.active_requests * self.percent / 100.0
        return share if share > self.min_retry_concurrency else float(self.min_retry_concurrency)

    def _window(self, now: float) -> None:
        dt = now - self._t
        k = math.exp(-dt / WINDOW_S) if dt > 0.0 else 1.0
        self._requests = self._requests * k + self._requests_new
        self._retries *= k
        self._requests_new = 0
        if dt > 0.0:
            self._t = now

    def check(self, target: str, now: float) -> BudgetVerdict:
        """Whether a retry against ``target`` may start now: CHARGED takes a slot (``release`` it when done), FREE none."""
        rate = self.failure_rate(target, now)
        if rate >= HOPELESS_AT:
            self.exhausted_total += 1
            return BudgetVerdict.HOPELESS
        if rate >= LIKELY_BELOW:
            if self.retries_in_flight + 1 > self.concurrency_limit() + _EPS:
                self.exhausted_total += 1
                return BudgetVerdict.CONCURRENCY
            self._window(now)
            allowance = self.percent / 100.0 * self._requests + self.min_retries_per_s * WINDOW_S
            if self._retries + 1.0 > allowance + _EPS:
                self.exhausted_total += 1
                return BudgetVerdict.RATIO
            self._retries += 1.0
            self.retries_in_flight += 1
            self.acquired_total += 1
            return BudgetVerdict.CHARGED
        return BudgetVerdict.FREE

    def try_acquire(self) -> bool:
        """A slot for an attempt that already runs and now plays a retry (hedging): the concurrency cap only."""
        if self.retries_in_flight + 1 > self.concurrency_limit() + _EPS:
            return False
        self.retries_in_flight += 1
        self.acquired_total += 1
        return True

    def release(self) -> None:
        if self.retries_in_flight > 0:
            self.retries_in_flight -= 1


class TokenBucket:
    """The hedge budget: refilled per request, not per second, so hedges stay a share of traffic.

    Each request deposits percent/100 of a token (capped at ``cap``), each hedge takes one whole token.
    With 5% and steady traffic that is at most one hedge per 20 requests, plus bursts up to ``cap``.
    """

    __slots__ = ("percent", "cap", "balance", "_deposit", "taken_total", "suppressed_total")

    def __init__(self, percent: float, cap: float = 5.0, initial: float = 1.0) -> None:
        self.percent = percent
        self.cap = cap
        self.balance = min(initial, cap)
        self._deposit = percent / 100.0
        self.taken_total = 0
        self.suppressed_total = 0

    def deposit(self) -> None:
        """One request seen."""
        b = self.balance + self._deposit
        self.balance = b if b < self.cap else self.cap

    def try_take(self) -> bool:
        """One hedge: take a token if a whole one is there."""
        if self.balance < 1.0 - _EPS:
            self.suppressed_total += 1
            return False
        self.balance = max(0.0, self.balance - 1.0)
        self.taken_total += 1
        return True
