"""Budgets that keep retries and hedges a bounded share of traffic, so an outage never becomes a storm."""

from __future__ import annotations

# Float sums of percent/100 drift (twenty 0.05s are not exactly 1.0); a whole token is "1 within this".
_EPS = 1e-9


class RetryBudget:
    """Envoy's concurrency budget AND a ratio budget (Finagle/gRPC retry throttling).

    Concurrency: retries in flight <= max(min_retry_concurrency, percent of active requests).
    Ratio: every request deposits percent/100 of a token, a retry withdraws one; the balance starts at
    ``min_retry_concurrency`` and is capped at ``cap``. So with the upstream failing 100%, retries stay
    within percent of requests (plus the small initial allowance) however fast requests arrive.

    The caller reports ``request_started``/``request_finished`` for every client request, and calls
    ``release`` once for every successful ``try_acquire`` when that retry ends.
    """

    __slots__ = ("percent", "min_retry_concurrency", "cap", "_deposit", "balance",
                 "active_requests", "retries_in_flight", "exhausted_total", "acquired_total")

    def __init__(self, percent: float, min_retry_concurrency: int, cap: float = 10.0) -> None:
        self.percent = percent
        self.min_retry_concurrency = min_retry_concurrency
        self.cap = cap
        self._deposit = percent / 100.0
        self.balance = float(min_retry_concurrency)
        self.active_requests = 0
        self.retries_in_flight = 0
        self.exhausted_total = 0  # refusals, for the metric and the URX flag
        self.acquired_total = 0

    def request_started(self) -> None:
        self.active_requests += 1
        if self.balance < self.cap:
            b = self.balance + self._deposit
            self.balance = b if b < self.cap else self.cap

    def request_finished(self) -> None:
        if self.active_requests > 0:
            self.active_requests -= 1

    def concurrency_limit(self) -> float:
        """Retries that may be in flight at once right now."""
        share = self.active_requests * self._deposit
        return share if share > self.min_retry_concurrency else float(self.min_retry_concurrency)

    def try_acquire(self) -> bool:
        """True: a retry may start (call ``release`` when it ends). False: the budget is spent."""
        if self.retries_in_flight + 1 > self.concurrency_limit() + _EPS or self.balance < 1.0 - _EPS:
            self.exhausted_total += 1
            return False
        self.retries_in_flight += 1
        self.balance = max(0.0, self.balance - 1.0)
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
