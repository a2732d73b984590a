"""In-process state: the default for one process; nothing is shared beyond it.

Keys expire as in Redis, on the wall clock passed in (``time.time`` unless a test moves a fake one).
"""

from __future__ import annotations

import time

from gateway.policy.ratelimit import LimitCheck, LimitDecision, gcra
from gateway.state.base import SyncBatch, SyncResult
from gateway.telemetry.timing import WallClock


class MemoryState:
    name = "memory"
    mode = "memory"

    def __init__(self, prefix: str = "llmgw:", wall: WallClock = time.time) -> None:
        self.prefix = prefix
        self.wall = wall
        self._kv: dict[str, tuple[bytes, float]] = {}
        self._h: dict[str, tuple[dict[str, bytes], float]] = {}
        self._tats: dict[str, float] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def primaries(self) -> list[str]:
        return []

    def _alive(self, exp: float) -> bool:
        return exp == 0 or exp > self.wall()

    async def sync(self, batch: SyncBatch, ttl_s: float) -> SyncResult:
        for k, mapping in batch.hset.items():
            await self.hset(k, mapping, ttl_s)
        for k, fields in batch.hdel.items():
            for f in fields:
                await self.hdel(k, f)
        hashes = {k: await self.hgetall(k) for k in batch.read_hashes}
        keys = {k: await self.get(k) for k in batch.read_keys}
        return SyncResult(hashes, keys)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._kv[key] = (value, self.wall() + ttl_s)

    async def delete(self, key: str) -> None:
        self._kv.pop(key, None)

    async def get(self, key: str) -> bytes | None:
        v = self._kv.get(key)
        return v[0] if v and self._alive(v[1]) else None

    async def hset(self, key: str, mapping: dict[str, bytes], ttl_s: float | None) -> None:
        cur = self._h.get(key)
        data = dict(cur[0]) if cur and self._alive(cur[1]) else {}
        data.update(mapping)
        self._h[key] = (data, self.wall() + ttl_s if ttl_s else 0)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        cur = self._h.get(key)
        return dict(cur[0]) if cur and self._alive(cur[1]) else {}

    async def hdel(self, key: str, field: str) -> int:
        cur = self._h.get(key)
        if cur and self._alive(cur[1]) and field in cur[0]:  # an expired hash has no fields (as in Redis)
            del cur[0][field]
            return 1
        return 0

    async def rate_limit(self, checks: list[LimitCheck], period_s: float) -> LimitDecision:
        now = self.wall()
        tats = self._tats
        if len(tats) > 100_000:  # keys past their TAT hold nothing: forget them
            self._tats = tats = {k: t for k, t in tats.items() if t > now}
        decision, new = gcra([tats.get(c.key, 0.0) for c in checks], checks, now, period_s)
        if decision.refused < 0:
            for c, t in zip(checks, new, strict=True):
                tats[c.key] = t
        return decision
