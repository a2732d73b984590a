"""Ejections and estimates shared between replicas through the state backend (engine/sync.py): engines
on fake clocks, one backend (the in-memory one, which can be made to fail), the real StateSync of each.

Each replica's monotonic clock is a ``FakeClock`` (their origins differ when a test is about that) and its
wall clock moves with it from ``EPOCH`` (plus a skew, for a replica whose wall clock is off), so every
time here is exact and no test waits for real time to pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
import pytest
from fake_clock import FakeClock
from scripted_upstream import Reply, ScriptedUpstream

from gateway.config import parse_config
from gateway.engine.engine import Engine
from gateway.engine.gauges import StateGauges
from gateway.engine.registry import DeploymentRuntime
from gateway.engine.sync import StateSync
from gateway.state.base import SyncBatch, SyncResult
from gateway.state.memory import MemoryState
from gateway.telemetry.metrics import Metrics

EPOCH = 1_800_000_000.0  # the replicas' wall clocks read this when they are made (any value would do)
INTERVAL_S = 0.1
TTL_S = 60.0


class Shared(MemoryState):
    """One backend for both replicas; ``down`` makes every call fail as an unreachable Redis does."""

    name = "redis"
    down = False

    async def sync(self, batch: SyncBatch, ttl_s: float) -> SyncResult:
        if self.down:
            raise ConnectionError("backend down")
        return await super().sync(batch, ttl_s)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if self.down:
            raise ConnectionError("backend down")
        await super().set(key, value, ttl_s)


def _replica(
    backend: Shared, clock: FakeClock, wall_skew_s: float = 0.0
) -> tuple[StateSync, DeploymentRuntime]:
    """A replica timed on ``clock``; its wall clock reads ``EPOCH + wall_skew_s`` now and moves with it."""
    cfg = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "deployments": [{"id": "a", "base_url": "http://a.test/v1"}],
                    "outlier": {"base_ejection_s": 20, "max_ejection_s": 60},
                }
            ]
        },
        env={},
    )
    engine = Engine(
        cfg,
        home_region=None,
        metrics=Metrics(),
        access_log=None,
        upstream=ScriptedUpstream(clock, lambda req: Reply()).client,
        clock=clock,
    )
    offset = EPOCH + wall_skew_s - clock.t
    sync = StateSync(engine, backend, INTERVAL_S, TTL_S, wall=lambda: clock.t + offset)
    return sync, engine.registry.models["m"].by_id["a"]


def _eject(sync: StateSync, d: DeploymentRuntime, for_s: float) -> None:
    d.outlier.ejected_until = sync.clock.now() + for_s
    d.outlier.ejections = 1
    sync.publish_ejection(d)


async def _settle(sync: StateSync) -> None:
    while sync._pending:
        await asyncio.gather(*sync._pending)


async def _until(what: str, done: Callable[[], bool]) -> None:
    """Let the event loop run until ``done()``: a bounded number of turns, no wall-clock time."""
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


# ---------------------------------------------------------------- the loop


def test_a_round_runs_every_sync_interval_of_the_engine_clock_and_none_before() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        sync, _ = _replica(Shared(), clock)
        await sync.start()
        await _until("the loop to sleep", lambda: clock.next_due() is not None)
        due = clock.next_due()
        assert due == pytest.approx(clock.t + INTERVAL_S)
        clock.advance(INTERVAL_S * 0.99)
        assert clock.next_due() == due and sync.rounds == 0  # its wake-up has not fired: no round yet
        clock.advance(INTERVAL_S * 0.01)
        await _until("the first round", lambda: sync.rounds == 1)
        await _until(
            "the loop to sleep again", lambda: clock.next_due() == pytest.approx(clock.t + INTERVAL_S)
        )
        clock.advance(INTERVAL_S)
        await _until("the second round", lambda: sync.rounds == 2)
        assert sync.up is True
        await sync.close()

    asyncio.run(scenario())


def test_a_round_that_fails_unexpectedly_is_logged_marks_sharing_down_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        sync, _ = _replica(Shared(), clock)
        await sync.start()
        real_round = sync.round
        failures = []

        async def buggy_round() -> None:
            if not failures:
                failures.append(1)
                raise KeyError("a bug")
            await real_round()

        monkeypatch.setattr(sync, "round", buggy_round)
        await _until("the loop to sleep", lambda: clock.next_due() is not None)
        clock.advance(INTERVAL_S)
        await _until("the failed round", lambda: sync.up is False)
        assert "state sync round failed" in caplog.text and "KeyError" in caplog.text
        await _until("the loop to sleep again", lambda: clock.next_due() is not None)
        clock.advance(INTERVAL_S)
        await _until("the next round", lambda: sync.rounds == 1 and sync.up is True)
        await sync.close()

    asyncio.run(scenario())


class Paused(Shared):
    """A backend that takes a round's call and never answers, as a paused Redis does, until resumed."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = True
        self.calls = 0
        self.cancelled = 0

    async def sync(self, batch: SyncBatch, ttl_s: float) -> SyncResult:
        self.calls += 1
        if self.paused:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await super().sync(batch, ttl_s)


