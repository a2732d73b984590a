"""Ejections shared between replicas through the state backend (engine/sync.py): two engines, one backend
(the in-memory one, which can be made to fail), the real StateSync of each."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest
from fake_clock import FakeClock
from scripted_upstream import Reply, ScriptedUpstream

from gateway.config import parse_config
from gateway.engine.engine import Engine
from gateway.engine.registry import DeploymentRuntime
from gateway.engine.sync import StateSync
from gateway.state.base import SyncBatch, SyncResult
from gateway.state.memory import MemoryState
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.timing import now


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


def _replica(backend: Shared) -> tuple[StateSync, DeploymentRuntime]:
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
        upstream=ScriptedUpstream(FakeClock(), lambda req: Reply()).client,
    )
    return StateSync(engine, backend, interval_s=0.1, ttl_s=60), engine.registry.models["m"].by_id["a"]


def _eject(sync: StateSync, d: DeploymentRuntime, for_s: float) -> None:
    d.outlier.ejected_until = now() + for_s
    d.outlier.ejections = 1
    sync.publish_ejection(d)


async def _settle(sync: StateSync) -> None:
    while sync._pending:
        await asyncio.gather(*sync._pending)


def test_an_ejection_decided_while_the_backend_is_down_is_shared_once_it_answers() -> None:
    async def scenario() -> None:
        backend = Shared()
        a, dep_a = _replica(backend)
        b, dep_b = _replica(backend)
        backend.down = True
        _eject(a, dep_a, 20)
        await _settle(a)
        await b.round()
        backend.down = False
        await b.round()
        assert dep_b.outlier.ejected_until < now()  # not shared yet: the publish failed
        await a.round()  # the backend answers again: the ejection goes out
        await _settle(a)
        await b.round()
        assert dep_b.outlier.ejected_until - now() == pytest.approx(20, abs=1)

    asyncio.run(scenario())


def test_an_ejection_from_a_replica_whose_clock_is_an_hour_ahead_lasts_no_longer_than_max_ejection_s() -> (
    None
):
    async def scenario() -> None:
        backend = Shared()
        b, dep_b = _replica(backend)
        skewed = orjson.dumps([time.time() + 3600 + 20, 1])  # its wall clock says 20 s from its now
        await backend.set(b.key("eject", "a"), skewed, 20)
        await b.round()
        assert dep_b.outlier.ejected_until - now() == pytest.approx(60, abs=1)  # outlier.max_ejection_s

    asyncio.run(scenario())


def test_a_replica_reading_back_its_own_ejection_says_nothing_and_another_says_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        backend = Shared()
        a, dep_a = _replica(backend)
        b, _ = _replica(backend)
        _eject(a, dep_a, 20)
        await _settle(a)
        for _ in range(5):
            await a.round()
            await b.round()

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
        a, dep_a = _replica(backend)
        b, dep_b = _replica(backend)
        t = now()
        for dep in (dep_a, dep_b):
            dep.observe(60.0, t - 6.0, stream=True)
            dep.observe(3000.0, t - 5.0, stream=True)  # slow answers both saw; b has sent nothing since
        dep_a.observe(60.0, t, stream=True, probe=True)  # a's probe: fast again
        await b.round()
        await a.round()  # b's view is based on samples 5 s older than a's: left out
        assert dep_a.ttft.value(now()) == pytest.approx(60.0, abs=1.0)
        assert (_merges(a, "stale"), _merges(a, "merged")) == (1, 0)
        stale_b = dep_b.ttft.value(now())
        await b.round()  # a's is newer than b's own samples: b takes it in, half way (MAX_REMOTE_WEIGHT)
        assert dep_b.ttft.value(now()) == pytest.approx((stale_b + 60.0) / 2, rel=0.01)
        assert (_merges(b, "merged"), _merges(b, "stale")) == (1, 0)

    asyncio.run(scenario())


def _merge_as_the_previous_version(d: DeploymentRuntime, fields: dict[str, bytes]) -> None:
    """What a replica of the version before ages runs on every field of a stats hash (engine/sync.py then)."""
    wall, mono = time.time(), now()
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
        backend = Shared()
        new, dep_new = _replica(backend)
        dep_new.observe(250.0, now() - 2.0, stream=True)
        await new.round()
        fields = await backend.hgetall(new.key("stats", "a"))
        assert set(fields) == {new.replica_id, new.replica_id + "#age"}
        assert orjson.loads(fields[new.replica_id])[:4] == [pytest.approx(250.0, rel=0.2), 1, 0.0, 0]
        ttft_age, latency_age = orjson.loads(fields[new.replica_id + "#age"])
        assert 2.0 <= ttft_age < 3.0 and latency_age is None  # no latency sample: no age
        # An older replica skips the age field (not five values) and merges the estimate as it always did.
        _, dep_old = _replica(backend)
        _merge_as_the_previous_version(dep_old, fields)
        assert dep_old.ttft.value(now()) == pytest.approx(250.0, rel=0.2) and not dep_old.latency.has_data
        # A newer one reads an older replica's field, which has no age, and merges it as before: no-age.
        old_field = orjson.dumps([400.0, 7, 0.0, 0, time.time()])
        await backend.hset(new.key("stats", "a"), {"old-replica": old_field}, 60)
        before = dep_new.ttft.value(now())
        await new.round()
        assert dep_new.ttft.value(now()) > before + 50.0
        assert (_merges(new, "no-age"), _merges(new, "stale"), _merges(new, "merged")) == (1, 0, 0)

    asyncio.run(scenario())


def test_a_published_field_that_is_not_what_a_replica_writes_is_skipped_not_fatal() -> None:
    async def scenario() -> None:
        backend = Shared()
        sync, dep = _replica(backend)
        key = sync.key("stats", "a")
        junk = {
            "r1": b'["fast", 3, 0, 0, 1]',
            "r2": b"{}",
            "r3": b"[1, 2, 3]",
            "r4": b"not json",
            "r5": orjson.dumps([-1.0, 3, 0.0, 0, time.time()]),
            "r6": orjson.dumps([100.0, 3, 0.0, 0, time.time()]),
            "r6#age": b'["old", null]',  # an unreadable age: merged as one of unknown age
        }
        await backend.hset(key, junk, 60)
        await sync.round()
        assert sync.up is True and dep.ttft.value(now()) == pytest.approx(100.0, rel=0.01)
        assert _merges(sync, "no-age") == 1

    asyncio.run(scenario())
