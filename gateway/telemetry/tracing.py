"""W3C trace context without a tracing SDK.

The gateway continues the client's trace (or starts one) and sends upstream the same trace id with
its own span id, so provider-side and application-side records stitch together. Optional OTLP export
(one span per upstream attempt) lives in ``otel.py`` and is off unless configured.
"""

from __future__ import annotations

import os
import random

_HEX = frozenset("0123456789abcdef")


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and all(c in _HEX for c in s)


# Ids need to be unique, not secret: a PRNG seeded from the OS beats a syscall per id on the hot path.
_rand = random.Random()
os.register_at_fork(after_in_child=_rand.seed)  # forked workers must not repeat each other's ids


def new_span_id() -> str:
    return f"{_rand.getrandbits(64) or 1:016x}"


def new_trace_id() -> str:
    return f"{_rand.getrandbits(128) or 1:032x}"


def new_request_id() -> str:
    return f"{_rand.getrandbits(128):032x}"


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent_span_id, flags) from a valid version-00 traceparent, else None."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().lower().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[0], parts[1], parts[2], parts[3]
    if not (_is_hex(version, 2) and version != "ff" and _is_hex(trace_id, 32) and _is_hex(span_id, 16)
            and _is_hex(flags, 2)):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


class TraceContext:
    """The trace this request belongs to, and the span id the gateway uses for its upstream calls."""

    __slots__ = ("trace_id", "parent_id", "span_id", "flags", "tracestate", "incoming")

    def __init__(self, traceparent: str | None, tracestate: str | None) -> None:
        parsed = parse_traceparent(traceparent)
        if parsed:
            self.trace_id, self.parent_id, self.flags = parsed
            self.incoming = traceparent
        else:
            self.trace_id, self.parent_id, self.flags = new_trace_id(), None, "01"
            self.incoming = None
        self.span_id = new_span_id()
        self.tracestate = tracestate if parsed else None

    @property
    def traceparent(self) -> str:
        """The value sent upstream: same trace, the gateway's span as parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"
