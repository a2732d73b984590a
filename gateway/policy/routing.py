"""Which deployment serves the next attempt: locality tiers, then a strategy within the chosen tier."""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple

# Envoy's overprovisioning factor: a tier keeps all its traffic until fewer than 1/1.4 (~71%) of its
# deployments are healthy, then sheds the missing share to the next tier.
OVERPROVISIONING = 1.4
# With no data on any remote deployment, local must be this many times slower than its usual level
# (plus the penalty) before one request goes to find out: a single slow outlier is not enough.
EXPLORE_FACTOR = 2.0


class RouteReason(StrEnum):
    """Why this deployment (logged as ``route_reason``)."""

    LOCAL = "local"
    SPILLOVER = "spillover"  # local is partly unhealthy or clearly slower: some traffic goes remote
    FAILOVER = "failover"  # no local deployment is usable: remote takes it all
    PINNED = "pinned"  # x-gateway-deployment
    ONLY_CHOICE = "only-choice"
    PANIC = "panic"  # nothing is healthy: route anyway rather than fail
    REMOTE = "remote"  # locality off (or no local deployment exists) and the pick is in another region
    AFFINITY_HOME = "affinity-home"  # routing.affinity: the key's home deployment (policy/affinity.py)
    AFFINITY_REHOME = "affinity-rehome"  # home is gone: the next deployment on the key's ring
    AFFINITY_SPILL = "affinity-spill"  # home is at its load bound or slow: another deployment takes it
    # latency: left unpicked for routing.probe_interval_s while others were picked: measure it
    PROBE = "probe"


class Strategy(StrEnum):
    LATENCY = "latency"
    WEIGHTED = "weighted"
    ROUND_ROBIN = "round-robin"
    PRIORITY = "priority"


class Locality(StrEnum):
    PREFER = "prefer"
    STRICT = "strict"
    OFF = "off"


class Candidate(NamedTuple):  # immutable, and ~5x cheaper to build than a frozen dataclass
    id: str
    region: str
    weight: float
    priority: int  # lower is preferred (strategy "priority")
    healthy: bool
    cost_ms: float  # PeakEwma value * (inflight + 1); 0 = no data yet (optimistic)
    # The load-free latency estimate, if the caller has it: "clearly slower than remote" compares
    # latencies, so a busy local deployment is not mistaken for a slow one. None -> cost_ms is used.
    latency_ms: float | None = None
    # The deployment's usual latency (PeakEwma.baseline_ms), compared with latency_ms (so give both).
    # Lets "prefer" notice that local just got much slower while no remote deployment has data yet,
    # and send one request there to find out. None: off.
    baseline_ms: float | None = None
    # When routing last picked it (now while an attempt to it is in flight), for probing. None: never probed.
    picked_at: float | None = None


class RouteDecision(NamedTuple):  # immutable, and ~5x cheaper to build than a frozen dataclass
    deployment_id: str
    reason: RouteReason


