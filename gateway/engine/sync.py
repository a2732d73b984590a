"""Background state sharing: publish this process's view, merge the others', every sync interval.

Latency estimates and ejections travel through the state backend in one pipelined round trip per
interval, never on a request's path. Each estimate goes out with the age of this process's latest own
sample of it, so a replica whose own samples are newer keeps its view (``PeakEwma.merge_remote``).
When the backend is down, requests keep flowing on local state; the outage is logged once, shown by
``llmgw_state_backend_up``, and sharing resumes by itself (behind Sentinel, with the promoted primary:
``llmgw_state_backend_primary`` shows which one is in use and ``llmgw_state_backend_reconnects_total``
counts the moves).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.engine.clock import WallClock, wait_for
from gateway.engine.registry import DeploymentRuntime
from gateway.policy.latency import PeakEwma
from gateway.state.base import StateBackend, SyncBatch

if TYPE_CHECKING:
    from gateway.engine.engine import Engine  # which owns the sync: a cycle at run time

log = logging.getLogger("llmgw.state")

# Replicas' clocks and rounding move a shared ejection's end by a little each time it is read: an end
# within this of the one known already is the same ejection, not news.
SAME_EJECTION_S = 1.0
# A replica's estimates of a deployment are one field of its stats hash, named by the replica:
# [ttft_ms, ttft_samples, latency_ms, latency_samples, wall ts]. The ages of their latest own samples,
# [ttft_age_s, latency_age_s] (null: no sample), are a second field, this suffix on the name: a replica
# of a version before ages unpacks every field into exactly five values and skips this one, unharmed.
AGE_FIELD = "#age"


class StateSync:
    def __init__(
        self,
        engine: Engine,
        backend: StateBackend,
        interval_s: float,
        ttl_s: float,
        wall: WallClock = time.time,
    ) -> None:
        """``wall``: the wall clock, what replicas' times are compared on (their monotonic clocks share no
        origin); the monotonic clock is the engine's, which every estimate and ejection here is timed on."""
        self.engine = engine
        self.clock = engine.clock
        self.wall = wall
        self.backend = backend
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.replica_id = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
        self.up: bool | None = None
        self.rounds = 0
        # deployment -> replica -> wall ts of its view last merged: the replicas of the latest read only
        self._seen: dict[str, dict[str, float]] = {}
        self._gone: dict[
            str, list[str]
        ] = {}  # stats key -> fields of replicas gone, deleted with the next write
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
            await self.clock.sleep(self.interval_s)
            try:
                await self.round()
            except Exception as exc:  # a bug: it must not end sharing for the life of the process
                log.exception("state sync round failed; trying again in %.1f s", self.interval_s)
                self._mark(False, exc)  # llmgw_state_backend_up 0: replicas do not share state now

    async def round(self) -> None:
        deps = self.engine.registry.deployments
        wall, mono = self.wall(), self.clock.now()
        batch = SyncBatch(hdel=self._gone)
        self._gone = {}
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
                ),
                self.replica_id + AGE_FIELD: orjson.dumps([_age(d.ttft, mono), _age(d.latency, mono)]),
            }
            batch.read_hashes.append(k)
            batch.read_keys.append(self.key("eject", d.id))
        try:
            # A hung backend (a paused Redis) must not stall sharing: the round is cut, on the engine's clock.
            res = await wait_for(self.clock, self.backend.sync(batch, self.ttl_s), max(self.interval_s, 0.5))
        except Exception as exc:
            self._mark(False, exc)
            return
        moved = self._show_primaries()
        if moved or self.up is False:
            self.engine.metrics.state_reconnects.inc()
        self._mark(True)
        self.rounds += 1
        # Ages are read against the time the answer arrived, later than any publish it holds: the delay
        # between a publish and this read can only make a remote sample look newer than it is, never older.
        read_at = self.clock.now()
        for d in deps:
            if d.id in self._unpublished:
                self._unpublished.discard(d.id)
                self.publish_ejection(d)  # (nothing, if it has ended meanwhile)
            self._merge_stats(d, res.hashes.get(self.key("stats", d.id), {}), wall, read_at)
            self._merge_ejection(d, res.keys.get(self.key("eject", d.id)), wall, mono)

    def _merge_stats(self, d: DeploymentRuntime, fields: dict[str, bytes], wall: float, mono: float) -> None:
        seen = self._seen.get(d.id, {})
        merged: dict[str, float] = {}
        self._seen[d.id] = merged
        gone: list[str] = []
        for replica, raw in fields.items():
            if replica == self.replica_id or replica.endswith(AGE_FIELD):
                continue
            stats = _stats(raw)
            if stats is None:
                continue
            ttft, ttft_n, lat, lat_n, ts = stats
            if wall - ts > self.ttl_s:
                # A replica that stopped publishing (restarted, scaled in): the hash lives on while others
                # write it, so its fields are deleted, or every restart would add two for good.
                gone += (replica, replica + AGE_FIELD)
                continue
            merged[replica] = ts
            if seen.get(replica) == ts:
                continue
            ttft_age, lat_age = _ages(fields.get(replica + AGE_FIELD))
            if ttft_n:
                self._merge_estimate(d, d.ttft, ttft, ttft_n, ttft_age, mono)
            if lat_n:
                self._merge_estimate(d, d.latency, lat, lat_n, lat_age, mono)
        if gone:
            self._gone[self.key("stats", d.id)] = gone

    def _merge_estimate(
        self, d: DeploymentRuntime, ewma: PeakEwma, value_ms: float, n: int, age_s: float | None, mono: float
    ) -> None:
        """One remote estimate, counted by what became of it (llmgw_state_remote_estimates_total)."""
        if age_s is None:
            ewma.merge_remote(value_ms, n, mono)
            result = "no-age"
        else:
            result = "merged" if ewma.merge_remote(value_ms, n, mono, observed_at=mono - age_s) else "stale"
        m = self.engine.metrics
        m.child(m.remote_estimates, d.id, result).inc()

    def _merge_ejection(self, d: DeploymentRuntime, raw: bytes | None, wall: float, mono: float) -> None:
        ejection = _ejection(raw) if raw else None
        if ejection is None:
            return  # none, or not what a replica writes (which would end the sync loop if it raised)
        until_wall, ejections = ejection
        left = min(until_wall - wall, self._max_ejection_s.get(d.id, 0.0))
        if left <= 0:
            return
        until = mono + left
        ejected_here = d.outlier.ejected_until > mono
        if until <= d.outlier.ejected_until + (SAME_EJECTION_S if ejected_here else 0.0):
            return  # known already (this process's own ejection, read back, included)
        d.outlier.ejected_until = until
        d.outlier.ejections = max(d.outlier.ejections, ejections)
        if not ejected_here:
            log.warning("deployment %s ejected by another replica for %.0f s", d.id, left)

    def publish_ejection(self, d: DeploymentRuntime) -> None:
        """Share an ejection at once (in the background) so every replica stops sending there."""
        left = d.outlier.ejected_until - self.clock.now()
        if left <= 0:
            return
        value = orjson.dumps([self.wall() + left, d.outlier.ejections])
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


