"""Hedge delay: header beats config, fixed or auto (quantile of recent first tokens, clamped)."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from gateway.policy.hedging import HedgeDecision, hedge_delay, loser_sample_ms
from gateway.policy.latency import QuantileWindow


def decide(window: QuantileWindow | None = None, **overrides) -> HedgeDecision:
    kw = dict(
        enabled=True,
        fixed_delay_ms=None,
        quantile=0.95,
        min_delay_ms=50.0,
        max_delay_ms=2000.0,
        window=window,
        header=None,
        now=FakeClock()(),
    )
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


@pytest.mark.parametrize("header", ["", "soon", "nan", "inf", "-inf", "100ms", "on"])
def test_an_invalid_header_is_a_bad_request_naming_it(header):
    with pytest.raises(ValueError, match="x-gateway-hedge"):
        decide(header=header)


def test_a_loser_that_waited_the_delay_without_a_byte_counts_as_at_least_that_slow():
    assert loser_sample_ms(started=10.0, first_byte=None, cancelled=10.42, delay_s=0.35) == pytest.approx(
        420.0
    )


@pytest.mark.parametrize(
    ("first_byte", "cancelled", "delay_s"),
    [
        (10.1, 10.5, 0.3),  # it had its first byte: recorded when the byte came
        (None, 10.2, 0.3),  # cancelled before the delay (a fast failure's replacement won): says nothing
        (None, 10.5, 0.0),  # no delay: nothing to be "at least"
    ],
)
def test_other_losers_add_nothing_to_the_window(first_byte, cancelled, delay_s):
    assert loser_sample_ms(started=10.0, first_byte=first_byte, cancelled=cancelled, delay_s=delay_s) is None


def test_counting_losers_keeps_the_auto_delay_from_drifting_below_the_tail():
    # 100 requests, 10 % of them stuck at 2 s; hedging cut those, so only winners (~200 ms) would be seen.
    win, with_losers = QuantileWindow(), QuantileWindow()
    for i in range(100):
        stuck = i % 10 == 0
        sample = 200.0 + i % 7
        win.add(sample if not stuck else 150.0, float(i))
        with_losers.add(sample if not stuck else 150.0, float(i))
        if stuck:
            with_losers.add(
                loser_sample_ms(started=i, first_byte=None, cancelled=i + 0.4, delay_s=0.35), float(i)
            )
    assert win.quantile(0.95, 100.0) < 210.0 <= with_losers.quantile(0.95, 100.0)
