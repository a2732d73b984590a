"""Per-key rate limits as GCRA (the generic cell rate algorithm): O(1) time and state per request.

A limit of ``limit`` units per ``period`` keeps one number per key, the theoretical arrival time
(TAT): when the key would be back to an empty bucket. A request costing ``cost`` units moves the TAT
forward by ``cost * period / limit``; it is admitted while the TAT stays within one ``period`` of
now. So a quiet key may spend its whole limit at once (a burst of ``limit``), and from then on gets
``limit`` units per ``period``, refilled continuously rather than at the top of each minute.

The Redis script in ``gateway/state/redis.py`` is the same arithmetic; this module is the reference
(and the local fallback's implementation). Several limits are checked together: a request is admitted
only if every one admits it, and only then is every one charged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit for one request: ``cost`` units out of ``limit`` per period, tracked under ``key``."""

    key: str
    cost: int
    limit: int


@dataclass(frozen=True, slots=True)
class LimitDecision:
    refused: int  # index of the first limit that refused the request; -1 when admitted
    retry_after_s: float  # how long until that limit would admit it; 0 when admitted


ADMITTED = LimitDecision(-1, 0.0)


def gcra(
    tats: Sequence[float], checks: Sequence[LimitCheck], now: float, period: float
) -> tuple[LimitDecision, list[float]]:
    """Decide ``checks`` given each key's stored TAT (0 when none); returns the decision and new TATs.

    Times are in any one unit (the Redis script uses milliseconds). On refusal the TATs are unchanged:
    a refused request costs nothing.
    """
    new_tats = []
    for i, (tat, c) in enumerate(zip(tats, checks, strict=True)):
        start = tat if tat > now else now
        new = start + c.cost * period / c.limit
        if new - now > period:
            return LimitDecision(i, new - period - now), list(tats)
        new_tats.append(new)
    return ADMITTED, new_tats
