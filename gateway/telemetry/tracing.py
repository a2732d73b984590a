"""W3C trace context without a tracing SDK.

The gateway continues the client's trace (or starts one) and sends upstream the same trace id with
its own span id, so provider-side and application-side records stitch together. Optional OTLP export
(a server span and one span per upstream attempt) lives in ``otel.py`` and is off unless configured.

Every retry and hedge names a span id of its own upstream, so a provider can tell the attempts of one
request apart. With export off the first attempt uses the gateway's span id; with export on each
attempt's id is the id of its exported attempt span (``attempt_ids``), a child of the server span.
"""

from __future__ import annotations

import os
import random
from typing import Final

_HEX: Final = frozenset("0123456789abcdef")


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and all(c in _HEX for c in s)


# Ids need to be unique, not secret: a PRNG seeded from the OS beats a syscall per id on the hot path.
_rand: Final = random.Random()
os.register_at_fork(after_in_child=_rand.seed)  # forked workers must not repeat each other's ids


def new_span_id() -> str:
    return _hex(_rand.getrandbits(64) or 1, 8)


def new_trace_id() -> str:
    return _hex(_rand.getrandbits(128) or 1, 16)


def new_request_id() -> str:
    return _hex(_rand.getrandbits(128), 16)


def _hex(n: int, size: int) -> str:
    """``n`` as ``2 * size`` lowercase hex digits, zero-padded: f"{n:032x}" for 16, without a format call
    (~1.9k instructions, a third of a request's trace context)."""
    return n.to_bytes(size, "big").hex()


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent_span_id, flags) from a valid version-00 traceparent, else None."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().lower().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[0], parts[1], parts[2], parts[3]
    if not (
        _is_hex(version, 2)
        and version != "ff"
        and _is_hex(trace_id, 32)
        and _is_hex(span_id, 16)
        and _is_hex(flags, 2)
    ):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


class TraceContext:
    """The trace this request belongs to, and the span id the gateway uses for its upstream calls."""

    __slots__ = (
        "trace_id",
        "parent_id",
        "span_id",
        "flags",
        "tracestate",
        "incoming",
        "exported",
        "attempt_ids",
    )
    parent_id: str | None  # the caller's span, when the request came with a valid traceparent
    incoming: str | None

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
        self.exported = False  # set by otel.Tracing.sample: this request's spans will be exported
        self.attempt_ids: list[str] | None = None  # span id per attempt index, once a second id was needed

    @property
    def sampled(self) -> bool:
        return self.flags[1] in "13579bdf"  # the low bit of the flags byte

    def attempt_span_id(self, index: int) -> str:
        """The span id attempt ``index`` names upstream: the gateway's own for a lone first attempt when
        nothing is exported, else a fresh one, remembered so its exported span carries the same id."""
        if index == 0 and not self.exported:
            return self.span_id
        ids = self.attempt_ids
        if ids is None:
            ids = self.attempt_ids = []
        while len(ids) <= index:
            ids.append(new_span_id())
        return ids[index]

    def attempt_traceparent(self, index: int) -> str:
        return f"00-{self.trace_id}-{self.attempt_span_id(index)}-{self.flags}"

    @property
    def traceparent(self) -> str:
        """The value sent upstream: same trace, the gateway's span as parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"
