"""The edge's access control: who is calling, may they use this model, are they within their limits.

Limits are shared by every replica through the state backend: rpm and tpm together in one round
trip, GCRA in a Lua script (``gateway.policy.ratelimit``), O(1) per request. When Redis does not answer
within the state timeout the gateway decides locally, says so once, counts the seconds it spends so
(``llmgw_state_local_only_seconds_total``, growing with each local decision, not only once Redis is
back) and goes back to the shared limits by itself. A request so decided carries the flag RLL.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from gateway.config import AuthConfig
from gateway.errors import GatewayError, echoed
from gateway.flags import ResponseFlag
from gateway.policy.ratelimit import LimitCheck
from gateway.security.keys import (
    ApiKey,
    RedisKeyStore,
    bearer_token,
    conflicting_keys,
    constant_time_equal,
    hash_key,
    other_scheme,
)
from gateway.state.base import StateRefused
from gateway.state.memory import MemoryState
from gateway.telemetry import timing

log = logging.getLogger("llmgw.auth")

NEGATIVE_TTL_S = 1.0  # an unknown key is asked about again after this long (a key created just now)
REDIS_RETRY_S = 1.0  # after a failed call, Redis is left alone this long: no request waits on a dead socket
REFUSED_LOG_S = 60.0  # a Redis that refuses the limits script (full) is said at most this often


_LOCAL_REFUSAL = f"{ResponseFlag.RATE_LIMITED},{ResponseFlag.LOCAL_LIMITS}"


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401, message, "invalid_request_error", "invalid_api_key", flag=ResponseFlag.UNAUTHORIZED
    )


def _ambiguous_credentials(headers: dict[str, str]) -> GatewayError:
    """Two credentials (see ``conflicting_keys``): two keys, or a key beside one the gateway does not take."""
    scheme = other_scheme(headers)
    if scheme is None:
        message = (
            "The request carries one gateway key in 'Authorization' and another in 'api-key': send it in one "
            "of them."
        )
    else:
        message = (
            f"The request carries a gateway key in 'api-key' and a {scheme!r} credential in 'Authorization', "
            "which the gateway does not take (only 'Authorization: Bearer <key>'): send the key alone. A proxy "
            "in front that checks 'Authorization' removes it once checked."
        )
    return GatewayError(
        400,
        message,
        "invalid_request_error",
        "ambiguous_credentials",
        flag=ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
    )


class Guard:
    def __init__(
        self, cfg: AuthConfig, backend: Any, metrics: Any, now: Callable[[], float] = timing.now
    ) -> None:
        """``now``: monotonic seconds (the engine's clock; a test's fake one). Only a reader, not the
        engine's ``Clock``: the guard sleeps on nothing, and security may not import the engine."""
        self.cfg = cfg
        self._now = now
        self.protect_metrics = cfg.protect_metrics
        self.config_keys = {
            k.hash: ApiKey(k.id, k.hash, tuple(k.models), k.rpm, k.tpm, k.max_concurrency, dict(k.metadata))
            for k in cfg.keys
        }
        self.backend = backend
        self.store = RedisKeyStore(backend) if cfg.redis_keys and backend.name == "redis" else None
        self.local = MemoryState(backend.prefix)
        self.metrics = metrics
        self.concurrency: dict[str, int] = {}
        self.cache_ttl_s = cfg.cache_ttl_s  # a revoked Redis key stops working within this long
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}
        self._redis_ok = True
        self._redis_retry_at = 0.0  # monotonic; while in the future, limits are local and lookups cached
        self._local_since = 0.0  # monotonic time Redis stopped answering
        self._local_counted = 0.0  # monotonic time up to which the local seconds are in the counter
        self._limit_keys: dict[str, tuple[str, str]] = {}
        self._refused_logged = -math.inf  # monotonic time a refusal was last logged

    async def authenticate(self, headers: dict[str, str]) -> ApiKey:
        if "api-key" in headers and conflicting_keys(headers):
            self.metrics.child(self.metrics.input_limits, "ambiguous_credentials").inc()
            raise _ambiguous_credentials(headers)
        token = bearer_token(headers)
        if token is None:
            scheme = other_scheme(headers)
            if scheme is not None:  # a credential it does not read: named, not "missing"
                raise _unauthorized(
                    f"'Authorization' carries a {scheme!r} credential; the gateway takes its key only as "
                    "'Authorization: Bearer <gateway key>' (or in 'api-key')."
                )
            raise _unauthorized("Missing API key: send 'Authorization: Bearer <gateway key>'.")
        h = hash_key(token)
        key = self.config_keys.get(h)
        if key is not None and constant_time_equal(key.hash, h):
            return key
        key = await self._lookup(h)
        if key is None or not constant_time_equal(key.hash, h):
            raise _unauthorized("Incorrect API key provided.")
        return key

    async def _lookup(self, h: str) -> ApiKey | None:
        if self.store is None:
            return None
        t = self._now()
        hit = self._cache.get(h)
        if hit is not None and hit[1] > t:
            return hit[0]
        if t < self._redis_retry_at:
            return hit[0] if hit is not None else None  # serve the last known answer while Redis is away
        try:
            key = await self.store.get(h)
        except Exception as exc:
            self._redis_down(exc)
            return hit[0] if hit is not None else None
        self._redis_up()
        self._cache[h] = (key, t + (self.cache_ttl_s if key else NEGATIVE_TTL_S))
        if len(self._cache) > 100_000:
            self._cache.clear()
        return key

    async def admit(self, key: ApiKey, model: str, raw: bytes, body: dict[str, Any]) -> bool:
        """Raise 403/429, or admit; True when the key's rpm/tpm were decided locally (flag RLL)."""
        if not key.allows(model):
            raise GatewayError(
                403,
                f"The API key '{key.id}' may not use model '{echoed(model)}'.",
                "invalid_request_error",
                "model_not_allowed",
                "model",
                flag=ResponseFlag.UNAUTHORIZED,
            )
        self._check_concurrency(key)  # before the limits: a refused request spends no rpm/tpm
        local = False
        if key.rpm is not None or key.tpm is not None:
            # Hold the place while the limits are asked (a Redis round trip): requests of the key arriving
            # meanwhile see it taken and are refused before they spend rpm/tpm themselves.
            self.concurrency[key.id] = self.concurrency.get(key.id, 0) + 1
            try:
                local = await self._rate_limit(key, raw, body)
            finally:
                self.concurrency[key.id] -= 1
        # From here to track() the edge does not yield, so the count cannot be overtaken.
        return local

    def _check_concurrency(self, key: ApiKey) -> None:
        if key.max_concurrency is not None and self.concurrency.get(key.id, 0) >= key.max_concurrency:
            self._limited(key, "concurrency")
            raise GatewayError(
                429,
                f"Too many concurrent requests for key '{key.id}' (limit {key.max_concurrency}).",
                "rate_limit_error",
                "rate_limit_exceeded",
                flag=ResponseFlag.RATE_LIMITED,
                retry_after="1",
            )

    async def _rate_limit(self, key: ApiKey, raw: bytes, body: dict[str, Any]) -> bool:
        """Raise 429 over a limit; True when decided locally (Redis did not answer)."""
        names = self._limit_keys.get(key.id)
        if names is None:
            # One hash tag per API key: both limits sit in one cluster slot, so one script sees both.
            base = f"{self.backend.prefix}rl:{{{key.id}}}:"
            names = self._limit_keys[key.id] = (base + "rpm", base + "tpm")
        checks: list[LimitCheck] = []
        limits: list[tuple[str, int]] = []
        if key.rpm is not None:
            checks.append(LimitCheck(names[0], 1, key.rpm))
            limits.append(("rpm", key.rpm))
        if key.tpm is not None:
            # A request bigger than the whole limit costs the whole limit: admitted only into an idle
            # bucket, and the script never sees numbers beyond its floats' precision.
            checks.append(LimitCheck(names[1], min(estimate_tokens(raw, body), key.tpm), key.tpm))
            limits.append(("tpm", key.tpm))
        t = self._now()
        local = t < self._redis_retry_at
        if local:
            self._count_local(t)
            decision = await self.local.rate_limit(checks, 60.0)
        else:
            try:
                decision = await self.backend.rate_limit(checks, 60.0)
                self._redis_up()
            except Exception as exc:
                # a refusal (Redis full) is no outage: only this request's limits are local
                if isinstance(exc, StateRefused):
                    self._refused(exc, t)
                else:
                    self._redis_down(exc)
                local = True
                decision = await self.local.rate_limit(checks, 60.0)
        if decision.refused >= 0:
            name, limit = limits[decision.refused]
            retry = decision.retry_after_s
            self._limited(key, name)
            wait = max(1, math.ceil(retry))
            raise GatewayError(
                429,
                f"Rate limit reached for key '{key.id}': {limit} {name}. Retry after {wait} s.",
                "rate_limit_error",
                "rate_limit_exceeded",
                flag=_LOCAL_REFUSAL if local else ResponseFlag.RATE_LIMITED,
                retry_after=str(wait),
                headers=ratelimit_headers(name, limit, wait),
            )
        return local

    def track(self, key: ApiKey) -> Callable[[Any], None]:
        self.concurrency[key.id] = self.concurrency.get(key.id, 0) + 1

        def done(_ex: Any) -> None:
            self.concurrency[key.id] -= 1

        return done

    def _limited(self, key: ApiKey, limit: str) -> None:
        self.metrics.child(self.metrics.rate_limited, key.id, limit).inc()

    def _refused(self, exc: StateRefused, t: float) -> None:
        """Redis refused the limits script but is there: key lookups go on; limits are local per request."""
        if t - self._refused_logged >= REFUSED_LOG_S:
            self._refused_logged = t
            log.warning(
                "auth: state backend refused the rate-limit script (%s): limits are local meanwhile", exc
            )

    def _redis_down(self, exc: BaseException) -> None:
        t = self._now()
        self._redis_retry_at = t + REDIS_RETRY_S
        if self._redis_ok:
            log.warning(
                "auth: state backend unreachable (%s); enforcing limits locally until it returns",
                f"{type(exc).__name__}: {exc}",
            )
            self._redis_ok = False
            self._local_since = self._local_counted = t
        else:
            self._count_local(t)

    def _count_local(self, t: float) -> None:
        """The local seconds so far into the counter: a dashboard sees an outage while it lasts."""
        if not self._redis_ok and t > self._local_counted:
            self.metrics.state_local_seconds.inc(t - self._local_counted)
            self._local_counted = t

    def _redis_up(self) -> None:
        if not self._redis_ok:
            # Redis was last seen away at the last failure; requests may have stopped long before it came
            # back (nothing asked it meanwhile): that idle time is no outage
            t = min(self._now(), self._redis_retry_at)
            self._count_local(t)
            local_s = t - self._local_since
            log.warning(
                "auth: state backend reachable again after %.1f s of local limits; shared limits resumed",
                local_s,
            )
            self._redis_ok = True