def choose(
    candidates: Sequence[Candidate],
    *,
    strategy: Strategy,
    locality: Locality,
    home_region: str | None,
    preferred_region: str | None = None,
    pinned: str | None = None,
    exclude: frozenset[str] = frozenset(),
    cross_region_penalty_ms: float = 50.0,
    rng: random.Random,
    rr_counter: int = 0,
    now: float = 0.0,
    probe_interval_s: float = 0.0,
) -> RouteDecision | None:
    """Pick a deployment for one attempt; None only when locality is strict and the region has none.

    ``exclude``: deployments this request already tried or is using (retries and hedges go elsewhere);
    when it would leave nothing, excluded ones are allowed again. ``preferred_region``
    (x-gateway-region) overrides ``home_region``; with no region at all, every deployment is local.
    ``probe_interval_s`` (strategy latency; 0: off): see ``_route``.
    """
    if not candidates:
        return None
    if pinned is not None:
        for c in candidates:
            if c.id == pinned:
                return RouteDecision(c.id, RouteReason.PINNED)
    region = preferred_region or home_region
    if locality is Locality.STRICT and region is not None:
        scope: Sequence[Candidate] = [c for c in candidates if c.region == region]
        if not scope:
            return None
    else:
        scope = candidates
    probe_before = now - probe_interval_s if probe_interval_s > 0.0 and strategy is Strategy.LATENCY else None
    avail = _without(scope, exclude)
    healthy = _healthy(avail)
    if not healthy:
        return RouteDecision(_pick(avail, strategy, rng, rr_counter).id, RouteReason.PANIC)
    if len(healthy) == 1:
        only = healthy[0]
        reason = RouteReason.ONLY_CHOICE
        if (
            locality is Locality.PREFER
            and region is not None
            and only.region != region
            and _has_region(candidates, region)
        ):
            reason = RouteReason.FAILOVER
        return RouteDecision(only.id, reason)
    if region is None or locality is Locality.STRICT:
        return _route(healthy, RouteReason.LOCAL, strategy, rng, rr_counter, probe_before)
    if locality is Locality.OFF:
        return _route(healthy, None, strategy, rng, rr_counter, probe_before, region)
    return _prefer(
        candidates, avail, healthy, region, strategy, rng, rr_counter, cross_region_penalty_ms, probe_before
    )


def _prefer(
    candidates: Sequence[Candidate],
    avail: Sequence[Candidate],
    healthy: Sequence[Candidate],
    region: str,
    strategy: Strategy,
    rng: random.Random,
    rr_counter: int,
    penalty_ms: float,
    probe_before: float | None = None,
) -> RouteDecision:
    """Locality "prefer": local tier first, spilling to remote as local health drops or local is clearly slower.

    "Clearly slower": the best local latency exceeds the best remote one plus the penalty. Local is read
    as is (it decays when unused, so a recovered local region is tried again); a remote is read as no
    better than its usual level (baseline), because an estimate that decayed while the remote sat unused
    is stale, not fast. With no remote data at all, local more than EXPLORE_FACTOR x its own baseline
    (plus the penalty) sends one request to a remote to find out.

    A local deployment that exists but is unusable (unhealthy, or already tried by this request) makes a
    remote pick a FAILOVER; with no local deployment at all it is just REMOTE.
    """
    local: list[Candidate] = []
    remote: list[Candidate] = []
    best_local = best_remote = 0.0  # lowest latency with data (0 = none has data)
    best_local_c: Candidate | None = None
    for c in healthy:
        if c.latency_ms is None:
            v = c.cost_ms
        else:
            v = c.latency_ms
            if c.region != region and c.baseline_ms is not None and c.baseline_ms > v:
                v = c.baseline_ms
        if c.region == region:
            local.append(c)
            if v > 0.0 and (best_local == 0.0 or v < best_local):
                best_local, best_local_c = v, c
        else:
            remote.append(c)
            if v > 0.0 and (best_remote == 0.0 or v < best_remote):
                best_remote = v
    if not local:
        reason = RouteReason.FAILOVER if _has_region(candidates, region) else RouteReason.REMOTE
        return _route(remote, reason, strategy, rng, rr_counter, probe_before)
    if not remote:
        return _route(local, RouteReason.LOCAL, strategy, rng, rr_counter, probe_before)
    local_total = len(local) if avail is healthy else sum(1 for c in avail if c.region == region)
    share = OVERPROVISIONING * len(local) / local_total
    # Only draw when spilling is possible, so a fully healthy local tier is deterministic.
    spill = share < 1.0 and rng.random() >= share
    if not spill:
        if best_remote > 0.0:
            spill = best_local > best_remote + penalty_ms
        elif (
            best_local_c is not None
            and best_local_c.baseline_ms is not None
            and best_local_c.latency_ms is not None
        ):
            # A remote without data is no evidence that local is slower, but local having become much
            # slower than it usually is is reason to try one (once: then the remote has data).
            spill = best_local > EXPLORE_FACTOR * best_local_c.baseline_ms + penalty_ms
    if spill:
        return _route(remote, RouteReason.SPILLOVER, strategy, rng, rr_counter, probe_before)
    return _route(local, RouteReason.LOCAL, strategy, rng, rr_counter, probe_before)


