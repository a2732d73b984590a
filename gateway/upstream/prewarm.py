"""Warm connections: open ``min_connections`` per deployment before ready, and keep them warm.

Start-up opens the pool with cheap ``GET /models`` requests, which also validates each deployment's
URL and key, so a wrong key is reported at deploy (by deployment id) rather than on a user's request.
Keep-warm exercises every idle connection each ``keepwarm_interval_s`` so load-balancer idle
timeouts never close them; one that was dropped anyway is replaced in the background.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.upstream.base import UpstreamClient

log = logging.getLogger("llmgw.prewarm")


@dataclass(frozen=True, slots=True)
class PrewarmResult:
    deployment: str
    ok: bool
    opened: int
    detail: str
    # Requests should not go there: it cannot be connected to, or it refuses the key (every request would
    # fail the same way). A 5xx to GET /models says nothing of chat: reported, not avoided.
    avoid: bool = False


KEY_REFUSED = (401, 403)


async def prewarm(client: UpstreamClient, timeout_s: float = 5.0) -> PrewarmResult:
    pool = client.deployment.pool
    n = max(pool.min_connections, 1 if pool.validate_on_start else 0)
    if n == 0:
        return PrewarmResult(client.deployment.id, True, 0, "skipped")
    before = client.connections_opened
    results = await client.warm(n, timeout_s)
    errors = [r for r in results if isinstance(r, BaseException)]
    statuses = [r[0] for r in results if not isinstance(r, BaseException)]
    opened = client.connections_opened - before
    dep = client.deployment.id
    if errors:
        return PrewarmResult(
            dep, False, opened, f"unreachable: {type(errors[0]).__name__}: {errors[0]}"[:300], avoid=True
        )
    bad = [s for s in statuses if s in KEY_REFUSED]
    if bad:
        return PrewarmResult(dep, False, opened, f"rejected the API key (HTTP {bad[0]})", avoid=True)
    other = [s for s in statuses if s >= 500]
    if other:
        return PrewarmResult(dep, False, opened, f"answered HTTP {other[0]} to GET /models")
    # 404 on /models is fine: some OpenAI-compatible servers do not serve it; the connection is open.
    return PrewarmResult(dep, True, opened, "ok")


async def keep_warm(client: UpstreamClient, interval_s: float, on_result: object = None) -> None:
    """Forever: every interval, ping every idle connection at once (concurrent requests take distinct
    connections) and open replacements when the pool fell below min_connections."""
    pool = client.deployment.pool
    while True:
        await asyncio.sleep(interval_s)
        counts = client.pool_counts()
        # every idle connection, plus replacements for any the pool lost below min_connections
        n = counts["idle"] + max(0, pool.min_connections - counts["idle"] - counts["active"])
        if n == 0:
            continue
        results = await client.warm(n, min(interval_s, 10.0))
        # a ping the provider refused for the key has failed too: every request there would be refused
        failures = sum(1 for r in results if isinstance(r, BaseException) or r[0] in KEY_REFUSED)
        if callable(on_result):
            on_result(client.deployment.id, len(results) - failures, failures)
        if failures:
            log.warning(
                "keep-warm: %d of %d pings to %s failed", failures, len(results), client.deployment.id
            )
