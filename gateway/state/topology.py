"""Which Redis the state lives in: one server, a Sentinel-managed primary, or a Redis Cluster.

redis-py's own clients do the discovery: ``Sentinel.master_for`` asks the sentinels for the primary on
every new connection (so after a failover the next connection goes to the promoted replica), and
``RedisCluster`` learns the slot map from its seed node and follows MOVED/ASK. Client-side retries are
off for one server and Sentinel: the caller bounds each call by the state timeout and falls back to
local state, which beats waiting on retries to a primary that is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

RedisMode = Literal["standalone", "sentinel", "cluster"]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where to connect: the ``state.*`` keys that say how to reach Redis."""

    mode: RedisMode = "standalone"
    url: str = "redis://127.0.0.1:6379/0"  # standalone: the server; cluster: a seed node; sentinel: credentials, TLS, db
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = ""
    sentinel_password: str | None = None
    timeout_s: float = 0.5


class Topology:
    """A connected client for one mode, and which primaries it talks to now (for the metrics)."""

    def __init__(self, target: RedisTarget) -> None:
        self.mode = target.mode
        t = target.timeout_s
        sockets: dict[str, Any] = {"socket_timeout": t, "socket_connect_timeout": t}
        self._sentinel: Sentinel | None = None
        self.client: Any
        if target.mode == "cluster":
            self.client = RedisCluster.from_url(target.url, **sockets)
        elif target.mode == "sentinel":
            kw: dict[str, Any] = dict(parse_url(target.url))
            for k in (
                "host",
                "port",
                "path",
                "connection_class",
                "socket_timeout",
                "socket_connect_timeout",
                "health_check_interval",
            ):  # where to connect comes from the sentinels, how long from timeout_ms
                kw.pop(k, None)
            tls = target.url.startswith("rediss:")
            tls_options = {
                k: v for k, v in kw.items() if k.startswith("ssl_")
            }  # the sentinels' TLS as the primary's
            self._sentinel = Sentinel(
                list(target.sentinels),
                sentinel_kwargs={
                    **sockets,
                    **tls_options,
                    "password": target.sentinel_password,
                    "ssl": tls,
                    "retry": Retry(NoBackoff(), 0),
                },
            )
            self.client = self._sentinel.master_for(
                target.sentinel_master,
                ssl=tls,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
                **sockets,
                **kw,
            )
        else:
            self.client = aioredis.from_url(
                target.url, **sockets, health_check_interval=0, retry=Retry(NoBackoff(), 0)
            )

    def primaries(self) -> list[str]:
        if self.mode == "cluster":
            return sorted(f"{n.host}:{n.port}" for n in self.client.get_primaries())
        pool = self.client.connection_pool
        if self.mode == "sentinel":
            addr = pool.master_address
            return [f"{addr[0]}:{addr[1]}"] if addr else []
        kw = pool.connection_kwargs
        return [kw["path"] if "path" in kw else f"{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}"]

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()
