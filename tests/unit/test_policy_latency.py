"""Latency estimates: peak-sensitive EWMA with decay toward a prior, remote merges, the quantile window."""

from __future__ import annotations

import math

import pytest
from fake_clock import FakeClock

from gateway.policy.latency import MAX_REMOTE_WEIGHT, PeakEwma, QuantileWindow

# ---------------------------------------------------------------- PeakEwma


def test_a_deployment_without_data_looks_free_so_it_gets_tried():
    e = PeakEwma()
    assert e.value(FakeClock()()) == 0.0
    assert e.samples == 0 and not e.has_data


def test_the_first_sample_is_the_estimate():
    clock = FakeClock()
    e = PeakEwma()
    e.observe(200.0, clock())
    assert e.value(clock()) == 200.0
    assert e.samples == 1 and e.last_at == clock()


def test_a_slower_sample_replaces_the_estimate_at_once():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    e.observe(100.0, clock())
    clock.advance(0.5)
    e.observe(900.0, clock())  # the deployment just got 9x slower: believe it now
    assert e.value(clock()) == 900.0


def test_a_faster_sample_blends_in_with_a_time_based_weight():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    e.observe(900.0, clock())
    clock.advance(10.0)  # one decay constant later
    e.observe(100.0, clock())
    w = math.exp(-1.0)
    assert e.value(clock()) == pytest.approx(900.0 * w + 100.0 * (1 - w))


def test_a_burst_of_fast_samples_at_one_instant_does_not_erase_a_peak():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    e.observe(900.0, clock())
    for _ in range(100):
        e.observe(100.0, clock())
    assert e.value(clock()) == 900.0  # recovery is believed over time, not over sample count


def test_recovery_converges_within_a_few_decay_constants():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    e.observe(900.0, clock())
    for _ in range(300):  # 30 s of 100 ms samples
        clock.advance(0.1)
        e.observe(100.0, clock())
    assert e.value(clock()) == pytest.approx(100.0 + 800.0 * math.exp(-3.0), rel=1e-6)
    assert e.value(clock()) < 150.0


def test_without_samples_the_estimate_decays_toward_the_prior():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0, prior_ms=100.0)
    e.observe(500.0, clock())
    assert e.value(clock.advance(10.0)) == pytest.approx(100.0 + 400.0 * math.exp(-1.0))
    assert e.value(clock.advance(1000.0)) == pytest.approx(100.0)


def test_reading_the_value_does_not_change_it():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    e.observe(500.0, clock())
    first = e.value(clock() + 5.0)
    assert e.value(clock() + 5.0) == first
    assert e.value(clock()) == 500.0


def test_a_slow_deployment_that_lost_its_traffic_is_tried_again_within_seconds():
    """Scenario: the slow one (300 ms) gets no traffic while the fast one (100 ms) is used; its estimate
    decays (prior 0) until it looks no worse, then it gets a request and can show it recovered."""
    clock = FakeClock()
    slow, fast = PeakEwma(decay_s=10.0), PeakEwma(decay_s=10.0)
    slow.observe(300.0, clock())
    seconds = 0
    while slow.value(clock()) >= fast.value(clock()):
        fast.observe(100.0, clock())
        clock.advance(1.0)
        seconds += 1
    assert 10 <= seconds <= 12  # 300 * exp(-t/10) < 100  ->  t > 11 s
    slow.observe(100.0, clock())  # it recovered
    assert slow.value(clock()) < 110.0


def test_a_probe_sample_replaces_a_higher_estimate_where_a_plain_one_only_blends_in():
    clock = FakeClock()
    plain, probed = PeakEwma(decay_s=10.0), PeakEwma(decay_s=10.0)
    for e in (plain, probed):
        e.observe(60.0, clock())
        e.observe(3000.0, clock())  # one outlier
    clock.advance(5.0)
    plain.observe(60.0, clock())
    probed.observe(60.0, clock(), remeasure=True)
    assert probed.value(clock()) == 60.0
    assert plain.value(clock()) > 1500.0  # the outlier's decayed share is kept: worse than decay alone
    probed.observe(3000.0, clock(), remeasure=True)  # a slow probe is believed as any peak
    assert probed.value(clock()) == 3000.0
    assert probed.samples == 4 and probed.baseline_ms is not None


