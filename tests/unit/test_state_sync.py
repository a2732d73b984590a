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
