"""The in-memory backend's expiry, on a fake wall clock: what it stores with a TTL is gone at the TTL, as in
Redis, and no test waits for real time to pass."""

from __future__ import annotations

import asyncio

from fake_clock import FakeClock

from gateway.policy.ratelimit import LimitCheck
from gateway.state.base import SyncBatch
from gateway.state.memory import MemoryState

TTL_S = 10.0
JUST = 0.001  # less than any TTL here


def _state() -> tuple[MemoryState, FakeClock]:
    wall = FakeClock(1_800_000_000.0)
    return MemoryState(wall=wall), wall


def test_a_key_lives_until_its_ttl_and_not_after() -> None:
    async def scenario() -> None:
        state, wall = _state()
        await state.set("k", b"v", TTL_S)
        wall.advance(TTL_S - JUST)
        assert await state.get("k") == b"v"
        wall.advance(JUST)
        assert await state.get("k") is None
        await state.set("k", b"w", TTL_S)  # set again: a new TTL from now
        wall.advance(TTL_S - JUST)
        assert await state.get("k") == b"w"

    asyncio.run(scenario())


def test_a_hash_expires_at_its_ttl_and_each_write_starts_it_again() -> None:
    async def scenario() -> None:
        state, wall = _state()
        await state.hset("h", {"a": b"1"}, TTL_S)
        wall.advance(TTL_S - JUST)
        await state.hset("h", {"b": b"2"}, TTL_S)  # written while alive: kept, with a new TTL (PEXPIRE)
        wall.advance(TTL_S - JUST)
        assert await state.hgetall("h") == {"a": b"1", "b": b"2"}
        wall.advance(JUST)
        assert await state.hgetall("h") == {}
        assert await state.hdel("h", "a") == 0  # an expired hash has no fields to delete
        await state.hset("h", {"c": b"3"}, TTL_S)  # written after expiry: the old fields do not come back
        assert await state.hgetall("h") == {"c": b"3"}

    asyncio.run(scenario())


def test_a_hash_written_without_a_ttl_never_expires() -> None:
    async def scenario() -> None:
        state, wall = _state()
        await state.hset("keys", {"id": b"x"}, None)
        wall.advance(365 * 86400.0)
        assert await state.hgetall("keys") == {"id": b"x"}

    asyncio.run(scenario())


def test_a_sync_round_writes_with_the_ttl_and_reads_back_nothing_expired() -> None:
    async def scenario() -> None:
        state, wall = _state()
        await state.set("eject", b"[1, 1]", 2.0)  # an ejection published for 2 s
        batch = SyncBatch(hset={"stats": {"r": b"x"}}, read_hashes=["stats"], read_keys=["eject"])
        res = await state.sync(batch, TTL_S)
        assert (res.hashes, res.keys) == ({"stats": {"r": b"x"}}, {"eject": b"[1, 1]"})
        wall.advance(2.0)
        res = await state.sync(SyncBatch(read_hashes=["stats"], read_keys=["eject"]), TTL_S)
        assert (res.hashes, res.keys) == ({"stats": {"r": b"x"}}, {"eject": None})
        wall.advance(TTL_S)
        res = await state.sync(SyncBatch(read_hashes=["stats"]), TTL_S)
        assert res.hashes == {"stats": {}}

    asyncio.run(scenario())


def test_a_rate_limit_admits_again_once_its_period_has_passed_on_the_wall_clock() -> None:
    async def scenario() -> None:
        state, wall = _state()
        one_a_minute = [LimitCheck("rpm:k", 1, 1)]
        assert (await state.rate_limit(one_a_minute, 60.0)).refused == -1
        refused = await state.rate_limit(one_a_minute, 60.0)
        assert refused.refused == 0 and refused.retry_after_s == 60.0
        wall.advance(60.0 - JUST)
        assert (await state.rate_limit(one_a_minute, 60.0)).refused == 0
        wall.advance(JUST)
        assert (await state.rate_limit(one_a_minute, 60.0)).refused == -1

    asyncio.run(scenario())
