"""What the simulated provider saw: counters plus the last requests, served at GET /sim/stats."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

RECENT_MAX = 500


class Endpoint(Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MODELS = "models"


class Outcome(Enum):
    OK = "ok"
    CANCELLED = "cancelled"
    ERROR = "error"
    STALLED = "stalled"
    RESET = "reset"
    UNAUTHORIZED = "unauthorized"


@dataclass(slots=True)
class SimStats:
    served: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    streams: int = 0
    cancelled_before_first_byte: int = 0
    cancelled_mid_stream: int = 0
    stalled: int = 0
    resets: int = 0
    errors_injected: Counter[str] = field(default_factory=Counter)
    unauthorized: int = 0
    bad_requests: int = 0
    tokens_out: int = 0
    max_in_flight: int = 0
    connections_opened: int = 0
    idle_closed: int = 0
    cold_schema_hits: int = 0
    prompt_tokens_cached: int = 0  # prefix cache (prefix_cache_tokens): prompt tokens it served
    prompt_tokens_uncached: int = 0  # and the ones prefilled (prefill_ms_per_1k each 1,000)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_MAX))

    def snapshot(
        self,
        *,
        name: str,
        region: str,
        in_flight: int,
        connections_open: int,
        schemas_seen: int,
        profile: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "name": name,
            "region": region,
            "served": {e.value: self.served[e.value] for e in Endpoint},
            "requests": self.requests,
            "streams": self.streams,
            "cancelled": {
                "before_first_byte": self.cancelled_before_first_byte,
                "mid_stream": self.cancelled_mid_stream,
            },
            "stalled": self.stalled,
            "resets": self.resets,
            "errors_injected": dict(self.errors_injected),
            "unauthorized": self.unauthorized,
            "bad_requests": self.bad_requests,
            "tokens_out": self.tokens_out,
            "in_flight": in_flight,
            "max_in_flight": self.max_in_flight,
            "connections_opened": self.connections_opened,
            "connections_open": connections_open,
            "idle_closed": self.idle_closed,
            "cold_schema_hits": self.cold_schema_hits,
            "prompt_tokens": {"cached": self.prompt_tokens_cached, "uncached": self.prompt_tokens_uncached},
            "schemas_seen": schemas_seen,
            "profile": profile,
            "recent": [dict(r) for r in list(self.recent)],
        }
