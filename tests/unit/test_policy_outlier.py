"""Outlier ejection: consecutive failures eject for 30 s x times ejected (max 300 s), within a share cap."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from gateway.policy.outlier import OutlierState, OutlierVerdict, ejection_duration, is_ejected, record_outcome


def fail(state: OutlierState, clock: FakeClock, times: int = 1, **kw) -> list[OutlierVerdict]:
    return [record_outcome(state, failed=True, now=clock(), **kw) for _ in range(times)]


def test_five_consecutive_failures_eject_for_thirty_seconds():
    clock, s = FakeClock(), OutlierState()
    assert fail(s, clock, 4) == [OutlierVerdict.NONE] * 4
    assert not is_ejected(s, clock())
    assert fail(s, clock) == [OutlierVerdict.EJECT]
    assert is_ejected(s, clock())
    assert s.ejected_until == pytest.approx(clock() + 30.0)
    clock.advance(29.9)
    assert is_ejected(s, clock())
    clock.advance(0.1)
    assert not is_ejected(s, clock())  # readmitted on time


def test_a_success_resets_the_streak():
    clock, s = FakeClock(), OutlierState()
    fail(s, clock, 4)
    assert record_outcome(s, failed=False, now=clock()) is OutlierVerdict.NONE
    assert s.consecutive_failures == 0
    assert fail(s, clock, 4) == [OutlierVerdict.NONE] * 4  # intermittent failures never eject


def test_each_ejection_is_longer_up_to_the_maximum():
    clock, s = FakeClock(), OutlierState()
    durations = []
    for _ in range(12):
        assert fail(s, clock, 5)[-1] is OutlierVerdict.EJECT
        durations.append(s.ejected_until - clock())
        clock.t = s.ejected_until  # readmitted, and failing again at once
    assert durations == pytest.approx([30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300])


def test_failures_while_ejected_do_not_extend_the_ejection():
    # Panic routing may still send it traffic; that must not push readmission out for ever.
    clock, s = FakeClock(), OutlierState()
    fail(s, clock, 5)
    until = s.ejected_until
    clock.advance(10)
    assert fail(s, clock, 20) == [OutlierVerdict.NONE] * 20
    assert s.ejected_until == until and s.ejections == 1


def test_the_threshold_is_configurable():
    clock, s = FakeClock(), OutlierState()
    assert fail(s, clock, 2, consecutive_threshold=2) == [OutlierVerdict.NONE, OutlierVerdict.EJECT]


def test_base_and_max_are_configurable():
    assert [ejection_duration(n, 10.0, 25.0) for n in range(4)] == [10.0, 20.0, 25.0, 25.0]


def test_an_ejection_that_would_exceed_the_max_percent_is_refused():
    # Four deployments, 50%: the second may go (2/4 = 50%), the third may not (3/4).
    clock = FakeClock()
    second, third = OutlierState(), OutlierState()
    kw = dict(max_ejection_percent=50.0, deployments=4)
    assert fail(second, clock, 5, ejected_share=0.25, **kw)[-1] is OutlierVerdict.EJECT
    assert fail(third, clock, 5, ejected_share=0.5, **kw)[-1] is OutlierVerdict.REFUSED_MAX_PERCENT
    assert not is_ejected(third, clock()) and third.ejections == 0


def test_a_refused_ejection_happens_once_the_share_allows_it():
    clock, s = FakeClock(), OutlierState()
    assert fail(s, clock, 5, ejected_share=0.5, deployments=4)[-1] is OutlierVerdict.REFUSED_MAX_PERCENT
    assert fail(s, clock, 1, ejected_share=0.5, deployments=4) == [OutlierVerdict.REFUSED_MAX_PERCENT]
    assert fail(s, clock, 1, ejected_share=0.25, deployments=4) == [OutlierVerdict.EJECT]  # another came back


def test_without_the_deployment_count_the_current_share_is_checked():
    clock = FakeClock()
    assert fail(OutlierState(), clock, 5, ejected_share=0.5)[-1] is OutlierVerdict.REFUSED_MAX_PERCENT
    assert fail(OutlierState(), clock, 5, ejected_share=0.25)[-1] is OutlierVerdict.EJECT


def test_the_first_ejection_of_a_model_is_always_allowed():
    # A model with one deployment can still eject it: routing then panics, and "unhealthy" fallbacks fire.
    clock, s = FakeClock(), OutlierState()
    assert (
        fail(s, clock, 5, ejected_share=0.0, deployments=1, max_ejection_percent=50.0)[-1]
        is OutlierVerdict.EJECT
    )


def test_a_deployment_healthy_for_the_max_period_is_forgiven():
    clock, s = FakeClock(), OutlierState()
    for _ in range(3):
        fail(s, clock, 5)
        clock.t = s.ejected_until
    assert s.ejections == 3
    clock.advance(299)
    record_outcome(s, failed=False, now=clock())
    assert s.ejections == 3  # not yet: the next ejection would be 120 s
    clock.advance(1)
    record_outcome(s, failed=False, now=clock())
    assert s.ejections == 0
    fail(s, clock, 5)
    assert s.ejected_until - clock() == pytest.approx(30.0)


def test_a_fresh_state_is_not_ejected():
    assert not is_ejected(OutlierState(), FakeClock()())
