"""A discrete-event simulation of one model's retries on a fake clock: the real ``RetryState`` and
``RetryBudget`` against deployments that fail a given share of attempts.

Used by the property tests and to print the table in docs/architecture.md
(``python tests/unit/retry_sim.py``).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from gateway.policy.budget import RetryBudget
from gateway.policy.retry import FailureKind
from gateway.policy.retry_state import RetryState

RETRY_ON = frozenset({"connect-failure", "reset", "timeout", "502", "503", "504", "429"})


@dataclass(frozen=True)
class SimResult:
    requests: int
    ok: int
    upstream: int  # attempts sent upstream

    @property
    def success(self) -> float:
        return self.ok / self.requests if self.requests else 1.0

    @property
    def amplification(self) -> float:
        return self.upstream / self.requests if self.requests else 1.0


def simulate(
    failure_rates: dict[str, float],
    *,
    rate_per_s: float = 0.0,
    duration_s: float = 30.0,
    concurrency: int = 0,
    requests: int = 0,
    latency_s: float = 0.02,
    max_retries: int = 10,
    budget_percent: float = 20.0,
    min_retry_concurrency: int = 3,
    min_retries_per_s: float = 1.0,
    deadline_s: float = 300.0,
    seed: int = 1,
) -> SimResult:
    """Open loop (``rate_per_s`` Poisson arrivals for ``duration_s``) or closed loop (``concurrency``
    clients sending ``requests`` in all). Each attempt takes ``latency_s`` and fails with its
    deployment's rate; the first attempt of a request goes to the first deployment, retries go where
    the retry state says (failover target or the same deployment)."""
    rng = random.Random(seed)
    deps = tuple(failure_rates)
    budget = RetryBudget(budget_percent, min_retry_concurrency, min_retries_per_s, deps, now=0.0)
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    state = {"sent": 0, "done": 0, "ok": 0, "upstream": 0}

    def start_request(t: float) -> None:
        state["sent"] += 1
        budget.request_started()
        rs = RetryState(budget, max_retries, RETRY_ON)
        push(t, "attempt", [rs, deps[0], set(), t + deadline_s, False])

    if concurrency:
        for _ in range(min(concurrency, requests)):
            start_request(0.0)
    else:
        t = 0.0
        while True:
            t += rng.expovariate(rate_per_s)
            if t >= duration_s:
                break
            push(t, "arrive", None)

    while events:
        t, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            start_request(t)
            continue
        req = payload
        rs, dep, tried, deadline, slot = req
        if kind == "attempt":
            state["upstream"] += 1
            tried.add(dep)
            push(t + latency_s, "outcome", req)
            continue
        failed = rng.random() < failure_rates[dep]
        budget.observe(dep, failed, t)
        if slot:
            budget.release()
            req[4] = False
        finished = not failed
        if failed:
            alts = [d for d in deps if d not in tried]
            plan = rs.decide(
                failure=FailureKind.STATUS,
                status=503,
                failed=dep,
                alternatives=alts,
                retry_after_s=None,
                remaining_s=deadline - t,
                min_attempt_s=0.05,
                base_ms=25.0,
                max_ms=250.0,
                rng=rng,
                now=t,
            )
            if plan.retry:
                req[1] = plan.target
                req[4] = plan.charged
                push(t + plan.delay_s, "attempt", req)
            else:
                finished = True
        if finished:
            budget.request_finished()
            state["done"] += 1
            state["ok"] += not failed
            if concurrency and state["sent"] < requests:
                start_request(t)
    return SimResult(state["done"], state["ok"], state["upstream"])


def table() -> str:
    rates = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    traffic = (1, 10, 100, 1000)
    lines = [
        "| failure rate | " + " | ".join(f"{r} req/s" for r in traffic) + " |",
        "|---|" + "---|" * len(traffic),
    ]
    for p in rates:
        cells = []
        for r in traffic:
            res = simulate({"a": p}, rate_per_s=r, duration_s=max(30.0, 300.0 / r))
            cells.append(f"{res.success * 100:.1f}% / {res.amplification:.2f}x")
        lines.append(f"| {p * 100:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
