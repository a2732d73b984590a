"""Latency estimates that routing and hedging read: a peak-sensitive EWMA and a sliding quantile window."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

# A remote replica's view may move ours at most this far per merge: local samples stay authoritative,
# yet repeated merges (one per sync round) converge replicas on one view within a few rounds.
MAX_REMOTE_WEIGHT = 0.5


def staler(remote_observed_at: float | None, local_observed_at: float | None) -> bool:
    """Whether a remote view is based on older samples than the local one, so must not move it.

    All or nothing, not a weight that shrinks with the gap: ours measured the deployment after theirs
    did, and a probe's answer that replaced a slow estimate would otherwise be pulled part way back to
    the slow one (exp(-gap/decay_s) lets a view 5 s older, decay 10 s, still move ours 60 % as far).
    None on either side (a replica that publishes no age; no local sample): not staler, merged as ever.
    """
    if remote_observed_at is None or local_observed_at is None:
        return False
    return remote_observed_at < local_observed_at


class PeakEwma:
    """Peak-sensitive EWMA of a latency in ms (Finagle's / linkerd's PeakEWMA).

    A sample above the current estimate replaces it at once (slowness is believed immediately); a sample
    below it blends in with the time-based weight exp(-dt/decay_s) (recovery is believed gradually).
    Between samples the estimate decays toward ``prior_ms`` with the same weight, so a deployment that
    was slow, lost its traffic and then recovered is tried again (sooner by a routing probe, see
    ``observe``). No data at all reads as 0: a new
    deployment looks cheapest and gets tried. Routing cost is ``value(now) * (inflight + 1)``.

    ``baseline_ms`` is a plain, slow EWMA of the same samples (time constant ``baseline_decay_s``,
    default 10 x ``decay_s``): the deployment's usual level, against which routing notices that it has
    just become much slower than it normally is.
    """

    __slots__ = (
        "decay_s",
        "prior_ms",
        "baseline_decay_s",
        "_ewma",
        "_base",
        "_has_base",
        "samples",
        "last_at",
        "_base_at",
        "observed_at",
        "merges",
    )

    def __init__(
        self, decay_s: float = 10.0, prior_ms: float = 0.0, baseline_decay_s: float | None = None
    ) -> None:
        self.decay_s = decay_s
        self.prior_ms = prior_ms
        self.baseline_decay_s = baseline_decay_s if baseline_decay_s is not None else 10.0 * decay_s
        self._ewma = 0.0
        self._base = 0.0
        self._has_base = False
        self.samples = 0  # local observations only (what this replica publishes as its weight)
        self.last_at = 0.0  # monotonic time of the last observation or merge
        self._base_at = 0.0  # monotonic time the baseline last moved
        self.observed_at = 0.0  # monotonic time of the last local observation (published as its age)
        self.merges = 0  # remote views blended in

    @property
    def baseline_ms(self) -> float | None:
        """The usual latency (no peaks, no decay with age); None before any local sample or merged baseline."""
        return self._base if self._has_base else None

    @property
    def has_data(self) -> bool:
        """Whether any estimate exists, local or merged from another replica."""
        return self.samples > 0 or self.merges > 0

    def _weight(self, now: float) -> float:
        dt = now - self.last_at
        return math.exp(-dt / self.decay_s) if dt > 0.0 else 1.0

    def value(self, now: float) -> float:
        """The current estimate in ms: the last one, decayed toward the prior with age."""
        if self.samples == 0 and self.merges == 0:
            return 0.0
        w = self._weight(now)
        return self.prior_ms + (self._ewma - self.prior_ms) * w

    def observe(self, value_ms: float, now: float, remeasure: bool = False) -> None:
        """One sample. ``remeasure``: a routing probe's, which replaces a higher estimate outright; the
        estimate went unconfirmed while routing avoided the deployment, the probe is what it does now
        (wrong the other way, the next slow sample is believed at once, as any peak)."""
        if not value_ms >= 0.0 or value_ms == math.inf:  # also rejects NaN
            return
        if self.samples == 0 and self.merges == 0:
            self._ewma = value_ms
        else:
            w = self._weight(now)
            current = self.prior_ms + (self._ewma - self.prior_ms) * w
            # The decayed share of the old estimate is replaced by this sample rather than by the prior.
            if value_ms > current or remeasure:
                self._ewma = value_ms
            else:
                self._ewma = self._ewma * w + value_ms * (1.0 - w)
        if not self._has_base:
            self._base = value_ms
            self._has_base = True
        else:
            dt = now - self._base_at
            wb = math.exp(-dt / self.baseline_decay_s) if dt > 0.0 else 1.0
            self._base = self._base * wb + value_ms * (1.0 - wb)
        if now > self._base_at:
            self._base_at = now
        if now > self.observed_at:
            self.observed_at = now
        self.samples += 1
        if now > self.last_at:
            self.last_at = now

    def merge_remote(
        self,
        value_ms: float,
        samples: int,
        now: float,
        baseline_ms: float | None = None,
        observed_at: float | None = None,
    ) -> bool:
        """Blend in another replica's estimate (and baseline, if sent), weighted by its sample count, at most
        MAX_REMOTE_WEIGHT, unless it is ``staler`` than ours; with nothing local yet, adopt it.

        ``observed_at``: when the remote replica's latest own sample was taken, on this process's clock
        (None: unknown). False when nothing was blended in: nonsense, or older than our own latest sample."""
        if samples <= 0 or not value_ms >= 0.0 or value_ms == math.inf:
            return False
        if staler(observed_at, self.observed_at if self.samples else None):
            return False
        first = self.samples == 0 and self.merges == 0
        share = 1.0 if first else min(MAX_REMOTE_WEIGHT, samples / (samples + self.samples))
        if first:
            self._ewma = value_ms  # nothing local to weigh against: adopt the remote view
        else:
            current = self.value(now)
            self._ewma = current + (value_ms - current) * share
        if baseline_ms is not None and baseline_ms >= 0.0 and baseline_ms != math.inf:
            if self._has_base:
                self._base += (baseline_ms - self._base) * (share if share < 1.0 else MAX_REMOTE_WEIGHT)
            else:
                self._base = baseline_ms
                self._has_base = True
            if now > self._base_at:
                self._base_at = now
        self.merges += 1
        # The new estimate is "as of now"; restarting the decay from it keeps the same trajectory.
        if now > self.last_at:
            self.last_at = now
        return True


class QuantileWindow:
    """Recent samples (the last ``size``, none older than ``max_age_s``) and their quantiles, for hedge delays.

    Kept as an arrival-ordered ring plus a sorted copy, so ``add`` is a bisect-insert and ``quantile`` an
    index: no sort per request.
    """

    __slots__ = ("size", "max_age_s", "min_samples", "_times", "_values", "_sorted")

    def __init__(self, size: int = 256, max_age_s: float = 60.0, min_samples: int = 10) -> None:
        self.size = size
        self.max_age_s = max_age_s
        self.min_samples = min_samples
        self._times: deque[float] = deque()
        self._values: deque[float] = deque()
        self._sorted: list[float] = []

    def _drop_oldest(self) -> None:
        self._times.popleft()
        old = self._values.popleft()
        del self._sorted[bisect_left(self._sorted, old)]

    def _expire(self, now: float) -> None:
        horizon = now - self.max_age_s
        times = self._times
        while times and times[0] < horizon:
            self._drop_oldest()

    def add(self, value_ms: float, now: float) -> None:
        if not value_ms >= 0.0 or value_ms == math.inf:
            return
        self._expire(now)
        if len(self._values) >= self.size:
            self._drop_oldest()
        self._times.append(now)
        self._values.append(value_ms)
        insort(self._sorted, value_ms)

    def quantile(self, q: float, now: float) -> float | None:
        """The q-quantile (nearest rank) of the samples still in the window; None with too few."""
        self._expire(now)
        n = len(self._sorted)
        if n < self.min_samples or n == 0:
            return None
        rank = math.ceil(q * n) - 1
        if rank < 0:
            rank = 0
        elif rank >= n:
            rank = n - 1
        return self._sorted[rank]

    def recent_min(self, n: int, now: float) -> float | None:
        """The fastest of the last ``n`` samples still in the window; None with fewer than ``n``.

        What a deployment can do now at best (affinity's slowness test): prompt-cache misses, however
        many, leave it alone as long as one of the last ``n`` hit; a deployment that turned slow moves it.
        """
        self._expire(now)
        values = self._values
        k = len(values)
        if k < n or n <= 0:
            return None
        return min(values[i] for i in range(k - n, k))

    def __len__(self) -> int:
        """Samples held (ones past ``max_age_s`` leave at the next ``add`` or ``quantile``)."""
        return len(self._sorted)
