"""Prefix-cache affinity: the ring (balance, least disruption), the load bound, and placement on a fake clock."""

from __future__ import annotations

import math
from collections import Counter

from fake_clock import FakeClock
from scripted_upstream import Reply, ScriptedUpstream

from gateway.config import ModelConfig
from gateway.engine.registry import ModelRuntime
from gateway.policy.affinity import AffinityView, HashRing, hash64, load_bound, place
from gateway.policy.outlier import OutlierState
from gateway.policy.routing import Locality, RouteReason

KEYS = [hash64(b"conversation-%d" % i) for i in range(20_000)]


def homes(ring: HashRing) -> list[str]:
    return [ring.order(k)[0] for k in KEYS]


def views(**inflight: int) -> dict[str, AffinityView]:
    return {d: AffinityView(True, n, None) for d, n in inflight.items()}


# ---------------------------------------------------------------- the ring


def test_keys_spread_evenly_over_the_ring():
    for n in (3, 5, 10):
        ring = HashRing([f"dep-{i}" for i in range(n)])
        counts = Counter(homes(ring))
        mean = len(KEYS) / n
        assert len(counts) == n
        assert max(counts.values()) / mean < 1.15, counts
        assert min(counts.values()) / mean > 0.85, counts


def test_a_walk_names_every_deployment_once_home_first():
    ring = HashRing(["a", "b", "c", "d"])
    for k in KEYS[:500]:
        walk = ring.order(k)
        assert sorted(walk) == ["a", "b", "c", "d"]


def test_adding_a_deployment_moves_only_the_keys_it_takes():
    before = homes(HashRing(["a", "b", "c"]))
    after = homes(HashRing(["a", "b", "c", "d"]))
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert all(y == "d" for _, y in moved)  # nothing moves between the old deployments
    assert abs(len(moved) / len(KEYS) - 1 / 4) < 0.05  # and d takes about its fair share


def test_removing_a_deployment_moves_only_its_keys_to_their_next_on_the_ring():
    full = HashRing(["a", "b", "c", "d"])
    without_c = HashRing(["a", "b", "d"])
    for k in KEYS[:5000]:
        walk = full.order(k)
        if walk[0] != "c":
            assert without_c.order(k)[0] == walk[0]
        else:
            assert without_c.order(k)[0] == walk[1]  # where the ring's walk said it would go


def test_every_replica_builds_the_same_ring():
    a, b = HashRing(["x", "y", "z"]), HashRing(["z", "x", "y"])
    assert [a.order(k) for k in KEYS[:1000]] == [b.order(k) for k in KEYS[:1000]]


# ---------------------------------------------------------------- placement


def test_a_keyed_request_goes_home():
    d = place(("b", "a", "c"), views(a=0, b=0, c=0), exclude=frozenset(), epsilon=0.25, slow_factor=3.0)
    assert d.deployment_id == "b" and d.reason is RouteReason.AFFINITY_HOME


def test_home_gone_rehomes_to_the_next_on_the_ring():
    v = views(a=0, b=0, c=0)
    v["b"] = AffinityView(False, 0, None)
    d = place(("b", "c", "a"), v, exclude=frozenset(), epsilon=0.25, slow_factor=3.0)
    assert d.deployment_id == "c" and d.reason is RouteReason.AFFINITY_REHOME


def test_a_hedge_takes_the_next_deployment_on_the_ring():
    d = place(("b", "c", "a"), views(a=0, b=1, c=0), exclude={"b"}, epsilon=0.25, slow_factor=3.0)
    assert d.deployment_id == "c"


def test_home_at_its_bound_spills_to_the_next_on_the_ring():
    # 6 in flight over 3 + this one: bound ceil(1.25 * 7 / 3) = 3; b holds 3 already
    assert load_bound(6, 3, 0.25) == 3
    d = place(("b", "a", "c"), views(a=1, b=3, c=2), exclude=frozenset(), epsilon=0.25, slow_factor=3.0)
    assert d.deployment_id == "a" and d.reason is RouteReason.AFFINITY_SPILL


def test_nothing_usable_on_the_ring_leaves_the_choice_to_usual_routing():
    v = {d: AffinityView(False, 0, None) for d in "abc"}
    assert place(("a", "b", "c"), v, exclude=frozenset(), epsilon=0.25, slow_factor=3.0) is None


def test_a_slow_home_spills_along_the_ring():
    v = {
        "a": AffinityView(True, 0, 100.0),
        "b": AffinityView(True, 0, 400.0),
        "c": AffinityView(True, 0, 120.0),
    }
    assert place(("b", "a", "c"), v, exclude=frozenset(), epsilon=0.25, slow_factor=3.0) == (
        "a",
        RouteReason.AFFINITY_SPILL,
    )
    v["b"] = AffinityView(True, 0, 250.0)  # 2.5x: slower, but its cache is still worth it
    assert place(("b", "a", "c"), v, exclude=frozenset(), epsilon=0.25, slow_factor=3.0)[0] == "b"
    v["b"] = AffinityView(True, 0, 4000.0)  # any slowness at all is fine with slow_factor 0
    assert place(("b", "a", "c"), v, exclude=frozenset(), epsilon=0.25, slow_factor=0.0)[0] == "b"


def test_a_slow_deployment_does_not_count_in_the_others_bound():
    """A slow home holds little: counted in the mean it would push the others over their bound."""
    v = {
        "a": AffinityView(True, 0, 900.0),
        "b": AffinityView(True, 4, 50.0),
        "c": AffinityView(True, 4, 60.0),
    }
    assert place(("a", "b", "c"), v, exclude=frozenset(), epsilon=0.25, slow_factor=3.0) == (
        "b",
        RouteReason.AFFINITY_SPILL,
    )


def test_the_bound_holds_for_any_arrival_order():
    """Place many keyed requests that never finish: no deployment ever exceeds ceil((1+eps) x mean)."""
    ring = HashRing(["a", "b", "c", "d"])
    for eps in (0.1, 0.25, 1.0):
        load = dict.fromkeys("abcd", 0)
        for i, k in enumerate(KEYS[:2000]):
            key = KEYS[i % 7] if i % 2 else k  # half of them on 7 hot keys
            d = place(
                ring.order(key),
                {x: AffinityView(True, n, None) for x, n in load.items()},
                exclude=frozenset(),
                epsilon=eps,
                slow_factor=0.0,
            )
            load[d.deployment_id] += 1
            total = sum(load.values())
            assert max(load.values()) <= math.ceil((1 + eps) * total / 4), (eps, i, load)


# ---------------------------------------------------------------- the engine's view on a fake clock


# Routing decisions never reach a provider: the scripted upstream only fills the client seam.
_NO_UPSTREAM = ScriptedUpstream(FakeClock(), lambda req: Reply())


def _model(**routing) -> ModelRuntime:
    deps = [{"id": i, "base_url": f"http://127.0.0.1:{9 + n}", "region": "us"} for n, i in enumerate("abc")]
    return ModelRuntime(
        ModelConfig(name="chat", deployments=deps, routing={"affinity": "prefix", **routing}),
        _NO_UPSTREAM.client,
    )


def _decide(m: ModelRuntime, key: int, clock: FakeClock, tried: set[str] | None = None):
    cands = [d.candidate(clock(), True) for d in m.deployments]
    return m.affinity.decide(
        key,
        m.deployments,
        cands,
        tried or set(),
        region="us",
        locality=Locality.PREFER,
        stream=True,
        now=clock(),
    )


def test_routing_follows_home_through_ejection_slowness_and_recovery():
    clock = FakeClock()
    m = _model()
    key = KEYS[0]
    home, nxt, _ = m.affinity.ring.order(key)
    by_id = m.by_id
    for d in m.deployments:  # every deployment has a typical first-token time of ~80 ms
        for _ in range(20):
            d.observe(80.0, clock(), True)
    assert _decide(m, key, clock) == (home, RouteReason.AFFINITY_HOME)

    by_id[home].outlier = OutlierState(ejected_until=clock() + 30.0)  # ejected for 30 s
    assert _decide(m, key, clock) == (nxt, RouteReason.AFFINITY_REHOME)
    clock.advance(31.0)  # the ejection ran out: the key goes home again
    assert _decide(m, key, clock) == (home, RouteReason.AFFINITY_HOME)

    for _ in range(
        15
    ):  # home turns 5x slower than the others: while one of its last 16 was fast, it stays ...
        by_id[home].observe(400.0, clock(), True)
        assert _decide(m, key, clock) == (home, RouteReason.AFFINITY_HOME)
    by_id[home].observe(400.0, clock(), True)  # ... when all 16 were slow, it is slow
    assert _decide(m, key, clock) == (nxt, RouteReason.AFFINITY_SPILL)
    clock.advance(61.0)  # its slow samples age out of the window: it is tried again
    for d in m.deployments:
        if d.id != home:
            for _ in range(20):
                d.observe(80.0, clock(), True)
    assert _decide(m, key, clock) == (home, RouteReason.AFFINITY_HOME)


def test_routing_respects_the_bound_with_live_inflight_counts():
    clock = FakeClock()
    m = _model(affinity_epsilon=0.0)
    key = KEYS[1]
    home, nxt, _ = m.affinity.ring.order(key)
    m.by_id[home].inflight = 2  # bound with nothing elsewhere: ceil(1.0 * 3 / 3) = 1
    assert _decide(m, key, clock) == (nxt, RouteReason.AFFINITY_SPILL)


def test_affinity_off_builds_nothing():
    deps = [{"id": "a", "base_url": "http://127.0.0.1:9"}]
    assert ModelRuntime(ModelConfig(name="chat", deployments=deps), _NO_UPSTREAM.client).affinity is None


def test_a_wave_of_cache_misses_is_not_slowness():
    """New or rehomed conversations pay their whole prefill: slow samples, but the deployment is not slow."""
    clock = FakeClock()
    m = _model()
    key = KEYS[2]
    home = m.affinity.ring.order(key)[0]
    for d in m.deployments:
        for _ in range(20):
            d.observe(50.0, clock(), True)  # cache hits
    for _ in range(3):
        for ms in (300.0, 320.0, 50.0, 310.0):  # three misses to one hit, again and again
            m.by_id[home].observe(ms, clock(), True)
            assert _decide(m, key, clock) == (home, RouteReason.AFFINITY_HOME)
    for _ in range(12):  # a gone deployment's conversations arrive: a wave of misses in a row
        m.by_id[home].observe(300.0, clock(), True)
        assert _decide(m, key, clock) == (home, RouteReason.AFFINITY_HOME)
