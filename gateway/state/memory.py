"""In-process state: the default for one process; nothing is shared beyond it."""

from __future__ import annotations

import time

from gateway.state.base import SyncBatch, SyncResult


class MemoryState:
    name = "memory"

    def __init__(self, prefix: str = "llmgw:") -> None:
        self.prefix = prefix
        self._kv: dict[str, tuple[bytes, float]] = {}
        self._h: dict[str, tuple[dict[str, bytes], float]] = {}
        self._windows: dict[str, list[tuple[float, int]]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _alive(self, exp: float) -> bool:
        return exp == 0 or exp > time.time()

    async def sync(self, batch: SyncBatch, ttl_s: float) -> SyncResult:
        for k, mapping in batch.hset.items():
            await self.hset(k, mapping, ttl_s)
        hashes = {k: await self.hgetall(k) for k in batch.read_hashes}
        keys = {k: await self.get(k) for k in batch.read_keys}
        return SyncResult(hashes, keys)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._kv[key] = (value, time.time() + ttl_s)

    async def get(self, key: str) -> bytes | None:
        v = self._kv.get(key)
        return v[0] if v and self._alive(v[1]) else None

    async def hset(self, key: str, mapping: dict[str, bytes], ttl_s: float | None) -> None:
        cur = self._h.get(key)
        data = dict(cur[0]) if cur and self._alive(cur[1]) else {}
        data.update(mapping)
        self._h[key] = (data, time.time() + ttl_s if ttl_s else 0)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        cur = self._h.get(key)
        return dict(cur[0]) if cur and self._alive(cur[1]) else {}

    async def hdel(self, key: str, field: str) -> int:
        cur = self._h.get(key)
        if cur and field in cur[0]:
            del cur[0][field]
            return 1
        return 0

    async def window_limit(self, key: str, cost: int, limit: int, window_s: float) -> tuple[bool, float]:
        """Sliding-window counter: allow when the window's total plus cost stays within limit."""
        t = time.time()
        entries = [(ts, c) for ts, c in self._windows.get(key, []) if ts > t - window_s]
        used = sum(c for _, c in entries)
        if used + cost > limit and entries:
            retry = max(0.0, entries[0][0] + window_s - t)
            self._windows[key] = entries
            return False, retry
        entries.append((t, cost))
        self._windows[key] = entries
        return True, 0.0
