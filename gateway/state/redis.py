"""Redis state: shared by every worker and replica. Pipelined, prefixed, expiring keys.

Works the same on one server, behind Sentinel and on a Redis Cluster (see ``topology``): every script
touches keys that share a hash tag, pipelines hold single-key commands only (a cluster pipeline sends
each to its node), single commands go to their key's node (``Topology.ready`` first), and nothing
scans the keyspace. Every call a request can wait on is bounded by the state timeout (the background
sync round is bounded by its caller).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import redis

from gateway.policy.ratelimit import ADMITTED, LimitCheck, LimitDecision
from gateway.state.base import StateRefused, SyncBatch, SyncResult
from gateway.state.memory import MemoryState
from gateway.state.topology import RedisTarget, Topology

if TYPE_CHECKING:
    from gateway.config import StateConfig

# GCRA over several limits at once (gateway.policy.ratelimit is the reference): one GET and one SET
# per limit, whatever the traffic. Redis's own clock (TIME), so replicas with skewed clocks agree.
# KEYS: one TAT per limit, sharing a hash tag; ARGV: period in ms, then cost and limit per key.
# Returns {0, "0"} when admitted, else {i, retry-after ms} for the first limit (1-based) that refused.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local period = tonumber(ARGV[1])
local tats = {}
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[2 * i])
  local limit = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new = tat + cost * period / limit
  if new - now > period then
    return {i, string.format('%.3f', new - period - now)}
  end
  tats[i] = new
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.6f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1)
end
return {0, '0'}
"""


class RedisState:
    name = "redis"

    def __init__(self, target: RedisTarget, prefix: str = "llmgw:") -> None:
        self.target = target
        self.mode = target.mode
        self.prefix = prefix
        self.timeout_s = target.timeout_s
        self._topology = Topology(target)
        self._client = self._topology.client
        self._gcra = self._client.register_script(_GCRA_LUA)

    @property
    def url(self) -> str:
        return self.target.url

    def primaries(self) -> list[str]:
        return self._topology.primaries()

    async def start(self) -> None:
        async with asyncio.timeout(self.timeout_s * 4):  # a cold start may discover the topology first
            await self._client.ping()

    async def close(self) -> None:
        await self._topology.close()

    async def sync(self, batch: SyncBatch, ttl_s: float) -> SyncResult:
        pipe = self._client.pipeline(transaction=False)
        ttl_ms = int(ttl_s * 1000)
        for k, mapping in batch.hset.items():
            pipe.hset(k, mapping=mapping)
            pipe.pexpire(k, ttl_ms)
        for k, fields in batch.hdel.items():
            pipe.hdel(k, *fields)
        for k in batch.read_hashes:
            pipe.hgetall(k)
        for k in batch.read_keys:  # GET each, not MGET: on a cluster the keys live on different nodes
            pipe.get(k)
        out = await pipe.execute()
        out = out[2 * len(batch.hset) + len(batch.hdel) :]
        hashes = {}
        for k, v in zip(batch.read_hashes, out, strict=False):
            hashes[k] = {f.decode() if isinstance(f, bytes) else f: val for f, val in v.items()}
        keys: dict[str, bytes | None] = dict(zip(batch.read_keys, out[len(batch.read_hashes) :], strict=True))
        return SyncResult(hashes, keys)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self._topology.ready()
            await self._client.set(key, value, px=max(1, int(ttl_s * 1000)))

    async def delete(self, key: str) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self._topology.ready()
            await self._client.delete(key)  # a full Redis (maxmemory, noeviction) still deletes

    async def get(self, key: str) -> bytes | None:
        async with asyncio.timeout(self.timeout_s):
            await self._topology.ready()
            return await self._client.get(key)

    async def hset(self, key: str, mapping: dict[str, bytes], ttl_s: float | None) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(key, mapping=mapping)
        if ttl_s:
            pipe.pexpire(key, int(ttl_s * 1000))
        async with asyncio.timeout(self.timeout_s):
            await pipe.execute()

    async def hgetall(self, key: str) -> dict[str, bytes]:
        async with asyncio.timeout(self.timeout_s):
            await self._topology.ready()
            raw = await self._client.hgetall(key)
        return {f.decode() if isinstance(f, bytes) else f: v for f, v in raw.items()}

    async def hdel(self, key: str, field: str) -> int:
        async with asyncio.timeout(self.timeout_s):
            await self._topology.ready()
            return int(await self._client.hdel(key, field))

    async def rate_limit(self, checks: list[LimitCheck], period_s: float) -> LimitDecision:
        args: list[float | int] = [period_s * 1000.0]
        for c in checks:
            args += (c.cost, c.limit)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._topology.ready()
                refused, retry_ms = await self._gcra(keys=[c.key for c in checks], args=args)
        except redis.exceptions.OutOfMemoryError as exc:  # full: the script writes, but Redis still reads
            raise StateRefused(str(exc)) from exc
        refused = int(refused)
        return ADMITTED if refused == 0 else LimitDecision(refused - 1, float(retry_ms) / 1000.0)


def make_state(cfg: StateConfig) -> RedisState | MemoryState:
    """The configured backend: ``MemoryState`` or a ``RedisState`` for ``cfg.redis_mode``."""
    if cfg.backend == "redis":
        return RedisState(redis_target(cfg), cfg.key_prefix)
    return MemoryState(cfg.key_prefix)


def redis_target(cfg: StateConfig, url: str | None = None, timeout_s: float | None = None) -> RedisTarget:
    """A ``RedisTarget`` from the ``state`` config section (``url`` overrides ``state.redis_url``)."""
    sentinels = tuple((h, int(p)) for h, _, p in (s.rpartition(":") for s in cfg.sentinels))
    return RedisTarget(
        cfg.redis_mode,
        url or cfg.redis_url,
        sentinels,
        cfg.sentinel_master or "",
        cfg.sentinel_password,
        timeout_s if timeout_s is not None else cfg.timeout_ms / 1000.0,
    )
