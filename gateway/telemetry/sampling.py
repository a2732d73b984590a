"""Trace sampling by the SDK's standard rules (``OTEL_TRACES_SAMPLER``), decided on the ids alone.

No OpenTelemetry objects: the decision is taken for every request when export is on, so it has to
cost next to nothing; a request not sampled then costs nothing else (otel.py).
"""

from __future__ import annotations

import logging
import os

from gateway.telemetry.tracing import TraceContext

_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)

log = logging.getLogger("llmgw.tracing")


class Sampler:
    """The SDK's standard samplers, decided on the trace id and the caller's flags alone (no SDK objects).

    ``traceidratio`` keeps a trace when the low 64 bits of its id fall under ``ratio * 2**64``, as the
    SDK's TraceIdRatioBased does, so every service sampling by ratio keeps the same traces."""

    __slots__ = ("parent_based", "bound")

    def __init__(self, name: str = "parentbased_always_on", arg: str | None = None) -> None:
        name = name.strip().lower()
        if name not in _SAMPLERS:
            log.warning("OTEL_TRACES_SAMPLER=%s is not supported here: using parentbased_always_on", name)
            name = "parentbased_always_on"
        self.parent_based = name.startswith("parentbased_")
        rule = name.removeprefix("parentbased_")
        if rule == "traceidratio":
            try:
                ratio = min(max(float(arg if arg is not None else "1.0"), 0.0), 1.0)
            except ValueError:
                log.warning("OTEL_TRACES_SAMPLER_ARG=%s is not a number: sampling everything", arg)
                ratio = 1.0
            self.bound = round(ratio * (1 << 64))
        else:
            self.bound = 1 << 64 if rule == "always_on" else 0

    @classmethod
    def from_env(cls) -> Sampler:
        return cls(
            os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            os.environ.get("OTEL_TRACES_SAMPLER_ARG"),
        )

    def sampled(self, tc: TraceContext) -> bool:
        if self.parent_based and tc.incoming is not None:
            return tc.sampled  # the caller decided
        return int(tc.trace_id[16:], 16) < self.bound
