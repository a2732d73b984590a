"""Shared state on highly available Redis, with real servers: a 3-node Redis Cluster and a Sentinel-
managed primary with its replica. Two gateway processes share rate limits, key quotas, ejections and
latency through them; a primary is killed under load (behind Sentinel, and in a Cluster with a replica
per primary) and no client request fails.
Plus the O(1) rate limit: many requests keep the per-request Redis work constant."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from harness import Gateway, dep, metric_value, model
from redis_servers import MASTER_SET, Cluster, RedisProc, SentinelSet, wait_for

from gateway.policy.ratelimit import ADMITTED, LimitCheck
from gateway.security.keys import hash_key
from gateway.state.base import SyncBatch
from gateway.state.redis import RedisState
from gateway.state.topology import RedisTarget

FAST = {"ttft_ms": 5, "ttft_dist": "fixed", "itl_ms": 1, "tokens": 3, "tail_p": 0}
KEY_LOAD = "sk-gw-ha-load-0001"
KEY_SHARED = "sk-gw-ha-shared-0002"
KEYS = [
    {"id": "load", "hash": hash_key(KEY_LOAD), "rpm": 1_000_000},
    {"id": "shared", "hash": hash_key(KEY_SHARED), "rpm": 3},
]
HTTP = httpx.Client(timeout=10)


def _chat(gw: Gateway, key: str, **body: Any) -> httpx.Response:
    return HTTP.post(
        gw.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], **body},
    )


def _flags_of(records: list[dict[str, Any]], key_id: str) -> list[list[str]]:
    return [r["response_flags"].split(",") for r in records if r["api_key_id"] == key_id]


def _shared_limit_holds(gw1: Gateway, gw2: Gateway) -> None:
    """rpm 3 for one key across two gateways: 3 admitted in total, not 3 each (GCRA refills one every
    20 s, so any time the requests took beyond that may admit one more)."""
    t0 = time.monotonic()
    codes = [_chat((gw1, gw2)[i % 2], KEY_SHARED).status_code for i in range(8)]
    refilled = int((time.monotonic() - t0) // 20)
    assert set(codes) == {200, 429}, codes
    assert 3 <= codes.count(200) <= 3 + refilled, codes
    assert 200 in codes[0::2] and 200 in codes[1::2], codes  # both gateways admitted some: one shared count


# ---------------------------------------------------------------- Redis Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def _cluster_cfg(cluster: Cluster, prefix: str, **models: Any) -> dict[str, Any]:
    return {
        "server": {"admin_port": "auto"},  # with keys on, /metrics is served on the admin port
        "state": {
            "backend": "redis",
            "redis_mode": "cluster",
            "redis_url": cluster.seed_url,
            "key_prefix": prefix,
            "sync_interval_ms": 100,
        },
        "auth": {"mode": "keys", "keys": KEYS, "cache_ttl_s": 0.5},
        "models": [models.get("chat") or model("chat", [dep("a", "http://127.0.0.1:9/v1")])],
    }


def test_cluster_shares_rate_limits_and_key_quotas_across_two_gateways(
    cluster, sims_factory, gateways, redis_prefix, tmp_path
):
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    cfg = _cluster_cfg(cluster, redis_prefix, chat=model("chat", [dep("a", sims.base_url("sim-a"))]))
    gw1, gw2 = gateways(cfg, wait_ready=False), gateways(cfg, wait_ready=False)
    gw1.wait_ready()
    gw2.wait_ready()
    _shared_limit_holds(gw1, gw2)

    # A key created in the cluster with the CLI (the config's redis_mode applies), with a token quota.
    conf = tmp_path / "cli.yaml"
    conf.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "server"}))
    from test_security import _keys  # the CLI in-process

    made = _keys("create", "--config", str(conf), "--id", "quota", "--tpm", "300")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    # each request is estimated at ~125 tokens (its bytes / 4 + max_tokens): two fit in 300, not three
    codes = [_chat((gw1, gw2, gw1)[i], secret, max_tokens=100).status_code for i in range(3)]
    assert codes == [200, 200, 429], codes
    assert "quota" in _keys("list", "--config", str(conf)).stdout

    # Every limit key of one API key sits in one slot (a hash tag per key), spread over the nodes.
    c = cluster.client()
    tagged = [k.decode() for n in cluster.nodes for k in n.client.keys(redis_prefix + "rl:*")]
    assert {k.split("}")[0] for k in tagged} == {redis_prefix + "rl:{shared", redis_prefix + "rl:{quota"}, (
        tagged
    )
    assert len({c.keyslot(k) for k in tagged if "{quota}" in k}) == 1
    c.close()
    assert metric_value(gw1.metrics(), "llmgw_state_backend_primary", mode="cluster") == 3
    assert metric_value(gw1.metrics(), "llmgw_rate_limited_total", key="quota", limit="tpm") == 1


def test_cluster_shares_ejections_and_latency_across_two_gateways(
    cluster, sims_factory, gateways, redis_prefix
):
    sims = sims_factory({"sim-a": ("us-east", {**FAST, "ttft_ms": 150}), "sim-b": ("us-east", FAST)})
    chat = model(
        "chat",
        [dep("a", sims.base_url("sim-a"), priority=0), dep("b", sims.base_url("sim-b"), priority=1)],
        routing={"strategy": "priority"},
        outlier={"consecutive_failures": 3, "base_ejection_s": 30, "max_ejection_percent": 50},
        retry={"backoff_base_ms": 1, "budget_percent": 100},
    )
    cfg = _cluster_cfg(cluster, redis_prefix, chat=chat)
    cfg["auth"] = {"mode": "none"}
    gw1, gw2 = gateways(cfg, wait_ready=False), gateways(cfg, wait_ready=False)
    gw1.wait_ready()
    gw2.wait_ready()
    post = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):  # gw1 learns a's latency (~150 ms); gw2 has served nothing
        assert HTTP.post(gw1.url + "/v1/chat/completions", json=post).status_code == 200
    wait_for(
        lambda: (
            metric_value(gw2.metrics(), "llmgw_deployment_latency_estimate_seconds", deployment="a") > 0.1
        ),
        10,
        "gw2 to adopt gw1's latency estimate of a",
    )

    sims.set("sim-a", error_rate=1.0, error_status=503)
    for _ in range(3):
        assert HTTP.post(gw1.url + "/v1/chat/completions", json=post).status_code == 200  # retried on b
    assert metric_value(gw1.metrics(), "llmgw_ejections_total", deployment="a") == 1
    wait_for(
        lambda: metric_value(gw2.metrics(), "llmgw_deployment_ejected", deployment="a") == 1,
        10,
        "gw2 to learn of the ejection through the cluster",
    )
    before = len(sims.stats("sim-a")["recent"])
    for _ in range(3):
        r = HTTP.post(gw2.url + "/v1/chat/completions", json=post)
        assert r.status_code == 200 and r.headers["x-gateway-upstream"] == "b"
    assert len(sims.stats("sim-a")["recent"]) == before


def test_a_cluster_command_goes_to_the_node_of_its_key_even_after_the_client_dropped_its_map(
    cluster, redis_prefix
):
    """redis-py's cluster client drops its slot map on CLUSTERDOWN (as on close) and decides where the next
    command goes before re-reading it: without one, a keyed command went to a random primary (a MOVED;
    in a failover, a node still answering CLUSTERDOWN, which costs the state timeout). Each command finds
    its node at once, so no node answers MOVED."""
    state = RedisState(RedisTarget(mode="cluster", url=cluster.seed_url, timeout_s=2.0), redis_prefix)
    check = [LimitCheck(redis_prefix + "rl:{shared}:rpm", 1, 1000)]

    def moved() -> int:
        return sum(
            n.client.info("errorstats").get("errorstat_MOVED", {}).get("count", 0) for n in cluster.nodes
        )

    async def calls() -> int:
        before = moved()
        for _ in range(8):  # a random primary would be the right one 1 time in 3
            await state.close()  # connections and slot map dropped; the client reconnects on next use
            assert await state.rate_limit(check, 60.0) == ADMITTED
            await state.close()
            assert await state.get(redis_prefix + "nothing") is None
        await state.close()
        return moved() - before

    assert asyncio.run(calls()) == 0


def test_a_sync_round_deletes_fields_on_every_node_of_a_cluster(cluster, redis_prefix):
    """A sync round writes, deletes (the fields of replicas gone) and reads hashes on whichever nodes their
    keys live on, in one pipeline."""
    state = RedisState(RedisTarget(mode="cluster", url=cluster.seed_url, timeout_s=2.0), redis_prefix)
    keys = [f"{redis_prefix}stats:dep-{i}" for i in range(12)]  # spread over the three primaries' slots

    async def rounds() -> dict[str, dict[str, bytes]]:
        await state.start()
        write = {k: {"gone": b"1", "gone#age": b"2", "kept": b"3"} for k in keys}
        await state.sync(SyncBatch(hset=write, read_hashes=keys), 60.0)
        drop = {k: ["gone", "gone#age"] for k in keys}
        res = await state.sync(SyncBatch(hset={keys[0]: {"mine": b"4"}}, hdel=drop, read_hashes=keys), 60.0)
        await state.close()
        return res.hashes

    hashes = asyncio.run(rounds())
    assert {k: set(v) for k, v in hashes.items()} == {
        k: {"kept"} | ({"mine"} if k == keys[0] else set()) for k in keys
    }
    client = cluster.client()
    assert len({client.get_node_from_key(k).name for k in keys}) == 3  # the keys live on every primary
    client.close()


# ---------------------------------------------------------------- failover under load


@dataclass
class _Failover:
    """A failover to run under load: how the gateways reach Redis, the primary to kill, the replica that
    takes its place, the primaries in use before and after, and how to tell the promotion happened."""

    mode: str
    state: dict[str, Any]
    keys: list[dict[str, Any]]
    old: RedisProc
    new: RedisProc
    primaries_before: set[str]
    primaries_after: set[str]
    promoted: Callable[[], object]


def test_sentinel_failover_under_load_fails_no_request_and_limits_are_shared_again(
    tmp_path: Path, sims_factory, gateways, redis_prefix
):
    servers = SentinelSet(tmp_path / "redis")
    try:
        old, new = servers.primary, servers.replica
        failover = _Failover(
            mode="sentinel",
            state={
                "redis_mode": "sentinel",
                "sentinels": [servers.sentinel.address],
                "sentinel_master": MASTER_SET,
            },
            keys=KEYS,
            old=old,
            new=new,
            primaries_before={old.address},
            primaries_after={new.address},
            promoted=lambda: servers.master_port() == new.port,
        )
        _failover_under_load(failover, sims_factory, gateways, redis_prefix)
    finally:
        servers.stop()


def test_cluster_failover_under_load_fails_no_request_and_limits_are_shared_again(
    tmp_path: Path, sims_factory, gateways, redis_prefix
):
    """A 3-primary cluster with a replica each; the primary of the shared key's slot dies and the cluster
    (not a sentinel) promotes its replica, after cluster-node-timeout plus an election."""
    servers = Cluster(tmp_path / "redis", replicas=1, node_timeout_ms=1000)
    try:
        old = servers.owner(redis_prefix + "rl:{shared}:rpm")
        new = servers.replica_of(old)
        # the load's key gets an id whose limits live on that primary too, so its requests meet the dead node
        load_id = next(f"load-{i}" for i in count() if servers.owner(f"rl:{{load-{i}}}:rpm") is old)
        before = servers.primaries()
        after = before - {old.address} | {new.address}
        failover = _Failover(
            mode="cluster",
            state={"redis_mode": "cluster", "redis_url": f"redis://{old.address}/0"},  # the seed dies too
            keys=[{**KEYS[0], "id": load_id}, *KEYS[1:]],
            old=old,
            new=new,
            primaries_before=before,
            primaries_after=after,
            promoted=lambda: servers.primaries() == after and servers.whole(),
        )
        _failover_under_load(failover, sims_factory, gateways, redis_prefix)
    finally:
        servers.stop()


def _on_primaries(gw: Gateway, mode: str, addresses: set[str]) -> bool:
    """The gateway reports exactly ``addresses`` as the primaries in use."""
    text = gw.metrics()
    return metric_value(text, "llmgw_state_backend_primary", mode=mode) == len(addresses) and all(
        metric_value(text, "llmgw_state_backend_primary", mode=mode, address=a) == 1 for a in addresses
    )


def _failover_under_load(f: _Failover, sims_factory: Any, gateways: Any, prefix: str) -> None:
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    cfg = {
        "server": {"admin_port": "auto"},  # with keys on, /metrics is served on the admin port
        "state": {
            "backend": "redis",
            **f.state,
            "key_prefix": prefix,
            "sync_interval_ms": 100,
            "timeout_ms": 250,
        },
        "auth": {"mode": "keys", "keys": f.keys},
        "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
    }
    gw1, gw2 = gateways(cfg, wait_ready=False), gateways(cfg, wait_ready=False)
    gw1.wait_ready()
    gw2.wait_ready()
    for gw in (gw1, gw2):
        wait_for(
            lambda gw=gw: _on_primaries(gw, f.mode, f.primaries_before),
            10,
            "the gateways to find the primaries",
        )

    # A light load on both gateways, paced, bounded in count; the primary dies after the first 100.
    results: list[int | str] = []
    took: list[float] = []  # each request's time, seconds
    stop = threading.Event()

    def load(gw: Gateway) -> None:
        while not stop.is_set() and len(results) < 1500:
            t0 = time.monotonic()
            try:
                results.append(_chat(gw, KEY_LOAD).status_code)
            except httpx.HTTPError as exc:
                results.append(type(exc).__name__)
            took.append(time.monotonic() - t0)
            time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(gw,)) for gw in (gw1, gw2, gw1, gw2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 100, 30, "100 requests before the kill")
        t_kill = time.monotonic()
        sent_before = len(results)
        f.old.kill()
        wait_for(f.promoted, 30, f"the {f.mode} to promote the replica")
        t_promoted = time.monotonic()
        for gw in (gw1, gw2):  # both follow the new primary and their limits are shared again
            wait_for(
                lambda gw=gw: (
                    _on_primaries(gw, f.mode, f.primaries_after)
                    # the limits back on the shared state (the local seconds count while they are not)
                    and "shared limits resumed" in gw.stderr()
                ),
                30,
                "the gateways to follow the promoted primary",
            )
        t_followed = time.monotonic()
        sent_after = len(results)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [r for r in results if r != 200]
    assert not failed, failed[:20]
    assert max(took) < 3.0  # none waited on Redis for long, let alone until the client gave up (10 s)
    assert sent_after - sent_before > 0  # requests flowed while the state was local
    local_s = [metric_value(gw.metrics(), "llmgw_state_local_only_seconds_total") for gw in (gw1, gw2)]
    assert all(s > 0 for s in local_s), local_s  # each process counted its time on its own
    reconnects = [metric_value(gw.metrics(), "llmgw_state_backend_reconnects_total") for gw in (gw1, gw2)]
    assert all(n >= 1 for n in reconnects), reconnects
    for gw in (gw1, gw2):
        assert metric_value(gw.metrics(), "llmgw_state_backend_primary", address=f.old.address) == 0
        assert "enforcing limits locally" in gw.stderr()
    # the limits live in the promoted primary now, and hold across both gateways again
    _shared_limit_holds(gw1, gw2)
    assert f.new.client.exists(prefix + "rl:{shared}:rpm") == 1
    # the access log tells the two apart: requests admitted while Redis was away carry RLL, those decided
    # on the promoted primary do not (the shared key's 4 requests per gateway came after the failover)
    for gw in (gw1, gw2):
        wait_for(lambda gw=gw: len(_flags_of(gw.records(), "shared")) == 4, 10, "the shared key's records")
        assert all("RLL" not in flags for flags in _flags_of(gw.records(), "shared"))
    assert any("RLL" in r["response_flags"].split(",") for gw in (gw1, gw2) for r in gw.records())
    print(
        f"\n{f.mode} failover: {len(results)} requests, {len(failed)} failed; {sent_after - sent_before} sent "
        f"between the kill and both gateways following; promotion {t_promoted - t_kill:.2f} s after the kill; "
        f"gateways on the new primary {t_followed - t_kill:.2f} s after the kill; limits local-only per "
        f"gateway {', '.join(f'{s:.2f} s' for s in local_s)}; slowest request {max(took) * 1000:.0f} ms, "
        f"{sum(t > 0.1 for t in took)} over 100 ms"
    )


# ---------------------------------------------------------------- O(1) per request


def test_rate_limit_work_per_request_stays_constant_however_many_requests(
    private_redis, sims_factory, gateways, redis_prefix
):
    """The old sliding-window log read every entry of the window per call; GCRA keeps one number per limit.
    Measured as Redis sees it: commands run per request (INFO commandstats) and the limit's stored size."""
    port, _ = private_redis
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    gw = gateways(
        {
            "state": {
                "backend": "redis",
                "redis_url": f"redis://127.0.0.1:{port}/0",
                "key_prefix": redis_prefix,
                "sync_interval_ms": 3_600_000,
            },  # no sync round during the test: only the limits talk
            "auth": {"mode": "keys", "keys": KEYS},
            "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
        }
    )
    r = redis.Redis(port=port)
    key = redis_prefix + "rl:{load}:rpm"

    def commands() -> int:
        return sum(
            v["calls"]
            for name, v in r.info("commandstats").items()
            if name.split("_", 1)[1] in ("evalsha", "eval", "time", "get", "set")
        )

    def run(n: int) -> float:
        before = commands()
        for _ in range(n):
            assert _chat(gw, KEY_LOAD).status_code == 200
        return (commands() - before) / n

    _chat(gw, KEY_LOAD)  # loads the script
    per_call_first, per_call_later = run(40), run(400)
    assert per_call_first == per_call_later == 4  # EVALSHA, and inside it TIME, GET, SET: one limit (rpm)
    # What a limit stores: one number (its TAT), kept only while it is ahead of now, whatever the traffic.
    assert r.type(key) in (b"string", b"none") and r.dbsize() <= 1
    assert _chat(gw, KEY_SHARED).status_code == 200
    tat = r.get(redis_prefix + "rl:{shared}:rpm")
    assert float(tat) > 0 and r.pttl(redis_prefix + "rl:{shared}:rpm") <= 20_001  # rpm 3: 20 s per request


