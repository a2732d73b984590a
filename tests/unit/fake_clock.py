"""A monotonic clock the test moves by hand; policies take ``now`` as a float, so this is all they need."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    t: float = 1000.0  # not 0, so "never happened" (0.0) and "now" differ

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t
