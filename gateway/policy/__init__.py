"""Pure decisions: where to route, when to retry, when to hedge, how long is left.

Nothing here does I/O or imports another gateway layer; time comes in as ``now`` (monotonic seconds)
and randomness as a ``random.Random``, so every rule is testable in microseconds with a fake clock.
"""
