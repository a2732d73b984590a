"""Redis state: shared by every worker and replica. Pipelined, prefixed, expiring keys."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from gateway.state.base import SyncBatch, SyncResult

# Sliding-window log in one round trip: drop old entries, count, admit or refuse atomically.
_WINDOW_LUA = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local member = ARGV[5]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
local used = 0
for i = 1, #entries, 2 do
  local c = tonumber(string.match(entries[i], '^([^:]+):'))
  used = used + (c or 1)
end
if used + cost > limit and #entries > 0 then
  local oldest = tonumber(entries[2])
  return {0, tostring(oldest + window - now)}
end
redis.call('ZADD', key, now, cost .. ':' .. member)
redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
return {1, '0'}
"""


class RedisState:
    name = "redis"

    def __init__(self, url: str, prefix: str = "llmgw:", timeout_s: float = 0.5) -> None:
        self.url = url
        self.prefix = prefix
        self._client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                         health_check_interval=0, retry_on_timeout=False)
        self._window = self._client.register_script(_WINDOW_LUA)
        self._seq = 0

    async def start(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    async def sync(self, batch: SyncBatch, ttl_s: float) -> SyncResult:
        pipe = self._client.pipeline(transaction=False)
        ttl_ms = int(ttl_s * 1000)
        for k, mapping in batch.hset.items():
            pipe.hset(k, mapping=mapping)
            pipe.pexpire(k, ttl_ms)
        for k in batch.read_hashes:
            pipe.hgetall(k)
        if batch.read_keys:
            pipe.mget(batch.read_keys)
        out = await pipe.execute()
        out = out[2 * len(batch.hset):]
        hashes = {}
        for k, v in zip(batch.read_hashes, out, strict=False):
            hashes[k] = {f.decode() if isinstance(f, bytes) else f: val for f, val in v.items()}
        keys: dict[str, bytes | None] = {}
        if batch.read_keys:
            keys = dict(zip(batch.read_keys, out[len(batch.read_hashes)], strict=False))
        return SyncResult(hashes, keys)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._client.set(key, value, px=max(1, int(ttl_s * 1000)))

    async def get(self, key: str) -> bytes | None:
        return await self._client.get(key)

    async def hset(self, key: str, mapping: dict[str, bytes], ttl_s: float | None) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(key, mapping=mapping)
        if ttl_s:
            pipe.pexpire(key, int(ttl_s * 1000))
        await pipe.execute()

    async def hgetall(self, key: str) -> dict[str, bytes]:
        raw = await self._client.hgetall(key)
        return {f.decode() if isinstance(f, bytes) else f: v for f, v in raw.items()}

    async def hdel(self, key: str, field: str) -> int:
        return int(await self._client.hdel(key, field))

    async def window_limit(self, key: str, cost: int, limit: int, window_s: float) -> tuple[bool, float]:
        self._seq += 1
        ok, retry = await self._window(keys=[key], args=[time.time(), window_s, cost, limit,
                                                         f"{time.time_ns()}-{self._seq}-{id(self)}"])
        return bool(int(ok)), float(retry)


def make_state(backend: str, redis_url: str, prefix: str):  # -> StateBackend
    if backend == "redis":
        return RedisState(redis_url, prefix)
    from gateway.state.memory import MemoryState

    return MemoryState(prefix)