def _route(
    tier: Sequence[Candidate],
    reason: RouteReason | None,
    strategy: Strategy,
    rng: random.Random,
    rr_counter: int,
    probe_before: float | None,
    region: str | None = None,
) -> RouteDecision:
    """A pick within the chosen tier: a probe if one is due, else by the strategy (``reason`` None: local
    or remote by ``region``).

    A probe: latency routing alone never measures again a deployment whose estimate one outlier inflated
    above the others'; it waits for the estimate to decay. So the deployment left unpicked longest, once
    not picked since ``probe_before`` while another was, takes one request (its sample replaces a higher
    estimate: PeakEwma.observe's ``remeasure``). A deployment with an attempt in flight reads as picked
    now, so at most one probe per deployment is in flight. With no fresh pick at all (traffic slower
    than one request per interval) nothing is probed: decay already makes unused estimates cheap.
    """
    if probe_before is not None:  # inline, not a helper: this runs on every request
        oldest: Candidate | None = None
        oldest_at = probe_before
        fresh = False
        for c in tier:
            t = c.picked_at
            if t is not None:
                if t > probe_before:
                    fresh = True
                elif t <= oldest_at and c.cost_ms > 0.0:  # no estimate yet: it wins its draws anyway
                    oldest, oldest_at = c, t
        if fresh and oldest is not None:
            return RouteDecision(oldest.id, RouteReason.PROBE)
    c = _pick(tier, strategy, rng, rr_counter)
    if reason is None:
        reason = RouteReason.LOCAL if c.region == region else RouteReason.REMOTE
    return RouteDecision(c.id, reason)


def _has_region(pool: Sequence[Candidate], region: str) -> bool:
    return any(c.region == region for c in pool)


def _without(pool: Sequence[Candidate], exclude: frozenset[str]) -> Sequence[Candidate]:
    if not exclude:
        return pool
    kept = [c for c in pool if c.id not in exclude]
    return kept or pool  # everything already tried: trying one again beats failing


def _healthy(pool: Sequence[Candidate]) -> Sequence[Candidate]:
    for c in pool:
        if not c.healthy:
            return [c for c in pool if c.healthy]
    return pool


def _pick(pool: Sequence[Candidate], strategy: Strategy, rng: random.Random, rr_counter: int) -> Candidate:
    """One candidate of a non-empty pool by the model's strategy."""
    n = len(pool)
    if n == 1:
        return pool[0]
    if strategy is Strategy.LATENCY:
        return _p2c(pool, rng)
    if strategy is Strategy.WEIGHTED:
        return pool[_weighted_index(pool, rng)]
    if strategy is Strategy.ROUND_ROBIN:
        return pool[rr_counter % n]
    top = min(c.priority for c in pool)
    return _p2c([c for c in pool if c.priority == top], rng)


def _p2c(pool: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Power of two choices: draw two distinct candidates by weight, take the cheaper."""
    n = len(pool)
    if n == 1:
        return pool[0]
    i = _weighted_index(pool, rng)
    j = 1 - i if n == 2 else _weighted_index(pool, rng, skip=i)
    a, b = pool[i], pool[j]
    return b if b.cost_ms < a.cost_ms else a  # a tie keeps the first draw, itself random


def _weighted_index(pool: Sequence[Candidate], rng: random.Random, skip: int = -1) -> int:
    """Index drawn with probability proportional to weight (uniform when all weights are 0), never ``skip``."""
    total = 0.0
    for i, c in enumerate(pool):
        if i != skip and c.weight > 0.0:
            total += c.weight
    if total <= 0.0:
        k = rng.randrange(len(pool) - (skip >= 0))
        return k + 1 if 0 <= skip <= k else k
    r = rng.random() * total
    last = -1
    for i, c in enumerate(pool):
        if i == skip or c.weight <= 0.0:
            continue
        last = i
        r -= c.weight
        if r < 0.0:
            return i
    return last  # float rounding left r a hair above 0
