"""Which Redis the state lives in: one server, a Sentinel-managed primary, or a Redis Cluster.

redis-py's own clients do the discovery: ``Sentinel.master_for`` asks the sentinels for the primary on
every new connection (so after a failover the next connection goes to the promoted replica), and
``RedisCluster`` learns the slot map from its seed node and follows MOVED/ASK. Client-side retries are
off for one server and Sentinel: the caller bounds each call by the state timeout and falls back to
local state, which beats waiting on retries to a primary that is gone. A cluster call gets one retry
(``CLUSTER_RETRIES``) after re-reading the slot map: enough to land on a replica promoted since the
last call. redis-py's default (ten in 8.1) re-read a map that still named the dead primary ten times
(each read also fetches COMMAND, ~20 ms of CPU), so every call for its slots waited out the timeout.
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
CLUSTER_RETRIES = 1  # redis-py >= 6: a cluster client's ``retry`` sets how often a failed call is retried


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
            self.client = RedisCluster.from_url(
                target.url, **sockets, retry=Retry(NoBackoff(), CLUSTER_RETRIES)
            )
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

    async def ready(self) -> None:
        """Before a single command: on a cluster, re-read the slot map now if the client dropped it (redis-py
        does on CLUSTERDOWN, and a cluster pipeline on each error it retries). redis-py decides where a
        command goes before re-reading the map, and without one sends a keyed command to a random primary
        (redis-py 8.1): in a failover that primary may still answer CLUSTERDOWN, and redis-py then drops
        the map again and waits 0.25 s, so the call waits out the state timeout."""
        if self.mode == "cluster":
            await self.client.initialize()

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()
