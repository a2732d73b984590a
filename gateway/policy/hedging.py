"""How long to wait for the first attempt's first token before starting a hedge."""

from __future__ import annotations

import math
from typing import NamedTuple

from gateway.policy.latency import QuantileWindow


class HedgeDecision(NamedTuple):  # immutable, and ~5x cheaper to build than a frozen dataclass
    delay_s: float | None  # None = no hedge for this request
    reason: str  # "disabled", "header-off", "header", "fixed", "auto", "auto-no-data"


_DISABLED = HedgeDecision(None, "disabled")
_HEADER_OFF = HedgeDecision(None, "header-off")
_BAD_HEADER = (
    "x-gateway-hedge: must be 'off' or a delay in milliseconds (a finite number; 0 or less hedges at once)"
)


def parse_hedge_header(header: str) -> float | None:
    """``x-gateway-hedge``: "off" -> None, "<ms>" -> ms (negative clamps to 0); anything else, infinities
    included, -> ValueError."""
    raw = header.strip()
    if raw.lower() == "off":
        return None
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError(_BAD_HEADER) from None
    if not math.isfinite(ms):
        raise ValueError(_BAD_HEADER)
    return ms if ms > 0.0 else 0.0


def hedge_delay(
    *,
    enabled: bool,
    fixed_delay_ms: float | None,
    quantile: float,
    min_delay_ms: float,
    max_delay_ms: float,
    window: QuantileWindow | None,
    header: str | None,
    now: float,
) -> HedgeDecision:
    """The hedge delay for one request.

    The header wins over config: "off" disables hedging for this request, a number of ms sets the delay
    (even if hedging is off in config; the hedge budget still applies). ``fixed_delay_ms`` None means
    auto: the window's ``quantile`` of recent first-token times clamped to [min, max]; with too few
    samples, ``max_delay_ms`` (hedge late rather than double the load on a guess).
    """
    if header is not None:
        ms = parse_hedge_header(header)
        if ms is None:
            return _HEADER_OFF
        return HedgeDecision(ms / 1000.0, "header")
    if not enabled:
        return _DISABLED
    if fixed_delay_ms is not None:
        return HedgeDecision(max(fixed_delay_ms, 0.0) / 1000.0, "fixed")
    q = window.quantile(quantile, now) if window is not None else None
    if q is None:
        return HedgeDecision(max_delay_ms / 1000.0, "auto-no-data")
    if q < min_delay_ms:
        q = min_delay_ms
    elif q > max_delay_ms:
        q = max_delay_ms
    return HedgeDecision(q / 1000.0, "auto")


def loser_sample_ms(
    *, started: float, first_byte: float | None, cancelled: float, delay_s: float
) -> float | None:
    """What a cancelled loser tells the hedge-delay window: "at least this slow", or nothing.

    A loser that had no first byte after waiting at least the hedge delay was at least that slow. Without
    it the window sees only winners, loses the slow tail that hedging cut, and its quantile drifts low:
    the configured p95 then hedges 7 % of requests, more than a 5 % budget allows. A loser that already
    had its first byte was recorded then; one cancelled sooner than the delay says nothing.
    """
    waited = cancelled - started
    if first_byte is not None or delay_s <= 0.0 or waited < delay_s:
        return None
    return waited * 1000.0