def _backend_up(sync: StateSync) -> float | None:
    gauges = StateGauges(sync.engine.registry, sync.engine.metrics, "redis")
    gauges.sync = sync
    gauges.refresh()
    return sync.engine.metrics.registry.get_sample_value("llmgw_state_backend_up", {"backend": "redis"})


def test_a_round_the_backend_never_answers_is_cut_on_the_engine_clock_and_the_loop_goes_on() -> None:
    async def scenario() -> None:
        clock, backend = FakeClock(), Paused()
        sync, _ = _replica(backend, clock)
        await sync.start()
        assert _backend_up(sync) == 1
        await _until("the loop to sleep", lambda: clock.next_due() is not None)
        clock.advance(INTERVAL_S)
        await _until("the round's call", lambda: backend.calls == 1 and clock.next_due() is not None)
        bound = clock.next_due()
        assert bound == pytest.approx(clock.t + 0.5)  # max(sync interval, 0.5 s)
        clock.advance(0.5 * 0.99)
        await _until("nothing", lambda: True)
        assert (backend.cancelled, sync.up) == (0, True)  # within its bound: still waiting
        clock.advance(0.5 * 0.01)
        await _until("the round cut", lambda: backend.cancelled == 1 and sync.up is False)
        assert sync.rounds == 0 and _backend_up(sync) == 0
        backend.paused = False  # Redis resumed: the next round shares again
        await _until("the loop to sleep again", lambda: clock.next_due() is not None)
        clock.advance(INTERVAL_S)
        await _until("the next round", lambda: sync.rounds == 1 and sync.up is True)
        assert backend.calls == 2 and _backend_up(sync) == 1
        await sync.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- ejections


def test_an_ejection_decided_while_the_backend_is_down_is_shared_once_it_answers() -> None:
    async def scenario() -> None:
        clock, backend = FakeClock(), Shared()
        a, dep_a = _replica(backend, clock)
        b, dep_b = _replica(backend, clock)
        backend.down = True
        _eject(a, dep_a, 20)
        await _settle(a)
        await b.round()
        clock.advance(INTERVAL_S)
        backend.down = False
        await b.round()
        assert dep_b.outlier.ejected_until == 0.0  # not shared yet: the publish failed
        clock.advance(INTERVAL_S)
        await a.round()  # the backend answers again: the ejection goes out
        await _settle(a)
        await b.round()
        assert dep_b.outlier.ejected_until == pytest.approx(dep_a.outlier.ejected_until)  # the same end

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("skew_s", "left_s"),
    [
        (0.0, 20.0),
        (-5.0, 15.0),  # the publisher's wall clock is 5 s behind: its end is 5 s sooner here
        (3600.0, 60.0),  # an hour ahead: no longer than outlier.max_ejection_s
        (-30.0, None),  # 30 s behind: over by this replica's wall clock, so not an ejection at all
    ],
)
def test_an_ejection_from_another_replica_ends_at_its_wall_clock_end_capped_at_max_ejection_s(
    skew_s: float, left_s: float | None
) -> None:
    async def scenario() -> None:
        backend = Shared()
        clock_a, clock_b = FakeClock(1000.0), FakeClock(50_000.0)  # monotonic clocks share no origin
        a, dep_a = _replica(backend, clock_a, wall_skew_s=skew_s)
        b, dep_b = _replica(backend, clock_b)
        _eject(a, dep_a, 20)  # on a's wall clock, 20 s from its now
        await _settle(a)
        await b.round()
        if left_s is None:
            assert (dep_b.outlier.ejected_until, dep_b.outlier.ejections) == (0.0, 0)
        else:
            assert dep_b.outlier.ejected_until == pytest.approx(clock_b.t + left_s)
            assert dep_b.outlier.ejections == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("raw", [b"not json", b"{}", b"[1]", b'["soon", 1]', b"[null, 1]", b'[1e12, "x"]'])
