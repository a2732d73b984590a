"""Alarms: many deadlines on one loop timer (fake clock, fake loop that records the one timer)."""

from __future__ import annotations

from fake_clock import FakeClock

from gateway.engine.alarms import SLACK_S, Alarms


class FakeTimer:
    def __init__(self, delay: float, fn) -> None:
        self.delay, self.fn, self.cancelled = delay, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def call_later(self, delay: float, fn) -> FakeTimer:
        t = FakeTimer(delay, fn)
        self.timers.append(t)
        return t

    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def fire(self) -> None:
        """The one pending timer goes off (there must be exactly one)."""
        (t,) = self.live()
        t.cancelled = True  # spent
        t.fn()


class LoopClock:
    """The fake clock's time with the fake loop's timers, so the test sees the one loop timer."""

    def __init__(self, clock: FakeClock, loop: FakeLoop) -> None:
        self.clock, self.loop = clock, loop

    def now(self) -> float:
        return self.clock.t

    def call_at(self, when: float, fn) -> FakeTimer:
        return self.loop.call_later(max(0.0, when - self.clock.t), fn)


def _alarms() -> tuple[Alarms, FakeClock, FakeLoop]:
    clock, loop = FakeClock(), FakeLoop()
    return Alarms(LoopClock(clock, loop)), clock, loop


def test_one_loop_timer_serves_many_alarms_in_deadline_order():
    alarms, clock, loop = _alarms()
    fired: list[str] = []
    alarms.at(clock.t + 2.0, lambda: fired.append("b"))
    alarms.at(clock.t + 1.0, lambda: fired.append("a"))  # earlier: the timer moves to it
    alarms.at(clock.t + 3.0, lambda: fired.append("c"))  # later: no new timer
    assert [t.delay for t in loop.live()] == [1.0] and len(loop.timers) == 2
    clock.advance(1.0)
    loop.fire()
    assert fired == ["a"]
    assert loop.live()[-1].delay == 1.0  # asleep until b
    clock.advance(1.0)
    loop.fire()
    clock.advance(1.0)
    loop.fire()
    assert fired == ["a", "b", "c"] and len(alarms) == 0
    assert loop.live() == []  # nothing left to wait for: no timer


def test_a_cancelled_alarm_never_fires_and_costs_no_timer():
    alarms, clock, loop = _alarms()
    fired: list[str] = []
    first = alarms.at(clock.t + 1.0, lambda: fired.append("first"))
    alarms.cancel(first)
    alarms.cancel(first)  # twice is harmless
    for i in range(100):  # the usual life of a deadline: armed, then cancelled well before it is due
        alarms.cancel(alarms.at(clock.t + 1.0 + i * 0.001, lambda: fired.append("late")))
    assert len(loop.timers) == 1  # none of them rescheduled the loop timer
    live = alarms.at(clock.t + 5.0, lambda: fired.append("live"))
    assert len(alarms) == 1
    clock.advance(1.0)
    loop.fire()  # wakes for the stale head, drops the cancelled, sleeps until the live one
    assert fired == [] and loop.live()[-1].delay == 4.0
    clock.advance(4.0)
    loop.fire()
    assert fired == ["live"] and live[2] is None


def test_due_within_the_slack_fires_now_later_waits():
    alarms, clock, loop = _alarms()
    fired: list[str] = []
    alarms.at(clock.t + 1.0, lambda: fired.append("due"))
    alarms.at(clock.t + 1.0 + SLACK_S * 3, lambda: fired.append("not yet"))
    clock.advance(1.0 - SLACK_S / 2)  # the loop woke a little early
    loop.fire()
    assert fired == ["due"]
    assert abs(loop.live()[-1].delay - SLACK_S * 3.5) < 1e-9


def test_cancelled_entries_are_compacted_when_they_outnumber_live_ones():
    alarms, clock, _ = _alarms()
    keep = [alarms.at(clock.t + 10.0 + i, lambda: None) for i in range(10)]
    for i in range(1000):
        alarms.cancel(alarms.at(clock.t + 60.0 + i, lambda: None))
    assert len(alarms._heap) < 600  # rebuilt at least once instead of holding every cancelled entry
    assert len(alarms) == len(keep)


def test_a_callback_may_arm_another_and_a_failing_one_does_not_strand_the_rest():
    alarms, clock, loop = _alarms()
    fired: list[str] = []

    def rearm() -> None:
        fired.append("first")
        alarms.at(clock.t + 0.5, lambda: fired.append("rearmed"))

    def broken() -> None:
        raise RuntimeError("boom")

    alarms.at(clock.t + 1.0, rearm)
    alarms.at(clock.t + 1.0, broken)
    alarms.at(clock.t + 1.0, lambda: fired.append("third"))
    clock.advance(1.0)
    loop.fire()
    assert fired == ["first", "third"]
    assert len(loop.live()) == 1 and loop.live()[0].delay == 0.5
    clock.advance(0.5)
    loop.fire()
    assert fired == ["first", "third", "rearmed"]