def estimate_tokens(raw: bytes, body: dict[str, Any]) -> int:
    """Admission estimate for tpm: ~4 bytes per prompt token plus the completion the request allows, once
    per choice (``n``)."""
    out = next(
        (
            c
            for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
            if (c := _count(body.get(k)))
        ),
        256,
    )
    return len(raw) // 4 + out * (_count(body.get("n")) or 1)


def _count(value: object) -> int | None:
    """A positive count as a lenient provider reads it: 20000, 20000.0 and "20000" alike (pydantic's lax
    mode, vLLM's, takes all three), so a float or a string cannot slip a large request past tpm."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and value >= 1 and math.isfinite(value):
        return math.ceil(value)
    return None


_LIMIT_UNITS = {"rpm": b"requests", "tpm": b"tokens"}


def ratelimit_headers(name: str, limit: int, wait_s: int) -> tuple[tuple[bytes, bytes], ...]:
    """OpenAI's rate-limit headers for a refused request: the limit, nothing left, and when it resets."""
    unit = _LIMIT_UNITS[name]
    reset = b"%ds" % wait_s if wait_s < 60 else b"%dm%ds" % divmod(wait_s, 60)
    return (
        (b"x-ratelimit-limit-" + unit, b"%d" % limit),
        (b"x-ratelimit-remaining-" + unit, b"0"),
        (b"x-ratelimit-reset-" + unit, reset),
    )
