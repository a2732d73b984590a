"""Outlier ejection: take a deployment out after consecutive failures, for longer each time it happens."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

_EPS = 1e-9


@dataclass(slots=True)
class OutlierState:
    """Per deployment; mutated only by ``record_outcome`` (and by merges of other replicas' ejections)."""

    consecutive_failures: int = 0
    ejections: int = 0  # how many times ejected; sets the next ejection's length
    ejected_until: float = 0.0  # monotonic seconds; ejected while now < this


class OutlierVerdict(StrEnum):
    NONE = "none"
    EJECT = "eject"
    REFUSED_MAX_PERCENT = "max-ejection-percent"  # would eject, but too many of the model's are already out


def is_ejected(state: OutlierState, now: float) -> bool:
    return now < state.ejected_until


def ejection_duration(ejections_before: int, base_ejection_s: float, max_ejection_s: float) -> float:
    """Length of the next ejection: base x (times ejected before + 1), at most max (30, 60, 90 ... 300 s)."""
    d = base_ejection_s * (ejections_before + 1)
    return d if d < max_ejection_s else max_ejection_s


def record_outcome(
    state: OutlierState,
    *,
    failed: bool,
    now: float,
    consecutive_threshold: int = 5,
    base_ejection_s: float = 30.0,
    max_ejection_s: float = 300.0,
    ejected_share: float = 0.0,
    max_ejection_percent: float = 50.0,
    deployments: int | None = None,
) -> OutlierVerdict:
    """Feed one attempt's outcome (failed = 5xx, connect failure, reset or timeout) and say what to do.

    ``ejected_share`` is the share (0..1) of the model's deployments already ejected. The ejection is
    refused when the share with this one added would exceed ``max_ejection_percent``; pass
    ``deployments`` (the model's count) so "this one" is exactly 1/deployments, else the current share
    alone is checked. As in Envoy, the first ejection of a model is always allowed: with everything
    ejected, routing panics rather than fails, and fallbacks on "unhealthy" can fire.

    A deployment that stays healthy for ``max_ejection_s`` after its last ejection ends is forgiven:
    the next ejection starts from ``base_ejection_s`` again.
    """
    if not failed:
        state.consecutive_failures = 0
        if state.ejections and now - state.ejected_until >= max_ejection_s:
            state.ejections = 0
        return OutlierVerdict.NONE
    state.consecutive_failures += 1
    if state.consecutive_failures < consecutive_threshold or now < state.ejected_until:
        return OutlierVerdict.NONE  # failures while ejected (panic routing) do not extend the ejection
    if ejected_share > 0.0:
        share = ejected_share + 1.0 / deployments if deployments else ejected_share
        limit = max_ejection_percent / 100.0
        if share > limit + _EPS or (not deployments and share >= limit - _EPS):
            return OutlierVerdict.REFUSED_MAX_PERCENT
    state.ejected_until = now + ejection_duration(state.ejections, base_ejection_s, max_ejection_s)
    state.ejections += 1
    state.consecutive_failures = 0
    return OutlierVerdict.EJECT