def _age(ewma: PeakEwma, mono: float) -> float | None:
    """Seconds since the estimate's latest own sample, rounded down (so never older than it is); None
    without one. An age, not a time: replicas' monotonic clocks share no origin."""
    if not ewma.samples:
        return None
    return math.floor(max(0.0, mono - ewma.observed_at) * 1000.0) / 1000.0


def _stats(raw: bytes) -> tuple[float, int, float, int, float] | None:
    """[ttft_ms, ttft_samples, latency_ms, latency_samples, wall ts]; None when the field is anything else."""
    values = _loads(raw)
    if values is None or len(values) != 5 or not all(_number(v) for v in values):
        return None
    ttft, ttft_n, lat, lat_n, ts = values
    return ttft, int(ttft_n), lat, int(lat_n), ts


def _ejection(raw: bytes) -> tuple[float, int] | None:
    """[end on the publisher's wall clock, ejections]; None when the value is anything else."""
    values = _loads(raw)
    if values is None or len(values) != 2 or not all(_number(v) for v in values):
        return None
    return values[0], int(values[1])


def _ages(raw: bytes | None) -> tuple[float | None, float | None]:
    """[ttft_age_s, latency_age_s]; both None (unknown) without the field, as from an older replica."""
    values = _loads(raw) if raw is not None else None
    if values is None or len(values) != 2 or not all(v is None or _number(v) for v in values):
        return None, None
    return values[0], values[1]


def _loads(raw: bytes) -> list[Any] | None:
    try:
        values = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return values if isinstance(values, list) else None


def _number(v: object) -> bool:
    """A finite, non-negative number (what every published value is)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf
