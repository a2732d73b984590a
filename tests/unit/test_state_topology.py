"""Shared state on Redis, without a server: which keys go where, what a bad topology says, and what
the metrics show when the primary moves."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from fake_clock import FakeClock
from redis.crc import key_slot

from gateway.config import AuthConfig, ConfigError, StateConfig, parse_config, redact
from gateway.engine.sync import StateSync
from gateway.policy.ratelimit import ADMITTED, LimitCheck, LimitDecision
from gateway.security.guard import Guard
from gateway.security.keys import ApiKey
from gateway.state.memory import MemoryState
from gateway.state.redis import redis_target
from gateway.telemetry.metrics import Metrics

ROOT = Path(__file__).parents[2]


def _cfg(**state: Any) -> dict[str, Any]:
    return {
        "state": state,
        "models": [{"name": "m", "deployments": [{"id": "d", "base_url": "http://h:1/v1"}]}],
    }


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"redis_mode": "cluster"}, r"state\.redis_mode: cluster needs state\.backend: redis"),
        (
            {"backend": "redis", "redis_mode": "sentinel", "sentinel_master": "mymaster"},
            r"state\.sentinels: ",
        ),
        (
            {"backend": "redis", "redis_mode": "sentinel", "sentinels": ["s:26379"]},
            r"state\.sentinel_master: ",
        ),
        (
            {"backend": "redis", "sentinels": ["s:26379"]},
            r"state\.sentinels: only used with state\.redis_mode: sentinel",
        ),
        (
            {"backend": "redis", "redis_mode": "cluster", "sentinel_master": "m"},
            r"state\.sentinel_master: only used",
        ),
        (
            {"backend": "redis", "redis_mode": "cluster", "redis_url": "redis://h:7000/2"},
            r"state\.redis_url: Redis Cluster has only database 0",
        ),
        (
            {"backend": "redis", "redis_mode": "cluster", "redis_url": "unix:///run/redis.sock"},
            r"state\.redis_url: redis_mode cluster needs a redis:// or rediss:// URL",
        ),
        (
            {"backend": "redis", "redis_mode": "sentinel", "sentinels": ["no-port"], "sentinel_master": "m"},
            r"state\.sentinels: entry 0 \('no-port'\) is not host:port",
        ),
        ({"backend": "redis", "redis_mode": "ring"}, r"state\.redis_mode: "),
    ],
)
def test_a_topology_that_cannot_run_fails_at_start_up_naming_the_key(state, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_cfg(**state))


def test_sentinel_and_cluster_configs_resolve_to_targets():
    s = parse_config(
        _cfg(
            backend="redis",
            redis_mode="sentinel",
            sentinels=["10.0.0.1:26379", "[::1]:26380"],
            sentinel_master="mymaster",
            redis_url="rediss://:pw@ignored:6379/1",
            timeout_ms=250,
        )
    ).state
    t = redis_target(s)
    assert t.mode == "sentinel" and t.sentinels == (("10.0.0.1", 26379), ("[::1]", 26380))
    assert t.sentinel_master == "mymaster" and t.timeout_s == 0.25 and t.url.startswith("rediss://")
    c = redis_target(StateConfig(backend="redis", redis_mode="cluster", redis_url="redis://seed:7000"))
    assert c.mode == "cluster" and c.url == "redis://seed:7000" and c.timeout_s == 0.5


def test_redis_passwords_are_redacted():
    cfg = parse_config(
        _cfg(
            backend="redis",
            redis_mode="sentinel",
            sentinels=["s:26379"],
            sentinel_master="mymaster",
            sentinel_password="sentinel-SECRET",
            redis_url="redis://:data-SECRET@x:6379/0",
        )
    )
    shown = str(redact(cfg))
    assert "SECRET" not in shown and "mymaster" in shown and "s:26379" in shown


class Recorder(MemoryState):
    """Remembers which keys each rate-limit call touched."""

    def __init__(self) -> None:
        super().__init__("llmgw:")
        self.calls: list[list[str]] = []

    async def rate_limit(self, checks: list[LimitCheck], period_s: float) -> LimitDecision:
        self.calls.append([c.key for c in checks])
        return ADMITTED


def test_both_limits_of_a_key_go_to_one_cluster_slot_in_one_call():
    backend = Recorder()
    g = Guard(AuthConfig(mode="keys"), backend, Metrics())
    for key_id in ("team-a", "team-b", "odd}id{"):
        asyncio.run(g.admit(ApiKey(key_id, "h", rpm=10, tpm=1000), "m", b"{}", {}))
    assert len(backend.calls) == 3 and all(len(keys) == 2 for keys in backend.calls)
    for keys in backend.calls:
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
    assert len({key_slot(keys[0].encode()) for keys in backend.calls}) == 3  # keys spread across slots


def test_nothing_scans_the_keyspace():
    """KEYS and SCAN walk every key of a node; on a cluster they would also miss the other nodes."""
    pattern = re.compile(r"""\.(keys|scan|scan_iter)\(|['"](KEYS|SCAN)['"]""")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "gateway").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and "redis" in p.read_text()
    ]
    assert not hits, hits


class Backend(MemoryState):
    name = "redis"

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.current = ["10.0.0.1:6379"]
        self.fail = False

    def primaries(self) -> list[str]:
        return list(self.current)

    async def sync(self, batch: Any, ttl_s: float) -> Any:
        if self.fail:
            raise ConnectionError("primary gone")
        return await super().sync(batch, ttl_s)


class Engine:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.clock = FakeClock()

        class Registry:
            deployments: list[Any] = []
            models: dict[str, Any] = {}

        self.registry = Registry()


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return v or 0.0


def test_sync_shows_the_primary_in_use_and_counts_the_moves():
    engine, backend = Engine(), Backend("sentinel")
    sync = StateSync(engine, backend, interval_s=0.1, ttl_s=60)

    async def rounds() -> None:
        await sync.round()
        assert (
            _value(engine.metrics, "llmgw_state_backend_primary", mode="sentinel", address="10.0.0.1:6379")
            == 1
        )
        backend.fail = True  # the primary dies
        await sync.round()
        assert sync.up is False
        backend.fail, backend.current = False, ["10.0.0.2:6379"]  # the replica is promoted
        await sync.round()
        await sync.round()

    asyncio.run(rounds())
    m = engine.metrics
    assert _value(m, "llmgw_state_backend_primary", mode="sentinel", address="10.0.0.1:6379") == 0
    assert _value(m, "llmgw_state_backend_primary", mode="sentinel", address="10.0.0.2:6379") == 1
    assert _value(m, "llmgw_state_backend_reconnects_total") == 1 and sync.up is True


class Flaky(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def rate_limit(self, checks: list[LimitCheck], period_s: float) -> LimitDecision:
        if self.down:
            raise ConnectionError("refused")
        return await super().rate_limit(checks, period_s)


def test_limits_go_local_while_redis_is_away_and_the_seconds_are_counted():
    clock = FakeClock()
    backend, metrics = Flaky(), Metrics()
    g = Guard(AuthConfig(mode="keys"), backend, metrics, clock)
    key = ApiKey("team", "h", rpm=1000)
    backend.down = True
    asyncio.run(g.admit(key, "m", b"{}", {}))  # refused by Redis: decided locally
    clock.advance(0.5)  # within REDIS_RETRY_S: decided locally without asking Redis
    asyncio.run(g.admit(key, "m", b"{}", {}))
    # counted while the outage lasts, so a dashboard does not wait for its end to see it
    assert _value(metrics, "llmgw_state_local_only_seconds_total") == pytest.approx(0.5)
    clock.advance(2.0)  # past REDIS_RETRY_S, the primary still gone
    asyncio.run(g.admit(key, "m", b"{}", {}))
    assert _value(metrics, "llmgw_state_local_only_seconds_total") == pytest.approx(2.5)
    clock.advance(0.25)
    asyncio.run(g.admit(key, "m", b"{}", {}))
    assert _value(metrics, "llmgw_state_local_only_seconds_total") == pytest.approx(2.75)
    backend.down = False
    clock.advance(30.0)  # a replica was promoted meanwhile; no request came for a while
    asyncio.run(g.admit(key, "m", b"{}", {}))
    assert len(backend.calls) == 1  # shared again
    # counted up to when Redis was last known away (the last failure, plus REDIS_RETRY_S), not the idle
    # 30 s before anyone asked again
    assert _value(metrics, "llmgw_state_local_only_seconds_total") == pytest.approx(3.5)
    clock.advance(3.0)
    asyncio.run(g.admit(key, "m", b"{}", {}))
    assert _value(metrics, "llmgw_state_local_only_seconds_total") == pytest.approx(3.5)  # shared: no more


def test_sentinel_and_cluster_clients_carry_the_urls_credentials_tls_and_timeout():
    """Built without a network: what each redis-py client will present when it connects."""
    from gateway.state.topology import RedisTarget, Topology

    s = Topology(
        RedisTarget(
            mode="sentinel",
            url="rediss://app:pw@ignored:1/3?ssl_cert_reqs=none",
            sentinels=(("s1", 26379),),
            sentinel_master="mymaster",
            sentinel_password="spw",
            timeout_s=0.3,
        )
    )
    primary = s.client.connection_pool
    assert primary.service_name == "mymaster" and "SSL" in primary.connection_class.__name__
    kw = primary.connection_kwargs
    assert (kw["username"], kw["password"], kw["db"], kw["ssl_cert_reqs"]) == ("app", "pw", 3, "none")
    assert kw["socket_timeout"] == kw["socket_connect_timeout"] == 0.3 and "host" not in kw
    sentinel = s._sentinel.sentinels[0].connection_pool
    assert "SSL" in sentinel.connection_class.__name__
    skw = sentinel.connection_kwargs
    assert (skw["host"], skw["port"], skw["password"], skw["ssl_cert_reqs"]) == ("s1", 26379, "spw", "none")
    assert s.primaries() == []  # unknown until the sentinels are asked

    c = Topology(RedisTarget(mode="cluster", url="rediss://:pw@seed:7000/0", timeout_s=0.3))
    assert (
        c.client.connection_kwargs["password"] == "pw" and c.client.connection_kwargs["socket_timeout"] == 0.3
    )
    assert "SSL" in c.client.connection_kwargs["connection_class"].__name__
    one = Topology(RedisTarget(url="redis://:pw@h:6380/0", timeout_s=0.3))
    assert one.primaries() == ["h:6380"]


def test_a_cluster_call_is_retried_once_after_a_refresh():
    """One retry after re-reading the slot map finds a replica promoted since the last call; more only
    re-read a map that still names the dead primary until the state timeout is spent (redis-py's own
    default is ten). One server gets none: the caller falls back to local state at once."""
    from gateway.state.topology import CLUSTER_RETRIES, RedisTarget, Topology

    c = Topology(RedisTarget(mode="cluster", url="redis://seed:7000/0"))
    assert CLUSTER_RETRIES == 1 and c.client.retry.get_retries() == CLUSTER_RETRIES
    one = Topology(RedisTarget(url="redis://h:6380/0"))
    assert one.client.get_retry().get_retries() == 0
