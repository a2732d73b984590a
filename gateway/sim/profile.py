"""The simulator's behaviour knobs: one validated, mutable profile per server, overridable per request."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

TTFT_DISTS = ("fixed", "lognormal")
OVERRIDE_PREFIX = "x-sim-"


@dataclass(slots=True)
class SimProfile:
    ttft_ms: float = 300.0  # median time to first token (stream) / base latency (non-stream)
    ttft_dist: str = "lognormal"  # "fixed" | "lognormal"
    ttft_sigma: float = 0.35  # lognormal sigma
    tail_p: float = 0.0  # probability a request gets tail_ms instead
    tail_ms: float = 2000.0
    itl_ms: float = 20.0  # inter-token delay
    tokens: int = 16  # completion tokens per answer
    error_rate: float = 0.0  # share of requests answered with an injected error
    error_status: int = 503  # status of injected errors
    retry_after: str | None = None  # Retry-After value sent with injected errors
    stall_rate: float = 0.0  # share of requests that never answer (the connection is held open)
    reset_rate: float = 0.0  # share of requests whose connection is closed after reset_after_tokens tokens
    reset_after_tokens: int = 2
    cold_schema_ms: float = 0.0  # extra TTFT for the first request with an unseen json_schema
    idle_close_s: float = 0.0  # close keep-alive connections idle this long (0 = never), like an LB
    require_key: str | None = None  # when set, /v1 requests must carry this key (Bearer or api-key)
    embedding_dim: int = 16
    prefix_cache_tokens: int = 0  # prompt-prefix cache (LRU of 16-token blocks) capacity in tokens; 0 = none
    prefill_ms_per_1k: float = 0.0  # extra TTFT per 1,000 prompt tokens not served from the prefix cache

    def update(self, patch: dict[str, Any]) -> None:
        """Apply a partial update; all values are validated before any is applied."""
        if not isinstance(patch, dict):
            raise ValueError("profile patch must be a JSON object of knobs")
        clean = {name: coerce(name, value) for name, value in patch.items()}
        for name, value in clean.items():
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in KINDS}

    def with_overrides(self, headers: dict[str, str]) -> SimProfile:
        """A copy with `x-sim-<knob>` header values applied (knob in kebab case)."""
        patch: dict[str, Any] = {}
        for header, raw in headers.items():
            name = header[len(OVERRIDE_PREFIX) :].replace("-", "_")
            if name not in KINDS:
                raise ValueError(f"{header}: unknown simulator knob")
            try:
                patch[name] = coerce(name, raw)
            except ValueError as exc:
                raise ValueError(f"{header}: {exc}") from None
        clone = copy.copy(self)
        for name, value in patch.items():
            setattr(clone, name, value)
        return clone


class Kind(Enum):
    FLOAT = "number"
    INT = "integer"
    STR = "string"
    OPTIONAL_STR = "string or null"


_TYPE_KINDS = {"float": Kind.FLOAT, "int": Kind.INT, "str": Kind.STR, "str | None": Kind.OPTIONAL_STR}
KINDS: dict[str, Kind] = {f.name: _TYPE_KINDS[str(f.type)] for f in fields(SimProfile)}
RATES = frozenset({"tail_p", "error_rate", "stall_rate", "reset_rate"})
_NULLS = frozenset({"", "none", "null"})


def coerce(name: str, value: Any) -> Any:
    """Validate one knob value (from JSON, a header or the command line); ValueError names the problem."""
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown knob {name!r} (known: {', '.join(KINDS)})")
    if kind is Kind.OPTIONAL_STR:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(int(value)) if float(value).is_integer() else str(value)
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: expected a string or null, got {value!r}")
    if kind is Kind.STR:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        if name == "ttft_dist" and value not in TTFT_DISTS:
            raise ValueError(f"{name}: expected one of {', '.join(TTFT_DISTS)}, got {value!r}")
        return value
    number = _number(name, value, kind)
    if number < 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")
    if name in RATES and number > 1:
        raise ValueError(f"{name}: a probability must be between 0 and 1, got {value!r}")
    if name == "error_status" and not 400 <= number <= 599:
        raise ValueError(f"{name}: must be an HTTP error status (400-599), got {value!r}")
    if name in ("tokens", "embedding_dim") and number < 1:
        raise ValueError(f"{name}: must be >= 1, got {value!r}")
    return number


def _number(name: str, value: Any, kind: Kind) -> float | int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a {kind.value}, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name}: expected a {kind.value}, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a {kind.value}, got {value!r}")
    if kind is Kind.INT:
        if not float(value).is_integer():
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def sample_ttft_ms(profile: SimProfile, rng: random.Random) -> float:
    """One request's time to first token: the tail with probability tail_p, else fixed or lognormal."""
    if happens(profile.tail_p, rng):
        return profile.tail_ms
    if profile.ttft_dist == "lognormal" and profile.ttft_ms > 0 and profile.ttft_sigma > 0:
        return rng.lognormvariate(math.log(profile.ttft_ms), profile.ttft_sigma)
    return profile.ttft_ms


def happens(rate: float, rng: random.Random) -> bool:
    """A Bernoulli draw that spends no randomness on the common 0 and 1 cases."""
    return rate > 0 and (rate >= 1 or rng.random() < rate)