def test_a_shared_ejection_that_is_not_what_a_replica_writes_is_skipped_not_fatal(raw: bytes) -> None:
    async def scenario() -> None:
        backend = Shared()
        sync, dep = _replica(backend, FakeClock())
        await backend.set(sync.key("eject", "a"), raw, 20)
        await sync.round()  # it raised for the last three, which ended the sync loop
        assert (sync.rounds, sync.up) == (1, True)
        assert (dep.outlier.ejected_until, dep.outlier.ejections) == (0.0, 0)

    asyncio.run(scenario())


def test_a_replica_reading_back_its_own_ejection_says_nothing_and_another_says_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        clock, backend = FakeClock(), Shared()
        a, dep_a = _replica(backend, clock)
        b, _ = _replica(backend, clock)
        _eject(a, dep_a, 20)
        await _settle(a)
        for _ in range(5):
            await a.round()
            await b.round()
            clock.advance(INTERVAL_S)

    with caplog.at_level(logging.WARNING, logger="llmgw.state"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "by another replica" in r.getMessage()]
    assert lines == ["deployment a ejected by another replica for 20 s"], lines


# ---------------------------------------------------------------- latency estimates and their ages


def _merges(sync: StateSync, result: str) -> float:
    labels = {"deployment": "a", "result": result}
    return sync.engine.metrics.registry.get_sample_value("llmgw_state_remote_estimates_total", labels) or 0.0


def test_a_stale_remote_estimate_leaves_a_probe_answer_alone_and_a_fresher_one_moves_the_other() -> None:
    async def scenario() -> None:
        backend = Shared()
        clock_a, clock_b = FakeClock(1000.0), FakeClock(50_000.0)  # ages, not times, cross between them
        a, dep_a = _replica(backend, clock_a)
        b, dep_b = _replica(backend, clock_b)
        for dep, clock in ((dep_a, clock_a), (dep_b, clock_b)):
            dep.observe(60.0, clock.t - 6.0, stream=True)
            dep.observe(3000.0, clock.t - 5.0, stream=True)  # slow answers both saw; b has sent nothing since
        dep_a.observe(60.0, clock_a.t, stream=True, probe=True)  # a's probe: fast again
        await b.round()
        await a.round()  # b's view is based on samples 5 s older than a's: left out
        assert dep_a.ttft.value(clock_a.t) == 60.0
        assert (_merges(a, "stale"), _merges(a, "merged")) == (1, 0)
        stale_b = dep_b.ttft.value(clock_b.t)
        await b.round()  # a's is newer than b's own samples: b takes it in, half way (MAX_REMOTE_WEIGHT)
        assert dep_b.ttft.value(clock_b.t) == pytest.approx((stale_b + 60.0) / 2)
        assert (_merges(b, "merged"), _merges(b, "stale")) == (1, 0)

    asyncio.run(scenario())


@pytest.mark.parametrize(("published_s_ago", "merged"), [(TTL_S - 1.0, True), (TTL_S + 1.0, False)])
def test_an_estimate_published_longer_ago_than_the_key_ttl_by_this_replicas_wall_clock_is_not_merged(
    published_s_ago: float, merged: bool
) -> None:
    async def scenario() -> None:
        backend = Shared()
        sync, dep = _replica(backend, FakeClock())
        field = orjson.dumps([400.0, 7, 0.0, 0, sync.wall() - published_s_ago])
        await backend.hset(sync.key("stats", "a"), {"r": field}, TTL_S)
        await sync.round()
        assert dep.ttft.has_data is merged
        assert _merges(sync, "no-age") == (1 if merged else 0)

    asyncio.run(scenario())


def test_the_fields_of_replicas_that_stopped_publishing_are_deleted_and_forgotten() -> None:
    """The stats hash lives on while any replica writes it: without deleting, every restart of a replica
    would leave two fields that every replica reads every round, and an entry in each one's memory."""

    async def scenario() -> None:
        clock, backend = FakeClock(), Shared()
        a, _ = _replica(backend, clock)
        b, dep_b = _replica(backend, clock)
        key = a.key("stats", "a")
        dep_b.observe(250.0, clock.t, stream=True)
        await b.round()
        restarted = {}
        for i in range(100):  # replicas restarted long ago: their last views, published over a TTL ago
            old = orjson.dumps([300.0, 5, 0.0, 0, a.wall() - TTL_S - 1 - i])
            restarted[f"old-{i}"], restarted[f"old-{i}#age"] = old, orjson.dumps([0.0, None])
        await backend.hset(key, restarted, TTL_S)
        await a.round()  # reads b's view (merged) and the stopped ones (not)
        assert _merges(a, "merged") == 1 and _merges(a, "no-age") == 0
        assert set(a._seen["a"]) == {b.replica_id}
        await a.round()  # deletes them with its write
        assert set(await backend.hgetall(key)) == {
            a.replica_id,
            a.replica_id + "#age",
            b.replica_id,
            b.replica_id + "#age",
        }
        clock.advance(TTL_S + 1)  # b stops too: a forgets it, and deletes its fields
        await a.round()
        await a.round()
        assert a._seen["a"] == {} and set(await backend.hgetall(key)) == {a.replica_id, a.replica_id + "#age"}

    asyncio.run(scenario())


