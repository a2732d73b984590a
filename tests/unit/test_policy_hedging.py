"""Hedge delay: header beats config, fixed or auto (quantile of recent first tokens, clamped)."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from gateway.policy.hedging import HedgeDecision, hedge_delay
from gateway.policy.latency import QuantileWindow


def decide(window: QuantileWindow | None = None, **overrides) -> HedgeDecision:
    kw = dict(enabled=True, fixed_delay_ms=None, quantile=0.95, min_delay_ms=50.0, max_delay_ms=2000.0,
              window=window, header=None, now=FakeClock()())
    kw.update(overrides)
    return hedge_delay(**kw)


def window_of(values: list[float]) -> QuantileWindow:
    w = QuantileWindow()
    for v in values:
        w.add(v, FakeClock()())
    return w


def test_disabled_means_no_hedge():
    assert decide(enabled=False) == HedgeDecision(None, "disabled")


def test_auto_hedges_at_the_p95_of_recent_first_tokens():
    # A provider with a tail: 95 first tokens at 200 ms, 5 at 2 s. Hedge at 200 ms, not after the tail.
    w = window_of([200.0] * 95 + [2000.0] * 5)
    assert decide(w) == HedgeDecision(0.2, "auto")


def test_auto_is_clamped_to_the_configured_range():
    assert decide(window_of([10.0] * 20)).delay_s == pytest.approx(0.05)  # min 50 ms
    assert decide(window_of([9000.0] * 20)).delay_s == pytest.approx(2.0)  # max 2 s


def test_auto_without_enough_samples_waits_the_maximum():
    assert decide(window_of([100.0] * 9)) == HedgeDecision(2.0, "auto-no-data")
    assert decide(None) == HedgeDecision(2.0, "auto-no-data")


def test_auto_follows_the_window_as_old_samples_age_out():
    clock = FakeClock()
    w = QuantileWindow(max_age_s=60.0)
    for _ in range(20):
        w.add(800.0, clock())
    assert decide(w, now=clock()).delay_s == pytest.approx(0.8)
    clock.advance(61)
    for _ in range(20):
        w.add(150.0, clock())
    assert decide(w, now=clock()).delay_s == pytest.approx(0.15)


def test_a_fixed_delay_is_used_as_configured():
    assert decide(fixed_delay_ms=120.0, window=window_of([5000.0] * 50)) == HedgeDecision(0.12, "fixed")


@pytest.mark.parametrize("header", ["off", "OFF", " Off "])
def test_the_header_turns_hedging_off_for_one_request(header):
    assert decide(header=header) == HedgeDecision(None, "header-off")


def test_the_header_sets_the_delay_even_when_config_has_hedging_off():
    assert decide(header="150", enabled=False) == HedgeDecision(0.15, "header")
    assert decide(header="0").delay_s == 0.0  # hedge at once
    assert decide(header="-20").delay_s == 0.0  # clamped


@pytest.mark.parametrize("header", ["", "soon", "nan", "inf", "100ms", "on"])
def test_an_invalid_header_is_a_bad_request_naming_it(header):
    with pytest.raises(ValueError, match="x-gateway-hedge"):
        decide(header=header)
