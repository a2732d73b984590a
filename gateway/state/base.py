"""The shared-state interface: what replicas and workers share, and nothing the hot path waits on.

Two implementations: ``memory`` (one process; the default) and ``redis`` (workers and replicas).
Every call is made from background tasks (state sync, warm-up, key admin) or, for rate limits, in
one round trip; keys carry the configured prefix and expire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.policy.ratelimit import LimitCheck, LimitDecision


class StateRefused(Exception):
    """The backend answered, and refused the command: Redis out of memory (maxmemory with noeviction)
    refuses writes but still reads. Not an outage: other calls are still worth making."""


@dataclass(slots=True)
class SyncBatch:
    """One sync round: hashes to write (key -> field -> value), fields to delete, and what to read back."""

    hset: dict[str, dict[str, bytes]] = field(default_factory=dict)
    hdel: dict[str, list[str]] = field(default_factory=dict)  # key -> fields to delete (replicas gone)
    read_hashes: list[str] = field(default_factory=list)
    read_keys: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SyncResult:
    hashes: dict[str, dict[str, bytes]]
    keys: dict[str, bytes | None]


class StateBackend(Protocol):
    name: str  # "memory" or "redis"
    prefix: str

    @property
    def mode(self) -> str:  # "memory", or the redis_mode: "standalone", "sentinel", "cluster"
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def sync(self, batch: SyncBatch, ttl_s: float) -> SyncResult: ...
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def delete(self, key: str) -> None: ...
    async def hset(self, key: str, mapping: dict[str, bytes], ttl_s: float | None) -> None: ...
    async def hgetall(self, key: str) -> dict[str, bytes]: ...
    async def hdel(self, key: str, field: str) -> int: ...
    async def rate_limit(self, checks: list[LimitCheck], period_s: float) -> LimitDecision:
        """GCRA over every check at once (see gateway.policy.ratelimit); one round trip, O(1) per check."""
        ...

    def primaries(self) -> list[str]:
        """Addresses of the primaries in use now ("host:port"); empty when unknown or not applicable."""
        ...