def test_a_view_is_merged_once_until_its_replica_publishes_again() -> None:
    async def scenario() -> None:
        clock, backend = FakeClock(), Shared()
        a, dep_a = _replica(backend, clock)
        b, _ = _replica(backend, clock)
        dep_a.observe(250.0, clock.t, stream=True)
        await a.round()
        for _ in range(3):  # the same view, read three times, pulls b toward it once
            clock.advance(INTERVAL_S)
            await b.round()
        assert _merges(b, "merged") == 1
        await a.round()  # published again (a later wall time): news
        await b.round()
        assert _merges(b, "merged") == 2

    asyncio.run(scenario())


def _merge_as_the_previous_version(
    d: DeploymentRuntime, fields: dict[str, bytes], wall: float, mono: float
) -> None:
    """What a replica of the version before ages runs on every field of a stats hash (engine/sync.py then)."""
    for raw in fields.values():
        try:
            ttft, ttft_n, lat, lat_n, ts = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            continue
        if wall - ts > 60:
            continue
        if ttft_n:
            d.ttft.merge_remote(ttft, ttft_n, mono)
        if lat_n:
            d.latency.merge_remote(lat, lat_n, mono)


def test_ages_travel_beside_the_five_values_so_replicas_of_either_version_read_each_other() -> None:
    async def scenario() -> None:
        clock, backend = FakeClock(), Shared()
        new, dep_new = _replica(backend, clock)
        dep_new.observe(250.0, clock.t - 2.0, stream=True)
        await new.round()
        fields = await backend.hgetall(new.key("stats", "a"))
        assert set(fields) == {new.replica_id, new.replica_id + "#age"}
        ttft = round(dep_new.ttft.value(clock.t), 3)  # 250 ms, decayed for 2 s
        assert orjson.loads(fields[new.replica_id]) == [ttft, 1, 0.0, 0, EPOCH]
        assert orjson.loads(fields[new.replica_id + "#age"]) == [2.0, None]  # no latency sample: no age
        # An older replica skips the age field (not five values) and merges the estimate as it always did.
        _, dep_old = _replica(backend, clock)
        _merge_as_the_previous_version(dep_old, fields, EPOCH, clock.t)
        assert dep_old.ttft.value(clock.t) == ttft and not dep_old.latency.has_data
        # A newer one reads an older replica's field, which has no age, and merges it as before: no-age.
        old_field = orjson.dumps([400.0, 7, 0.0, 0, new.wall()])
        await backend.hset(new.key("stats", "a"), {"old-replica": old_field}, TTL_S)
        before = dep_new.ttft.value(clock.t)
        await new.round()
        assert dep_new.ttft.value(clock.t) > before + 50.0
        assert (_merges(new, "no-age"), _merges(new, "stale"), _merges(new, "merged")) == (1, 0, 0)

    asyncio.run(scenario())


def test_a_published_field_that_is_not_what_a_replica_writes_is_skipped_not_fatal() -> None:
    async def scenario() -> None:
        backend = Shared()
        sync, dep = _replica(backend, FakeClock())
        now_wall = sync.wall()
        junk = {
            "r1": b'["fast", 3, 0, 0, 1]',
            "r2": b"{}",
            "r3": b"[1, 2, 3]",
            "r4": b"not json",
            "r5": orjson.dumps([-1.0, 3, 0.0, 0, now_wall]),
            "r6": orjson.dumps([100.0, True, 0.0, 0, now_wall]),
            "r7": orjson.dumps([100.0, 3, 0.0, 0, None]),
            "r8": orjson.dumps([100.0, 3, 0.0, 0, now_wall]),
            "r8#age": b'["old", null]',  # an unreadable age: merged as one of unknown age
        }
        await backend.hset(sync.key("stats", "a"), junk, TTL_S)
        await sync.round()
        assert sync.up is True and dep.ttft.value(sync.clock.now()) == 100.0
        assert (_merges(sync, "no-age"), _merges(sync, "merged"), _merges(sync, "stale")) == (1, 0, 0)

    asyncio.run(scenario())
