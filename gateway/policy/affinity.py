"""Prefix-cache affinity: a keyed request goes to its home deployment, by consistent hashing with bounded loads.

A provider caches the prompt prefixes it has prefilled, so the turns of one conversation are fastest where
the previous turn ran. The key (see ``affinity_key``) is placed on a hash ring of the model's deployments
(``VNODES`` points each, so keys spread evenly and a deployment leaving moves only its own keys, each to
the next deployment on the ring). The walk from the key's point gives the order of preference:

- the first deployment is the key's *home*;
- a deployment that is gone (ejected, cooling down after a 429, at max_concurrency) or already tried by
  this request is skipped: its keys *rehome* to their next deployment on the ring, the same one for every
  replica, and come back when it returns;
- a deployment at its load bound is passed over too (Mirrokni, Thorup, Zadimoghaddam, "Consistent hashing
  with bounded loads", 2016): no deployment takes more than ceil((1 + epsilon) x the mean in-flight load),
  so a hot key or an unlucky hash *spills* to the next deployment on the ring instead of piling up;
- so is one much slower than the fastest usable deployment (the fastest of its last few first-token
  times above ``slow_factor`` x the other's): its cache is not worth the wait. The fastest, not the
  median: cache misses are slow too, and a wave of them is no reason to move a conversation.

Spilling along the ring rather than to the latency choice keeps a spilled conversation's turns together
on one deployment (the next on its ring), whose cache then serves them; when nothing on the ring will
do, the usual latency/locality choice decides.

Pure: the engine passes each deployment's facts and gets a decision back; no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple

from gateway.policy.routing import RouteDecision, RouteReason

# Points per deployment on the ring: the spread of keys over 3-10 deployments stays within a few percent of
# even, and a ring of 10 deployments is 1,600 points (built once at start-up).
VNODES = 160


class AffinityMode(StrEnum):
    OFF = "off"
    PREFIX = "prefix"  # key from the leading content (an explicit key, when given, wins)
    KEY = "key"  # only an explicit key: prompt_cache_key or the x-llmgw-affinity header


def hash64(data: bytes) -> int:
    """A 64-bit hash that every replica computes alike (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Deployment ids on a ring of virtual nodes; ``order(key)`` is the clockwise walk from the key's point.

    The walk for every point is computed once, so a lookup is one bisect.
    """

    __slots__ = ("ids", "_points", "_walks")

    def __init__(self, ids: Sequence[str], vnodes: int = VNODES) -> None:
        self.ids = tuple(dict.fromkeys(ids))
        placed = sorted((hash64(f"{d}#{i}".encode()), d) for d in self.ids for i in range(vnodes))
        self._points = [p for p, _ in placed]
        owners = [d for _, d in placed]
        n, size = len(self.ids), len(owners)
        interned: dict[tuple[str, ...], tuple[str, ...]] = {}
        walks: list[tuple[str, ...]] = []
        for i in range(size):
            seen: dict[str, None] = {}
            j = i
            while len(seen) < n:
                seen.setdefault(owners[j % size])
                j += 1
            walk = tuple(seen)
            walks.append(interned.setdefault(walk, walk))
        self._walks = walks

    def order(self, key: int) -> tuple[str, ...]:
        """Every deployment once, home first, then the ones its keys move to if it is gone."""
        if not self._walks:
            return ()
        i = bisect_left(self._points, key)
        return self._walks[i if i < len(self._walks) else 0]


class AffinityView(NamedTuple):  # one deployment's facts, as the engine sees them now
    usable: bool  # not ejected, not cooling down after a 429, not at max_concurrency
    inflight: int
    recent_ms: float | None  # fastest of its last few first-token (or whole-response) times; None: too few


def load_bound(inflight_total: int, deployments: int, epsilon: float) -> int:
    """The most requests one deployment may hold: ceil((1 + epsilon) x mean), the new request counted."""
    return math.ceil((1.0 + epsilon) * (inflight_total + 1) / deployments)


def place(
    order: Sequence[str],
    views: Mapping[str, AffinityView],
    *,
    exclude: frozenset[str] | set[str],
    epsilon: float,
    slow_factor: float,
) -> RouteDecision | None:
    """Where a keyed request goes; None when nothing on its ring will do (the usual choice decides then).

    ``order``: the ring walk for the key, home first. ``exclude``: deployments this request already tried
    or is running on (a hedge or a retry takes the next deployment on the ring).
    """
    usable = [d for d in order if views[d].usable]
    fastest = math.inf
    for d in usable:
        ms = views[d].recent_ms
        if ms is not None and ms < fastest:
            fastest = ms
    too_slow = slow_factor * fastest if slow_factor > 0.0 and fastest < math.inf else math.inf
    # The load bound is over the deployments that may take keyed requests: a slow one holds few, and
    # counting it would pull the mean down and push the others over.
    eligible = [d for d in usable if (ms := views[d].recent_ms) is None or ms <= too_slow]
    if not eligible:
        return None
    total = 0
    for d in eligible:
        total += views[d].inflight
    bound = load_bound(total, len(eligible), epsilon)
    passed_on = eligible[0] != usable[0]  # the first usable one is slow: its keys go on
    for d in eligible:
        if d in exclude:
            continue
        if views[d].inflight + 1 > bound:
            passed_on = True  # full: its keys go on along the ring, as a gone one's do
            continue
        if d == order[0]:
            return RouteDecision(d, RouteReason.AFFINITY_HOME)
        return RouteDecision(d, RouteReason.AFFINITY_SPILL if passed_on else RouteReason.AFFINITY_REHOME)
    return None
