"""The guard's decisions without a server: keys, globs, windows, the Redis fallback, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fake_clock import FakeClock

from gateway.config import AuthConfig
from gateway.errors import GatewayError
from gateway.security import guard as guard_mod
from gateway.security.guard import Guard, estimate_tokens
from gateway.security.keys import ApiKey, RedisKeyStore, bearer_token, conflicting_keys, hash_key, new_key
from gateway.state.base import StateRefused
from gateway.state.memory import MemoryState
from gateway.telemetry.metrics import Metrics

KEY = "sk-gw-unit-0001"


def _guard(backend: Any = None, clock: FakeClock | None = None, **key: Any) -> Guard:
    cfg = AuthConfig(mode="keys", keys=[{"id": "team", "hash": hash_key(KEY), **key}], cache_ttl_s=5.0)
    return Guard(cfg, backend or MemoryState(), Metrics(), clock or FakeClock())


def _admit(g: Guard, model: str = "chat", body: dict[str, Any] | None = None) -> bool:
    """Admit one request (or raise); True when its limits were decided locally."""
    key = asyncio.run(g.authenticate({"authorization": f"Bearer {KEY}"}))
    return asyncio.run(g.admit(key, model, b"{}", body or {}))


def _status(fn: Any) -> int:
    with pytest.raises(GatewayError) as exc:
        fn()
    return exc.value.status


class DeadRedis(MemoryState):
    """A backend whose every call fails, counting the attempts."""

    name = "redis"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def rate_limit(self, *a: Any) -> Any:
        self.calls += 1
        raise ConnectionError("refused")

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        raise ConnectionError("refused")


class SlowWindow(MemoryState):
    """Shared windows that take a round trip, as Redis does: other requests run meanwhile."""

    calls = 0

    async def rate_limit(self, *a: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0)  # the round trip: the other requests run meanwhile
        return await super().rate_limit(*a)


def test_keys_are_random_and_stored_as_hashes():
    k1, k2 = new_key(), new_key()
    assert k1 != k2 and k1.startswith("sk-gw-") and len(k1) >= 6 + 43
    assert hash_key(k1).startswith("sha256:") and len(hash_key(k1)) == 7 + 64 and k1 not in hash_key(k1)


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"authorization": "Bearer abc"}, "abc"),
        ({"authorization": "bearer  abc "}, "abc"),
        ({"authorization": "Basic abc"}, None),
        ({"authorization": "Bearer"}, None),
        ({"api-key": "abc"}, "abc"),
        ({"authorization": " ", "api-key": "abc"}, "abc"),  # a blank Authorization is none
        ({}, None),
    ],
)
def test_bearer_token(headers, token):
    assert bearer_token(headers) == token


@pytest.mark.parametrize(
    ("headers", "conflict"),
    [
        ({"authorization": "Bearer abc", "api-key": "xyz"}, True),
        ({"authorization": "Bearer abc", "api-key": " abc "}, False),  # the same key in both
        ({"authorization": "Bearer abc"}, False),
        ({"api-key": "abc"}, False),
        ({"authorization": "", "api-key": "abc"}, False),
        ({"authorization": "Bearer abc", "api-key": ""}, False),
        ({"authorization": " ", "api-key": "abc"}, False),
        # a credential the gateway does not take beside a key: neither ignored nor a 401 "missing key"
        ({"authorization": "Basic abc", "api-key": "xyz"}, True),
        ({"authorization": "Basic xyz", "api-key": "xyz"}, True),
        ({"authorization": "Bearer", "api-key": "xyz"}, True),
        ({"authorization": "Basic abc"}, False),  # no key at all: 401
    ],
)
def test_conflicting_keys(headers, conflict):
    assert conflicting_keys(headers) is conflict


def test_two_different_keys_are_400_and_counted_whichever_is_valid():
    """Authorization won silently: a proxy in front that checked api-key passed a request the gateway then
    served on another key (or the other way round)."""
    g = _guard()
    for headers in (
        {"authorization": f"Bearer {KEY}", "api-key": "sk-gw-someone-else"},
        {"authorization": "Bearer sk-gw-someone-else", "api-key": KEY},
    ):
        with pytest.raises(GatewayError) as exc:
            asyncio.run(g.authenticate(headers))
        err = exc.value
        assert (err.status, err.code, err.flag) == (400, "ambiguous_credentials", "DPE")
    assert g.metrics.input_limits.labels("ambiguous_credentials").value == 2
    key = asyncio.run(g.authenticate({"authorization": f"Bearer {KEY}", "api-key": KEY}))
    assert key.id == "team"


def test_a_valid_api_key_beside_another_authorization_scheme_is_400_naming_the_scheme():
    """A front proxy's Basic login passed on next to the gateway key was a 401 "Missing API key", which
    hid that the key was there; ignoring the Basic credential would serve a request someone meant to
    authenticate otherwise. Refused as two keys are, saying what to drop; Basic alone stays a 401."""
    g = _guard()
    with pytest.raises(GatewayError) as exc:
        asyncio.run(g.authenticate({"authorization": "Basic dXNlcjpwYXNz", "api-key": KEY}))
    err = exc.value
    assert (err.status, err.type, err.code, err.param, err.flag) == (
        400,
        "invalid_request_error",
        "ambiguous_credentials",
        None,
        "DPE",
    )
    assert "'Basic' credential in 'Authorization'" in err.message and "send the key alone" in err.message
    assert "dXNlcjpwYXNz" not in err.message  # the credential itself is never repeated
    assert g.metrics.input_limits.labels("ambiguous_credentials").value == 1
    with pytest.raises(GatewayError) as exc:
        asyncio.run(g.authenticate({"authorization": "Basic dXNlcjpwYXNz"}))
    assert (exc.value.status, exc.value.code) == (401, "invalid_api_key")
    # alone, it is named too, not called "missing"
    assert "'Basic' credential" in exc.value.message and "dXNlcjpwYXNz" not in exc.value.message
    for headers in ({}, {"authorization": "Bearer "}, {"authorization": "  "}):
        with pytest.raises(GatewayError) as exc:
            asyncio.run(g.authenticate(headers))
        assert exc.value.message.startswith("Missing API key"), headers


def test_model_globs_are_case_sensitive():
    k = ApiKey("t", "h", ("chat-*", "embed"))
    assert k.allows("chat-mini") and k.allows("embed")
    assert not k.allows("Chat-mini") and not k.allows("embed-2") and not k.allows("chat")


def test_unknown_key_is_401_and_model_outside_globs_403():
    g = _guard(models=["chat*"])
    assert _status(lambda: asyncio.run(g.authenticate({"authorization": "Bearer nope"}))) == 401
    assert _status(lambda: asyncio.run(g.authenticate({}))) == 401
    assert _status(lambda: _admit(g, "embed")) == 403
    _admit(g, "chat-mini")


def test_rpm_window_refuses_with_retry_after():
    g = _guard(rpm=2)
    assert _admit(g) is False  # decided on the shared state: no RLL
    _admit(g)
    with pytest.raises(GatewayError) as exc:
        _admit(g)
    assert exc.value.status == 429 and exc.value.flag == "RL" and 1 <= int(exc.value.retry_after) <= 60


def test_tpm_cost_is_capped_at_the_limit():
    assert estimate_tokens(b"x" * 400, {"max_tokens": 50}) == 150
    assert estimate_tokens(b"", {}) == 256
    assert estimate_tokens(b"", {"max_tokens": "lots"}) == 256
    g = _guard(tpm=1000)
    _admit(g, body={"max_tokens": 10**30})  # an empty window admits one request, charged the whole limit
    assert _status(lambda: _admit(g, body={"max_tokens": 1})) == 429


@pytest.mark.parametrize("asked", [20000, 20000.0, "20000", 19999.5, "2e4"])
def test_a_count_a_lenient_provider_reads_is_charged_however_it_is_written(asked):
    """vLLM and other pydantic-lax providers take 20000.0 and "20000" as 20000: so must the estimate."""
    assert estimate_tokens(b"", {"max_tokens": asked}) == 20000
    assert estimate_tokens(b"", {"max_tokens": 10, "n": asked}) == 200000


@pytest.mark.parametrize("junk", [True, 0, -5, 0.5, "nan", "inf", float("nan"), None, [], {}])
def test_what_no_provider_reads_as_a_count_is_charged_the_default(junk):
    assert estimate_tokens(b"", {"max_tokens": junk}) == 256
    assert estimate_tokens(b"", {"max_tokens": 10, "n": junk}) == 10


def test_redis_down_limits_locally_and_leaves_redis_alone_for_a_while():
    dead, clock = DeadRedis(), FakeClock()
    g = _guard(dead, clock, rpm=3)
    # each decision says it was local: the failed call's and those that skip Redis alike
    assert [_admit(g) for _ in range(3)] == [True, True, True]
    with pytest.raises(GatewayError) as exc:
        _admit(g)
    assert exc.value.status == 429  # the local window holds the same limit
    assert exc.value.flag == "RL,RLL"  # and the refusal says it was decided locally
    assert dead.calls == 1  # one failed call, then Redis is skipped until REDIS_RETRY_S has passed
    clock.advance(guard_mod.REDIS_RETRY_S - 0.25)
    assert _status(lambda: _admit(g)) == 429
    assert dead.calls == 1
    clock.advance(0.25)
    assert _status(lambda: _admit(g)) == 429
    assert dead.calls == 2


class FullRedis(MemoryState):
    """Redis at maxmemory with noeviction: the limits script (it writes) is refused, key reads still work."""

    name = "redis"

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def rate_limit(self, *a: Any) -> Any:
        raise StateRefused("OOM command not allowed when used memory > 'maxmemory'")

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        return await super().get(key)


def test_a_full_redis_keeps_key_lookups_and_limits_each_request_locally(caplog):
    """Not an outage: a key not yet cached is looked up (it got 401 for the second Redis was left alone),
    the refusal is said once, not as "unreachable" then "reachable again" with every lookup."""
    backend = FullRedis()
    store = RedisKeyStore(backend)
    secrets = [new_key() for _ in range(3)]
    for i, s in enumerate(secrets):
        asyncio.run(store.put(ApiKey(f"svc-{i}", hash_key(s), ("*",), rpm=100)))
    g = Guard(AuthConfig(mode="keys", cache_ttl_s=5.0), backend, Metrics())
    with caplog.at_level("WARNING", logger="llmgw.auth"):
        for s in secrets:  # each one new to the cache, right after the previous one's refused script
            key = asyncio.run(g.authenticate({"authorization": f"Bearer {s}"}))
            assert asyncio.run(g.admit(key, "chat", b"{}", {})) is True  # its limits decided locally: RLL
    assert backend.gets == 3
    assert [r.getMessage()[:55] for r in caplog.records] == [
        "auth: state backend refused the rate-limit script (OOM "
    ]


def test_concurrency_is_held_until_the_request_ends():
    g = _guard(DeadRedis(), max_concurrency=1)
    key = asyncio.run(g.authenticate({"authorization": f"Bearer {KEY}"}))
    # a key without rpm/tpm asks no shared state: nothing was decided locally for want of Redis
    assert asyncio.run(g.admit(key, "chat", b"{}", {})) is False
    done = g.track(key)
    assert _status(lambda: asyncio.run(g.admit(key, "chat", b"{}", {}))) == 429
    done(None)
    asyncio.run(g.admit(key, "chat", b"{}", {}))


def test_requests_arriving_while_one_waits_for_the_windows_are_refused_without_spending_rpm():
    """Four requests at once under max_concurrency 1: one is admitted, three get the concurrency 429, and only
    the admitted one is charged to the shared rpm window (three were charged, and refused after)."""
    backend = SlowWindow()
    g = _guard(backend, max_concurrency=1, rpm=100)
    key = asyncio.run(g.authenticate({"authorization": f"Bearer {KEY}"}))

    async def four() -> list[Any]:
        async def one() -> str:
            await g.admit(key, "chat", b"{}", {})
            g.track(key)
            return "ok"

        return await asyncio.gather(*(one() for _ in range(4)), return_exceptions=True)

    results = asyncio.run(four())
    assert results.count("ok") == 1 and all(isinstance(r, GatewayError) for r in results if r != "ok")
    assert backend.calls == 1 and g.concurrency["team"] == 1


def _redis_keys(clock: FakeClock) -> tuple[Guard, RedisKeyStore]:
    backend = MemoryState()
    backend.name = "redis"  # the store works on any backend with get/set/hset
    return Guard(AuthConfig(mode="keys", cache_ttl_s=5.0), backend, Metrics(), clock), RedisKeyStore(backend)


def test_redis_key_cache_expires_so_revocation_takes_effect():
    clock = FakeClock()
    g, store = _redis_keys(clock)
    secret = new_key()
    asyncio.run(store.put(ApiKey("svc", hash_key(secret), ("*",))))
    hdrs = {"authorization": f"Bearer {secret}"}
    assert asyncio.run(g.authenticate(hdrs)).id == "svc"
    assert asyncio.run(store.revoke("svc"))
    clock.advance(4.75)
    assert asyncio.run(g.authenticate(hdrs)).id == "svc"  # cached for cache_ttl_s
    clock.advance(0.25)
    assert _status(lambda: asyncio.run(g.authenticate(hdrs))) == 401
    asyncio.run(store.put(ApiKey("dup", "sha256:x")))
    with pytest.raises(ValueError, match="exists"):
        asyncio.run(store.put(ApiKey("dup", "sha256:y")))


def test_an_unknown_key_is_asked_about_again_after_the_negative_ttl():
    """A key created just after a request with it was refused works within NEGATIVE_TTL_S, not cache_ttl_s."""
    clock = FakeClock()
    g, store = _redis_keys(clock)
    secret = new_key()
    hdrs = {"authorization": f"Bearer {secret}"}
    assert _status(lambda: asyncio.run(g.authenticate(hdrs))) == 401
    asyncio.run(store.put(ApiKey("new", hash_key(secret), ("*",))))
    clock.advance(guard_mod.NEGATIVE_TTL_S - 0.25)
    assert _status(lambda: asyncio.run(g.authenticate(hdrs))) == 401  # the refusal is cached
    clock.advance(0.25)
    assert asyncio.run(g.authenticate(hdrs)).id == "new"


def test_a_refused_request_carries_openais_rate_limit_headers():
    assert guard_mod.ratelimit_headers("rpm", 3, 7) == (
        (b"x-ratelimit-limit-requests", b"3"),
        (b"x-ratelimit-remaining-requests", b"0"),
        (b"x-ratelimit-reset-requests", b"7s"),
    )
    assert dict(guard_mod.ratelimit_headers("tpm", 300, 60))[b"x-ratelimit-reset-tokens"] == b"1m0s"