def test_the_decay_never_moves_an_estimate_backwards_in_time():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    e.observe(500.0, clock())
    assert e.value(clock() - 5.0) == 500.0  # a reader with an older timestamp sees no growth


def test_the_baseline_is_the_usual_level_and_moves_slowly():
    clock = FakeClock()
    e = PeakEwma(decay_s=1.0)  # baseline time constant 10 s
    assert e.baseline_ms is None
    for _ in range(50):
        e.observe(60.0, clock())
        clock.advance(0.1)
    assert e.baseline_ms == pytest.approx(60.0)
    e.observe(180.0, clock())  # just got 3x slower
    assert e.value(clock()) == 180.0  # the estimate believes it at once...
    assert e.baseline_ms == pytest.approx(
        60.0 + 120.0 * (1 - math.exp(-0.01))
    )  # ...the baseline barely moves
    clock.advance(100.0)
    assert e.baseline_ms == pytest.approx(60.0, abs=2.0)  # and it does not decay with age


def test_a_baseline_is_only_merged_when_another_replica_sends_one():
    clock = FakeClock()
    e = PeakEwma()
    e.merge_remote(300.0, samples=10, now=clock())
    assert e.baseline_ms is None
    e.merge_remote(300.0, samples=10, now=clock(), baseline_ms=60.0)
    assert e.baseline_ms == 60.0  # a replica that never sent there still knows the usual level
    e.observe(80.0, clock())
    e.merge_remote(300.0, samples=1_000, now=clock(), baseline_ms=100.0)
    assert e.baseline_ms == pytest.approx(60.0 + 40.0 * MAX_REMOTE_WEIGHT)


def test_nonsense_samples_are_ignored():
    clock = FakeClock()
    e = PeakEwma()
    for bad in (float("nan"), -1.0, float("inf")):
        e.observe(bad, clock())
    assert e.samples == 0 and e.value(clock()) == 0.0


def test_a_replica_with_no_data_adopts_a_remote_estimate():
    clock = FakeClock()
    e = PeakEwma()
    e.merge_remote(250.0, samples=40, now=clock())
    assert e.value(clock()) == 250.0
    assert e.has_data
    assert e.samples == 0  # remote counts are never re-published as ours (no echo between replicas)


def test_a_remote_estimate_is_weighted_by_its_samples():
    clock = FakeClock()
    e = PeakEwma()
    for _ in range(90):
        e.observe(100.0, clock())
    e.merge_remote(200.0, samples=10, now=clock())
    assert e.value(clock()) == pytest.approx(100.0 + 100.0 * 10 / 100)


def test_a_remote_estimate_never_moves_ours_more_than_the_bound():
    clock = FakeClock()
    e = PeakEwma()
    e.observe(100.0, clock())
    e.merge_remote(500.0, samples=1_000_000, now=clock())
    assert e.value(clock()) == pytest.approx(100.0 + 400.0 * MAX_REMOTE_WEIGHT)


def test_two_replicas_merging_each_other_converge_on_one_view():
    clock = FakeClock()
    a, b = PeakEwma(), PeakEwma()
    for _ in range(50):
        a.observe(100.0, clock())
        b.observe(300.0, clock())
    for _ in range(10):  # sync rounds
        va, vb = a.value(clock()), b.value(clock())
        a.merge_remote(vb, b.samples, clock())
        b.merge_remote(va, a.samples, clock())
    assert a.value(clock()) == pytest.approx(b.value(clock()), abs=1.0)
    assert 150.0 < a.value(clock()) < 250.0


def test_merges_with_no_samples_or_nonsense_are_ignored():
    clock = FakeClock()
    e = PeakEwma()
    e.merge_remote(250.0, samples=0, now=clock())
    e.merge_remote(float("nan"), samples=5, now=clock())
    assert not e.has_data


def test_a_merged_estimate_keeps_decaying_like_a_local_one():
    clock = FakeClock()
    local, merged = PeakEwma(decay_s=10.0), PeakEwma(decay_s=10.0)
    local.observe(400.0, clock())
    merged.merge_remote(400.0, samples=3, now=clock())
    clock.advance(7.0)
    assert merged.value(clock()) == pytest.approx(local.value(clock()))