# ---------------------------------------------------------------- a Redis that never answers


def test_a_redis_that_accepts_but_never_answers_delays_no_request_beyond_the_state_timeout(
    sims_factory, gateways
):
    """A hung primary (accepts connections, never replies) is worse than a dead one: only the state
    timeout stands between it and every rate-limited request."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(silent.accept()[0])

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    try:
        sims = sims_factory({"sim-a": ("us-east", FAST)})
        gw = gateways(
            {
                "state": {
                    "backend": "redis",
                    "redis_url": f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                    "timeout_ms": 200,
                },
                "auth": {"mode": "keys", "keys": KEYS},
                "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
            },
            ready_timeout=30,
        )
        slowest = 0.0
        for _ in range(3):  # the first asks Redis and gives up after 200 ms; the next ones decide locally
            t0 = time.monotonic()
            assert _chat(gw, KEY_SHARED).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
        assert _chat(gw, KEY_SHARED).status_code == 429  # rpm 3, held locally
        assert slowest < 3.0  # without the bound, the first would hang until the client gave up (10 s)
        assert held  # the gateway did connect: it was the silence, not a refusal
        assert "TimeoutError" in gw.stderr() and "enforcing limits locally" in gw.stderr()
        assert metric_value(gw.metrics(), "llmgw_state_backend_up") == 0
    finally:
        stop.set()
        acceptor.join()
        for s in (*held, silent):
            s.close()
