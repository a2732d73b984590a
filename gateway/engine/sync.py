"""Background state sharing: publish this process's view, merge the others', every sync interval.

Latency estimates and ejections travel through the state backend in one pipelined round trip per
interval, never on a request's path. When the backend is down, requests keep flowing on local state;
the outage is logged once, shown by ``llmgw_state_backend_up``, and sharing resumes by itself (behind
Sentinel, with the promoted primary: ``llmgw_state_backend_primary`` shows which one is in use and
``llmgw_state_backend_reconnects_total`` counts the moves).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

import orjson

from gateway.engine.registry import DeploymentRuntime
from gateway.state.base import StateBackend, SyncBatch
from gateway.telemetry.timing import now

if TYPE_CHECKING:
    from gateway.engine.engine import Engine  # which owns the sync: a cycle at run time

log = logging.getLogger("llmgw.state")

# Replicas' clocks and rounding move a shared ejection's end by a little each time it is read: an end
# within this of the one known already is the same ejection, not news.
SAME_EJECTION_S = 1.0


class StateSync:
    def __init__(self, engine: Engine, backend: StateBackend, interval_s: float, ttl_s: float) -> None:
        self.engine = engine
        self.backend = backend
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.replica_id = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
        self.up: bool | None = None
        self.rounds = 0
        self._seen: dict[tuple[str, str], float] = {}  # (deployment, replica) -> last merged wall ts
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()
        self._primaries: list[str] = []
        self._unpublished: set[str] = set()  # ejections whose publishing failed: sent again once it answers
        # the longest a model ejects for: an ejection read from another replica (whose wall clock may be off
        # by an hour) lasts no longer here
        self._max_ejection_s = {
            d.id: m.cfg.outlier.max_ejection_s for m in engine.registry.models.values() for d in m.deployments
        }

    def key(self, kind: str, dep_id: str) -> str:
        return f"{self.backend.prefix}{kind}:{dep_id}"

    async def start(self) -> None:
        try:
            await self.backend.start()
            self._mark(True)
        except Exception as exc:  # start anyway: local state serves until the backend answers
            self._mark(False, exc)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for t in list(self._pending):
            t.cancel()
        try:
            await self.backend.close()
        except Exception:
            pass

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.round()

    async def round(self) -> None:
        deps = self.engine.registry.deployments
        wall, mono = time.time(), now()
        batch = SyncBatch()
        for d in deps:
            k = self.key("stats", d.id)
            batch.hset[k] = {
                self.replica_id: orjson.dumps(
                    [
                        round(d.ttft.value(mono), 3),
                        d.ttft.samples,
                        round(d.latency.value(mono), 3),
                        d.latency.samples,
                        wall,
                    ]
                )
            }
            batch.read_hashes.append(k)
            batch.read_keys.append(self.key("eject", d.id))
        try:
            res = await asyncio.wait_for(
                self.backend.sync(batch, self.ttl_s), timeout=max(self.interval_s, 0.5)
            )
        except Exception as exc:
            self._mark(False, exc)
            return
        moved = self._show_primaries()
        if moved or self.up is False:
            self.engine.metrics.state_reconnects.inc()
        self._mark(True)
        self.rounds += 1
        for d in deps:
            if d.id in self._unpublished:
                self._unpublished.discard(d.id)
                self.publish_ejection(d)  # (nothing, if it has ended meanwhile)
            self._merge_stats(d, res.hashes.get(self.key("stats", d.id), {}), wall, mono)
            self._merge_ejection(d, res.keys.get(self.key("eject", d.id)), wall, mono)

    def _merge_stats(self, d: DeploymentRuntime, fields: dict[str, bytes], wall: float, mono: float) -> None:
        for replica, raw in fields.items():
            if replica == self.replica_id:
                continue
            try:
                ttft, ttft_n, lat, lat_n, ts = orjson.loads(raw)
            except (orjson.JSONDecodeError, ValueError, TypeError):
                continue
            if wall - ts > self.ttl_s or self._seen.get((d.id, replica)) == ts:
                continue
            self._seen[(d.id, replica)] = ts
            if ttft_n:
                d.ttft.merge_remote(ttft, ttft_n, mono)
            if lat_n:
                d.latency.merge_remote(lat, lat_n, mono)

    def _merge_ejection(self, d: DeploymentRuntime, raw: bytes | None, wall: float, mono: float) -> None:
        if not raw:
            return
        try:
            until_wall, ejections = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return
        left = min(until_wall - wall, self._max_ejection_s.get(d.id, 0.0))
        if left <= 0:
            return
        until = mono + left
        ejected_here = d.outlier.ejected_until > mono
        if until <= d.outlier.ejected_until + (SAME_EJECTION_S if ejected_here else 0.0):
            return  # known already (this process's own ejection, read back, included)
        d.outlier.ejected_until = until
        d.outlier.ejections = max(d.outlier.ejections, int(ejections))
        if not ejected_here:
            log.warning("deployment %s ejected by another replica for %.0f s", d.id, left)

    def publish_ejection(self, d: DeploymentRuntime) -> None:
        """Share an ejection at once (in the background) so every replica stops sending there."""
        left = d.outlier.ejected_until - now()
        if left <= 0:
            return
        value = orjson.dumps([time.time() + left, d.outlier.ejections])
        t = asyncio.get_running_loop().create_task(self._publish(d.id, value, left))
        self._pending.add(t)
        t.add_done_callback(self._pending.discard)

    async def _publish(self, dep_id: str, value: bytes, ttl_s: float) -> None:
        try:
            await self.backend.set(self.key("eject", dep_id), value, ttl_s)
        except Exception as exc:  # shared once the backend answers again (round)
            self._unpublished.add(dep_id)
            self._mark(False, exc)

    def _show_primaries(self) -> bool:
        """Publish the primaries in use; True when they changed from known ones (a failover followed)."""
        current = self.backend.primaries()
        before = self._primaries
        if current == before:
            return False
        m = self.engine.metrics
        for addr in before:
            if addr not in current:
                m.child(m.state_primary, self.backend.mode, addr).set(0)
        for addr in current:
            m.child(m.state_primary, self.backend.mode, addr).set(1)
        self._primaries = current
        if before:
            log.warning(
                "state backend %s now uses primary %s (was %s)",
                self.backend.mode,
                ", ".join(current),
                ", ".join(before),
            )
        return bool(before)

    def _mark(self, up: bool, exc: BaseException | None = None) -> None:
        if up and self.up is not True:
            if self.up is False:
                log.warning("state backend %s is reachable again: sharing resumed", self.backend.name)
        elif not up and self.up is not False:
            log.warning(
                "state backend %s unreachable (%s): serving on local state until it returns",
                self.backend.name,
                f"{type(exc).__name__}: {exc}" if exc else "?",
            )
        self.up = up  # llmgw_state_backend_up reads it (engine.gauges)