def test_a_remote_estimate_older_than_our_latest_sample_does_not_pull_a_probe_answer_back():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    e.observe(60.0, clock())
    e.observe(3000.0, clock())  # one outlier
    remote_sampled_at = clock()  # the other replica's latest own sample of it (it sent nothing since)
    clock.advance(5.0)
    e.observe(60.0, clock(), remeasure=True)  # the probe
    assert e.observed_at == clock()
    assert not e.merge_remote(1800.0, samples=100, now=clock(), observed_at=remote_sampled_at)
    assert e.value(clock()) == 60.0 and e.merges == 0


def test_a_remote_estimate_newer_than_our_latest_sample_still_moves_ours():
    clock = FakeClock()
    e = PeakEwma(decay_s=10.0)
    for _ in range(10):
        e.observe(3000.0, clock())
    clock.advance(5.0)
    current = e.value(clock())
    # the other replica probed it after our last sample: its fast answer moves ours as far as allowed
    assert e.merge_remote(60.0, samples=10, now=clock(), observed_at=clock() - 0.2)
    assert e.value(clock()) == pytest.approx(current + (60.0 - current) * MAX_REMOTE_WEIGHT)
    # one sampled at the same instant as ours is not older: replicas busy on one deployment still converge
    assert e.merge_remote(60.0, samples=10, now=clock(), observed_at=e.observed_at)


def test_a_remote_estimate_of_unknown_age_or_without_local_samples_is_merged_as_before_ages():
    clock = FakeClock()
    e = PeakEwma()
    e.observe(100.0, clock())
    clock.advance(5.0)
    current = e.value(clock())
    assert e.merge_remote(300.0, samples=100, now=clock())  # a replica that publishes no age
    assert e.value(clock()) == pytest.approx(current + (300.0 - current) * MAX_REMOTE_WEIGHT)
    fresh = PeakEwma()  # never sent there itself: any replica's view, however old, is news
    assert fresh.merge_remote(300.0, samples=5, now=clock(), observed_at=clock() - 60.0)
    assert fresh.value(clock()) == 300.0


# ---------------------------------------------------------------- QuantileWindow


def test_too_few_samples_give_no_quantile():
    clock = FakeClock()
    w = QuantileWindow()
    for v in range(9):
        w.add(float(v), clock())
    assert w.quantile(0.95, clock()) is None
    w.add(9.0, clock())
    assert w.quantile(0.95, clock()) == 9.0


def test_quantiles_are_nearest_rank_over_the_samples():
    clock = FakeClock()
    w = QuantileWindow()
    for v in range(100, 0, -1):  # arrival order does not matter
        w.add(float(v), clock())
    assert w.quantile(0.95, clock()) == 95.0
    assert w.quantile(0.5, clock()) == 50.0
    assert w.quantile(1.0, clock()) == 100.0
    assert w.quantile(0.0, clock()) == 1.0


def test_the_window_keeps_only_the_last_size_samples():
    clock = FakeClock()
    w = QuantileWindow(size=256)
    for v in range(1, 301):
        w.add(float(v), clock())
    assert len(w) == 256
    assert w.quantile(0.0, clock()) == 45.0  # 1..44 fell out


def test_samples_older_than_max_age_are_forgotten():
    """Scenario: a slow minute, then a fast one; the hedge delay follows the fast one."""
    clock = FakeClock()
    w = QuantileWindow(max_age_s=60.0)
    for _ in range(20):
        w.add(1000.0, clock())
    clock.advance(50.0)
    for _ in range(20):
        w.add(10.0, clock())
    assert w.quantile(0.95, clock()) == 1000.0
    clock.advance(20.0)  # the slow samples are now 70 s old
    assert w.quantile(0.95, clock()) == 10.0
    assert len(w) == 20
    clock.advance(60.0)
    assert w.quantile(0.95, clock()) is None and len(w) == 0


def test_repeated_values_leave_the_window_one_by_one():
    clock = FakeClock()
    w = QuantileWindow(size=10, min_samples=1)
    for _ in range(10):
        w.add(5.0, clock())
    for v in range(10):
        w.add(float(v), clock())
    assert w.quantile(0.0, clock()) == 0.0 and w.quantile(1.0, clock()) == 9.0
    assert len(w) == 10


def test_nonsense_samples_never_enter_the_window():
    clock = FakeClock()
    w = QuantileWindow(min_samples=1)
    w.add(float("nan"), clock())
    w.add(-3.0, clock())
    assert len(w) == 0
