"""Routing: locality tiers (Envoy priority levels, 1.4 overprovisioning), P2C on live cost, hints, panic."""

from __future__ import annotations

import heapq
import random
from collections import Counter

import pytest
from fake_clock import FakeClock

from gateway.policy.latency import PeakEwma
from gateway.policy.routing import Candidate, Locality, RouteDecision, RouteReason, Strategy, choose

HOME = "eu"


def dep(
    id: str,
    region: str = HOME,
    cost: float = 100.0,
    healthy: bool = True,
    weight: float = 1.0,
    priority: int = 0,
    latency: float | None = None,
    baseline: float | None = None,
) -> Candidate:
    return Candidate(id, region, weight, priority, healthy, cost, latency, baseline)


def route(
    cands, *, strategy=Strategy.LATENCY, locality=Locality.PREFER, home=HOME, seed=0, **kw
) -> RouteDecision:
    return choose(
        cands, strategy=strategy, locality=locality, home_region=home, rng=random.Random(seed), **kw
    )


def tally(cands, n=1000, seed=42, **kw) -> tuple[Counter, Counter]:
    """n decisions with one seeded Random: (picks per deployment, picks per reason)."""
    rng = random.Random(seed)
    kw.setdefault("strategy", Strategy.LATENCY)
    kw.setdefault("locality", Locality.PREFER)
    kw.setdefault("home_region", HOME)
    ids, reasons = Counter(), Counter()
    for i in range(n):
        d = choose(cands, rng=rng, rr_counter=i, **kw)
        ids[d.deployment_id] += 1
        reasons[d.reason] += 1
    return ids, reasons


# ---------------------------------------------------------------- P2C on cost


def test_p2c_between_two_always_takes_the_cheaper():
    ids, _ = tally([dep("fast", cost=100), dep("slow", cost=300)])
    assert ids == {"fast": 1000}


def test_p2c_never_picks_the_most_expensive_of_several():
    cands = [dep(f"d{i}", cost=100.0 * (i + 1)) for i in range(4)]
    ids, _ = tally(cands)
    assert ids["d3"] == 0
    assert ids["d0"] == pytest.approx(500, abs=60)  # the cheapest wins whenever drawn: P = 1 - C(3,2)/C(4,2)


def test_p2c_with_live_cost_sends_over_90_percent_to_a_deployment_3x_faster():
    """Scenario: 1000 requests at 5/s, two deployments (100 ms vs 300 ms, +-20% jitter). The cost is the
    real PeakEwma times (inflight + 1), fed by completions on a fake clock; nothing is fixed up front.
    (At higher rates the inflight factor shares more with the slow one: at 20/s about 13% goes there.)"""
    clock, rng = FakeClock(), random.Random(7)
    base = {"fast": 100.0, "slow": 300.0}
    ewma = {k: PeakEwma(decay_s=10.0) for k in base}
    inflight = Counter()
    done: list[tuple[float, str, float]] = []  # (completes_at, deployment, latency_ms)
    picks = Counter()
    for _ in range(1000):
        while done and done[0][0] <= clock():
            at, k, ms = heapq.heappop(done)
            inflight[k] -= 1
            ewma[k].observe(ms, at)
        cands = [dep(k, cost=ewma[k].value(clock()) * (inflight[k] + 1)) for k in base]
        k = choose(
            cands, strategy=Strategy.LATENCY, locality=Locality.PREFER, home_region=HOME, rng=rng
        ).deployment_id
        picks[k] += 1
        inflight[k] += 1
        ms = base[k] * rng.uniform(0.8, 1.2)
        heapq.heappush(done, (clock() + ms / 1000.0, k, ms))
        clock.advance(0.2)
    assert picks["fast"] > 900
    assert picks["slow"] > 0  # the slow one is still probed now and then, so a recovery would be seen


def test_cost_ties_are_broken_at_random_so_new_deployments_share_the_first_requests():
    ids, _ = tally([dep("a", cost=0.0), dep("b", cost=0.0)])
    assert ids["a"] == pytest.approx(500, abs=60)


def test_p2c_draws_by_weight():
    # Equal cost: the winner is the first draw, so picks follow the 3:1 weights.
    ids, _ = tally([dep("big", weight=3), dep("small", weight=1)])
    assert ids["big"] == pytest.approx(750, abs=50)


# ---------------------------------------------------------------- other strategies


def test_weighted_follows_the_weights():
    ids, _ = tally([dep("a", weight=3), dep("b", weight=1), dep("c", weight=0)], strategy=Strategy.WEIGHTED)
    assert ids["a"] == pytest.approx(750, abs=50)
    assert ids["c"] == 0  # weight 0 = drained


def test_weighted_with_all_weights_zero_is_uniform():
    ids, _ = tally([dep("a", weight=0), dep("b", weight=0)], strategy=Strategy.WEIGHTED)
    assert ids["a"] == pytest.approx(500, abs=60)


def test_round_robin_walks_the_eligible_list_in_order():
    cands = [dep("a"), dep("b", healthy=False), dep("c"), dep("d")]
    picks = [route(cands, strategy=Strategy.ROUND_ROBIN, rr_counter=i).deployment_id for i in range(6)]
    assert picks == ["a", "c", "d", "a", "c", "d"]


def test_priority_uses_the_lowest_priority_number_that_has_a_healthy_deployment():
    cands = [dep("primary", priority=0, cost=500), dep("backup", priority=1, cost=10)]
    ids, _ = tally(cands, strategy=Strategy.PRIORITY)
    assert ids == {"primary": 1000}  # cheaper backups do not matter
    cands[0] = dep("primary", priority=0, healthy=False)
    assert route(cands, strategy=Strategy.PRIORITY).deployment_id == "backup"


def test_priority_balances_within_a_level_by_p2c():
    cands = [
        dep("p0-fast", priority=0, cost=100),
        dep("p0-slow", priority=0, cost=300),
        dep("p1", priority=1, cost=1),
    ]
    ids, _ = tally(cands, strategy=Strategy.PRIORITY)
    assert ids == {"p0-fast": 1000}


# ---------------------------------------------------------------- locality "prefer"


def test_prefer_keeps_all_traffic_local_while_local_is_healthy():
    cands = [dep("eu-1"), dep("eu-2"), dep("us-1", "us", cost=60), dep("us-2", "us", cost=60)]
    ids, reasons = tally(cands)
    assert ids["us-1"] + ids["us-2"] == 0
    assert reasons == {RouteReason.LOCAL: 1000}


def test_overprovisioning_absorbs_a_small_loss_of_local_health():
    # 3 of 4 healthy: 1.4 * 0.75 = 1.05 >= 1, so local still takes everything.
    cands = [dep("eu-1"), dep("eu-2"), dep("eu-3"), dep("eu-4", healthy=False), dep("us-1", "us")]
    _, reasons = tally(cands)
    assert reasons == {RouteReason.LOCAL: 1000}


def test_spill_share_follows_the_overprovisioning_factor_when_half_the_local_deployments_are_down():
    # 2 of 4 healthy: local keeps 1.4 * 0.5 = 70%, 30% spills over.
    cands = [
        dep("eu-1"),
        dep("eu-2"),
        dep("eu-3", healthy=False),
        dep("eu-4", healthy=False),
        dep("us-1", "us"),
        dep("us-2", "us"),
    ]
    ids, reasons = tally(cands, n=2000)
    assert reasons[RouteReason.SPILLOVER] / 2000 == pytest.approx(0.30, abs=0.03)
    assert reasons[RouteReason.LOCAL] + reasons[RouteReason.SPILLOVER] == 2000
    assert ids["eu-3"] == ids["eu-4"] == 0


def test_spill_grows_as_local_health_drops():
    shares = []
    for healthy_local in (4, 3, 2, 1):
        cands = [dep(f"eu-{i}", healthy=i < healthy_local) for i in range(5)] + [dep("us-1", "us")]
        _, reasons = tally(cands, n=2000)
        shares.append(reasons[RouteReason.SPILLOVER] / 2000)
    expected = [max(0.0, 1 - 1.4 * h / 5) for h in (4, 3, 2, 1)]  # 0, 0.16, 0.44, 0.72
    assert shares == pytest.approx(expected, abs=0.04)


def test_all_local_down_fails_over_to_remote_at_once():
    cands = [dep("eu-1", healthy=False), dep("us-1", "us"), dep("us-2", "us")]
    ids, reasons = tally(cands)
    assert ids["eu-1"] == 0
    assert reasons == {RouteReason.FAILOVER: 1000}


def test_a_single_remote_survivor_is_still_named_a_failover():
    d = route([dep("eu-1", healthy=False), dep("us-1", "us")])
    assert d == RouteDecision("us-1", RouteReason.FAILOVER)


def test_a_clearly_slower_local_deployment_sends_traffic_to_the_faster_region():
    # Local 300 ms vs remote 100 ms + 50 ms penalty: remote is worth the trip.
    cands = [dep("eu-1", cost=300), dep("us-1", "us", cost=100)]
    ids, reasons = tally(cands)
    assert ids == {"us-1": 1000}
    assert reasons == {RouteReason.SPILLOVER: 1000}


def test_a_local_deployment_within_the_penalty_keeps_its_traffic():
    cands = [dep("eu-1", cost=140), dep("us-1", "us", cost=100)]
    assert tally(cands, cross_region_penalty_ms=50)[0] == {"eu-1": 1000}
    assert tally(cands, cross_region_penalty_ms=30)[0] == {"us-1": 1000}


def test_a_remote_deployment_without_data_is_no_evidence_that_local_is_slow():
    cands = [dep("eu-1", cost=300), dep("us-1", "us", cost=0.0)]
    assert tally(cands)[1] == {RouteReason.LOCAL: 1000}


def test_the_load_free_latency_is_compared_when_given_so_a_busy_local_is_not_mistaken_for_slow():
    # Local: 100 ms but 5 requests in flight (cost 600); remote: 100 ms idle (cost 100).
    cands = [dep("eu-1", cost=600, latency=100), dep("us-1", "us", cost=100, latency=100)]
    assert tally(cands)[1] == {RouteReason.LOCAL: 1000}
    cands = [dep("eu-1", cost=600), dep("us-1", "us", cost=100)]  # without it, cost decides
    assert tally(cands)[1] == {RouteReason.SPILLOVER: 1000}


def test_local_much_slower_than_its_baseline_tries_a_remote_without_data():
    # Local usually 60 ms, now 180 ms; the remote has never been tried: one request goes to find out.
    cands = [dep("eu-1", cost=180, latency=180, baseline=62), dep("us-1", "us", cost=0.0, latency=0.0)]
    assert tally(cands, cross_region_penalty_ms=30)[1] == {RouteReason.SPILLOVER: 1000}


def test_local_at_its_usual_level_or_one_outlier_above_does_not_explore_a_remote_without_data():
    for now_ms in (80, 140):  # 140: a single slow answer lifts the peak estimate; not enough to explore
        cands = [
            dep("eu-1", cost=now_ms, latency=now_ms, baseline=60),
            dep("us-1", "us", cost=0.0, latency=0.0),
        ]
        assert tally(cands, cross_region_penalty_ms=30)[1] == {RouteReason.LOCAL: 1000}


def test_a_remote_estimate_that_decayed_while_unused_is_stale_not_fast():
    # us-1 usually answers in 100 ms; unused for a while, its estimate decayed to 20. Local 100 stays.
    cands = [
        dep("eu-1", cost=100, latency=100, baseline=100),
        dep("us-1", "us", cost=20, latency=20, baseline=100),
    ]
    assert tally(cands, cross_region_penalty_ms=30)[1] == {RouteReason.LOCAL: 1000}
    # Local clearly slower than the remote's usual level still spills:
    cands = [
        dep("eu-1", cost=160, latency=160, baseline=100),
        dep("us-1", "us", cost=20, latency=20, baseline=100),
    ]
    assert tally(cands, cross_region_penalty_ms=30)[1] == {RouteReason.SPILLOVER: 1000}


def test_a_decayed_local_estimate_is_what_lets_a_recovered_local_region_back_in():
    # Local was 300 (spilled), unused since, decayed to 90: no longer clearly slower than remote 100 + 30.
    cands = [
        dep("eu-1", cost=90, latency=90, baseline=250),
        dep("us-1", "us", cost=100, latency=100, baseline=100),
    ]
    assert tally(cands, cross_region_penalty_ms=30)[1] == {RouteReason.LOCAL: 1000}


def test_exploration_needs_the_load_free_latency_so_load_is_not_mistaken_for_slowness():
    cands = [dep("eu-1", cost=180, baseline=60), dep("us-1", "us", cost=0.0)]
    assert tally(cands, cross_region_penalty_ms=30)[1] == {RouteReason.LOCAL: 1000}


def test_a_slow_local_region_loses_its_traffic_and_gets_it_back_after_recovering():
    """Scenario (the e2e one, on a fake clock): us-east gateway, local "us" and remote "eu" both 60 ms.
    Local turns 180 ms, then recovers. Real PeakEwmas (decay 1 s), sequential requests."""
    clock, rng = FakeClock(), random.Random(1)
    ttft = {"us": 60.0, "eu": 60.0}
    regions = {"us": "us-east", "eu": "eu-west"}
    ewma = {k: PeakEwma(decay_s=1.0) for k in ttft}

    def post(outlier: bool = False) -> RouteDecision:
        t = clock()
        cands = [
            Candidate(k, regions[k], 1.0, 0, True, ewma[k].value(t), ewma[k].value(t), ewma[k].baseline_ms)
            for k in ttft
        ]
        d = choose(
            cands,
            strategy=Strategy.LATENCY,
            locality=Locality.PREFER,
            home_region="us-east",
            cross_region_penalty_ms=30,
            rng=rng,
        )
        ms = ttft[d.deployment_id] * rng.uniform(0.95, 1.05) * (1.8 if outlier else 1.0)
        clock.advance(ms / 1000)
        ewma[d.deployment_id].observe(ms, clock())
        clock.advance(0.01)
        return d

    healthy = [post(outlier=i % 7 == 6).deployment_id for i in range(30)]  # with an occasional slow answer
    assert healthy == ["us"] * 30  # all local, eu never tried
    ttft["us"] = 180.0
    slow = [post() for _ in range(40)]
    assert [d.deployment_id for d in slow[:2]] == ["us", "eu"]  # one slow answer, then eu is tried
    assert [d.deployment_id for d in slow[-20:]].count("eu") >= 17  # local is re-probed as it decays
    assert {d.reason for d in slow if d.deployment_id == "eu"} == {RouteReason.SPILLOVER}
    ttft["us"] = 60.0
    clock.advance(2.5)
    back = [post().deployment_id for _ in range(30)]
    assert back[-15:].count("us") >= 13


def test_no_local_deployment_at_all_routes_remote():
    cands = [dep("us-1", "us"), dep("us-2", "us")]
    _, reasons = tally(cands)
    assert reasons == {RouteReason.REMOTE: 1000}


def test_the_region_header_overrides_the_home_region():
    cands = [dep("eu-1"), dep("us-1", "us")]
    assert route(cands, preferred_region="us") == RouteDecision("us-1", RouteReason.LOCAL)


def test_a_gateway_without_a_region_treats_every_deployment_as_local():
    cands = [dep("eu-1", cost=100), dep("us-1", "us", cost=300)]
    ids, reasons = tally(cands, home_region=None)
    assert ids == {"eu-1": 1000}
    assert reasons == {RouteReason.LOCAL: 1000}


# ---------------------------------------------------------------- locality "strict" and "off"


def test_strict_never_leaves_the_region_and_panics_inside_it():
    cands = [dep("eu-1", healthy=False), dep("eu-2", healthy=False), dep("us-1", "us")]
    ids, reasons = tally(cands, locality=Locality.STRICT)
    assert ids["us-1"] == 0
    assert reasons == {RouteReason.PANIC: 1000}


def test_strict_with_no_deployment_in_the_region_has_no_answer():
    cands = [dep("us-1", "us")]
    assert route(cands, locality=Locality.STRICT) is None


def test_strict_with_one_healthy_in_region_is_the_only_choice():
    cands = [dep("eu-1"), dep("eu-2", healthy=False), dep("us-1", "us")]
    assert route(cands, locality=Locality.STRICT) == RouteDecision("eu-1", RouteReason.ONLY_CHOICE)


def test_strict_balances_within_the_region():
    cands = [dep("eu-1", cost=100), dep("eu-2", cost=300), dep("us-1", "us", cost=1)]
    ids, reasons = tally(cands, locality=Locality.STRICT)
    assert ids == {"eu-1": 1000}
    assert reasons == {RouteReason.LOCAL: 1000}


def test_off_picks_across_regions_and_says_whether_the_pick_was_local():
    cands = [dep("eu-1", cost=300), dep("us-1", "us", cost=100)]
    assert route(cands, locality=Locality.OFF) == RouteDecision("us-1", RouteReason.REMOTE)
    cands = [dep("eu-1", cost=100), dep("us-1", "us", cost=300)]
    assert route(cands, locality=Locality.OFF) == RouteDecision("eu-1", RouteReason.LOCAL)


# ---------------------------------------------------------------- hints, exclusion, panic


def test_a_pinned_deployment_wins_even_when_unhealthy_or_already_tried():
    cands = [dep("eu-1"), dep("us-1", "us", healthy=False)]
    d = route(cands, pinned="us-1", exclude=frozenset({"us-1"}), locality=Locality.STRICT)
    assert d == RouteDecision("us-1", RouteReason.PINNED)


def test_an_unknown_pin_is_ignored():
    assert route([dep("eu-1")], pinned="nope") == RouteDecision("eu-1", RouteReason.ONLY_CHOICE)


def test_a_retry_goes_to_a_deployment_not_yet_tried():
    cands = [dep("eu-1", cost=100), dep("eu-2", cost=900)]
    ids, _ = tally(cands, exclude=frozenset({"eu-1"}))
    assert ids == {"eu-2": 1000}


def test_a_retry_with_every_local_tried_fails_over_to_remote():
    cands = [dep("eu-1"), dep("us-1", "us"), dep("us-2", "us")]
    _, reasons = tally(cands, exclude=frozenset({"eu-1"}))
    assert reasons == {RouteReason.FAILOVER: 1000}


def test_when_everything_was_tried_the_tried_ones_are_allowed_again():
    cands = [dep("eu-1", cost=100), dep("eu-2", cost=200)]
    ids, _ = tally(cands, exclude=frozenset({"eu-1", "eu-2"}))
    assert ids == {"eu-1": 1000}


def test_nothing_healthy_routes_anyway_in_panic():
    cands = [dep("eu-1", healthy=False), dep("us-1", "us", healthy=False)]
    ids, reasons = tally(cands)
    assert reasons == {RouteReason.PANIC: 1000}
    assert set(ids) <= {"eu-1", "us-1"}


def test_a_single_healthy_deployment_is_the_only_choice():
    cands = [dep("eu-1"), dep("eu-2", healthy=False)]
    assert route(cands) == RouteDecision("eu-1", RouteReason.ONLY_CHOICE)
    assert route(cands[:1], locality=Locality.OFF) == RouteDecision("eu-1", RouteReason.ONLY_CHOICE)


def test_no_candidates_no_decision():
    assert route([]) is None


def test_a_fully_healthy_local_tier_consumes_no_randomness():
    # Deterministic routing while all is well makes logs and tests reproducible.
    rng = random.Random(5)
    state = rng.getstate()
    cands = [dep("eu-1"), dep("us-1", "us")]
    choose(cands, strategy=Strategy.ROUND_ROBIN, locality=Locality.PREFER, home_region=HOME, rng=rng)
    assert rng.getstate() == state


def test_reason_values_are_the_names_in_the_access_log():
    assert [r.value for r in RouteReason] == [
        "local",
        "spillover",
        "failover",
        "pinned",
        "only-choice",
        "panic",
        "remote",
        "affinity-home",
        "affinity-rehome",
        "affinity-spill",
        "probe",
    ]


# ------------------------------------------------------------------ probes (routing.probe_interval_s)


def stamp(id: str, picked_at: float | None, cost: float = 100.0, region: str = HOME) -> Candidate:
    return Candidate(id, region, 1.0, 0, True, cost, picked_at=picked_at)


def probe_route(cands, now=1000.0, interval=5.0, **kw) -> RouteDecision:
    return route(cands, now=now, probe_interval_s=interval, **kw)


def test_a_deployment_unpicked_for_the_interval_while_another_was_picked_is_probed():
    cands = [stamp("a", 999.9, cost=100.0), stamp("b", 994.0, cost=3000.0)]
    assert probe_route(cands) == RouteDecision("b", RouteReason.PROBE)
    assert probe_route(cands, interval=0.0) == RouteDecision("a", RouteReason.LOCAL)  # 0: never
    assert probe_route(cands, interval=7.0) == RouteDecision("a", RouteReason.LOCAL)  # not yet due


def test_the_one_left_unpicked_longest_is_probed_first():
    cands = [stamp("a", 999.9), stamp("b", 990.0, cost=900.0), stamp("c", 980.0, cost=800.0)]
    assert probe_route(cands) == RouteDecision("c", RouteReason.PROBE)


def test_a_deployment_without_an_estimate_is_not_probed_it_looks_free_and_wins_its_draws():
    cands = [stamp("a", 999.9, cost=100.0), stamp("b", 0.0, cost=0.0)]
    assert probe_route(cands) == RouteDecision("b", RouteReason.LOCAL)


def test_no_probe_without_a_fresh_pick_so_light_traffic_is_routed_by_cost_alone():
    cands = [stamp("a", 990.0, cost=100.0), stamp("b", 980.0, cost=3000.0)]
    assert probe_route(cands) == RouteDecision("a", RouteReason.LOCAL)


def test_an_attempt_in_flight_reads_as_picked_now_so_one_probe_at_most_is_in_flight():
    # The caller stamps a deployment with an attempt in flight "now": no second probe while the first runs.
    cands = [stamp("a", 999.9, cost=100.0), stamp("b", 1000.0, cost=6000.0)]
    assert probe_route(cands) == RouteDecision("a", RouteReason.LOCAL)


def test_probes_are_for_latency_routing_and_healthy_deployments_only():
    cands = [stamp("a", 999.9), stamp("b", 990.0, cost=3000.0)]
    for strategy in (Strategy.WEIGHTED, Strategy.ROUND_ROBIN, Strategy.PRIORITY):
        assert probe_route(cands, strategy=strategy).reason is not RouteReason.PROBE
    sick = [stamp("a", 999.9), stamp("c", 999.9), stamp("b", 990.0)._replace(healthy=False)]
    assert probe_route(sick).deployment_id != "b"
    assert probe_route(cands, pinned="a") == RouteDecision("a", RouteReason.PINNED)
    assert probe_route(cands, exclude=frozenset({"a"})) == RouteDecision("b", RouteReason.ONLY_CHOICE)


def test_probes_stay_in_the_tier_locality_chose():
    # prefer: a healthy local tier keeps its traffic; a remote unpicked for long is not probed from it.
    cands = [stamp("eu-1", 999.9), stamp("eu-2", 990.0, cost=3000.0), stamp("us-1", 900.0, region="us")]
    assert probe_route(cands) == RouteDecision("eu-2", RouteReason.PROBE)
    local_only = [stamp("eu-1", 999.9), stamp("us-1", 900.0, region="us")]
    assert probe_route(local_only) == RouteDecision("eu-1", RouteReason.LOCAL)
    strict = [stamp("eu-1", 999.9), stamp("eu-2", 990.0, cost=3000.0), stamp("us-1", 900.0, region="us")]
    assert probe_route(strict, locality=Locality.STRICT) == RouteDecision("eu-2", RouteReason.PROBE)
    assert probe_route(cands, locality=Locality.OFF) == RouteDecision("us-1", RouteReason.PROBE)


def _outlier_playbook(probe_interval_s: float, b_after_ms: float = 60.0):
    """Two deployments, a (100 ms) and b (usually 60 ms), 20 requests/s on a fake clock, real PeakEwmas
    (decay 10 s, the default) times (inflight + 1), and picked_at kept as the engine keeps it. At t=10 s
    one answer of b takes 3 s; afterwards b answers in ``b_after_ms``. Returns (picks as (t, deployment,
    reason), when b's outlier sample landed, the most b probes in flight at once)."""
    clock, rng = FakeClock(), random.Random(3)
    t0 = clock()
    base = {"a": 100.0, "b": 60.0}
    ewma = {k: PeakEwma(decay_s=10.0) for k in base}
    inflight: Counter = Counter()
    picked_at = dict.fromkeys(base, 0.0)
    done: list[tuple[float, str, float, bool]] = []  # (completes_at, deployment, latency_ms, probe)
    picks: list[tuple[float, str, RouteReason]] = []
    outlier_sent, outlier_at, probes_in_flight, most_probes = False, None, 0, 0
    while clock() < t0 + 60.0:
        while done and done[0][0] <= clock():
            at, k, ms, probe = heapq.heappop(done)
            inflight[k] -= 1
            probes_in_flight -= probe
            ewma[k].observe(ms, at, probe)
            if ms >= 3000.0 and outlier_at is None:
                outlier_at = at - t0
        now = clock()
        cands = [
            Candidate(
                k,
                HOME,
                1.0,
                0,
                True,
                ewma[k].value(now) * (inflight[k] + 1),
                picked_at=now if inflight[k] else picked_at[k],
            )
            for k in base
        ]
        d = choose(
            cands,
            strategy=Strategy.LATENCY,
            locality=Locality.PREFER,
            home_region=HOME,
            rng=rng,
            now=now,
            probe_interval_s=probe_interval_s,
        )
        k = d.deployment_id
        picks.append((now - t0, k, d.reason))
        picked_at[k] = now
        inflight[k] += 1
        probe = d.reason is RouteReason.PROBE
        probes_in_flight += probe
        most_probes = max(most_probes, probes_in_flight)
        ms = base[k] * rng.uniform(0.9, 1.1)
        if k == "b" and now - t0 >= 10.0:
            if not outlier_sent:
                ms, outlier_sent = 3000.0, True
            else:
                ms = b_after_ms * rng.uniform(0.9, 1.1)
        heapq.heappush(done, (now + ms / 1000.0, k, ms, probe))
        clock.advance(0.05)
    assert outlier_at is not None
    return picks, outlier_at, most_probes


def _b_share(picks, start: float, end: float) -> float:
    window = [k for t, k, _ in picks if start <= t < end]
    return window.count("b") / len(window)


def test_playbook_one_outlier_takes_b_out_of_rotation_until_its_estimate_decays_without_probes():
    picks, outlier_at, _ = _outlier_playbook(probe_interval_s=0.0)
    assert _b_share(picks, 0.0, 10.0) > 0.5  # b is the better one
    back = next(t for t, k, _ in picks if k == "b" and t > outlier_at)
    assert back > outlier_at + 20.0, back  # nothing until decay alone brings it back (~22 s here)
    assert all(r is not RouteReason.PROBE for _, _, r in picks)


def test_playbook_a_probe_measures_b_again_and_its_traffic_returns_within_the_probe_interval():
    picks, outlier_at, most_probes = _outlier_playbook(probe_interval_s=5.0)
    probes = [(t, k) for t, k, r in picks if r is RouteReason.PROBE]
    first = next(t for t, k in probes if t > outlier_at)
    assert first <= outlier_at + 5.1  # b unpicked since just before its outlier landed: probed 5 s on
    # The probe's fast sample replaces the outlier's estimate: b is the better deployment again at once.
    assert _b_share(picks, first + 0.5, first + 10.0) > 0.5
    assert most_probes == 1
    assert len(probes) <= 3  # a share of 20 requests/s that rounds to nothing


def test_playbook_a_deployment_still_slow_gets_one_probe_per_interval_and_no_more():
    picks, outlier_at, most_probes = _outlier_playbook(probe_interval_s=5.0, b_after_ms=3000.0)
    after = [(t, k, r) for t, k, r in picks if t > outlier_at]
    b_picks = [(t, r) for t, k, r in after if k == "b"]
    assert b_picks and all(r is RouteReason.PROBE for _, r in b_picks)
    # b is due again 5 s after a probe started (each takes 3 s): about 9 in the 47 s after the outlier
    gaps = [b[0] - a[0] for a, b in zip(b_picks, b_picks[1:], strict=False)]
    assert len(b_picks) >= 8 and all(5.0 <= g < 5.2 for g in gaps), b_picks
    assert most_probes == 1


class _Replica:
    """One gateway process of a shared-state playbook: its estimates, in-flight counts, picks, publication."""

    def __init__(self, seed: int, sends_until: float) -> None:
        self.ewma = {k: PeakEwma(decay_s=10.0) for k in ("a", "b")}
        self.inflight: Counter = Counter()
        self.picked_at = dict.fromkeys(self.ewma, 0.0)
        self.rng = random.Random(seed)
        self.sends_until = sends_until
        self.published: dict[str, tuple[float, int, float | None]] = {}
        self.merged: list[tuple[float, float, float]] = []  # (t, a, b) after each merge round

    def publish(self, now: float) -> None:
        """As engine/sync.py: each estimate, its own sample count, the age of its latest own sample."""
        self.published = {
            k: (e.value(now), e.samples, now - e.observed_at if e.samples else None)
            for k, e in self.ewma.items()
        }

    def merge(self, other: _Replica, now: float, ages: bool, t: float) -> None:
        for k, (value, n, age) in other.published.items():
            if n:
                observed_at = now - age if ages and age is not None else None  # None: an older replica
                self.ewma[k].merge_remote(value, n, now, observed_at=observed_at)
        self.merged.append((t, self.ewma["a"].value(now), self.ewma["b"].value(now)))


def _shared_playbook(ages: bool):
    """Two replicas, r0 and r1, routing between a (100 ms) and b (60 ms) with probes every 5 s, on one
    fake clock, sharing estimates as engine/sync.py does: every 0.5 s (r1 0.25 s after r0) each
    publishes and merges what the other published last, with (``ages``) or without the ages of the
    samples behind them. Requests to b started in [10 s, 10.2 s) take 3 s, seen by both; r0 sends 20
    requests/s throughout, r1 the same until 10.2 s, then nothing: it never probes b, and what it learns
    of b afterwards comes from r0. Returns r0's picks as (t, deployment, reason) and r1's merges."""
    clock, base = FakeClock(), {"a": 100.0, "b": 60.0}
    t0 = clock()
    reps = [_Replica(3, sends_until=60.0), _Replica(4, sends_until=10.2)]
    done: list[tuple[float, int, str, float, bool]] = []  # (completes_at, replica, deployment, ms, probe)
    picks: list[tuple[float, str, RouteReason]] = []
    for tick in range(int(40.0 / 0.025)):
        now = clock()
        t = now - t0
        while done and done[0][0] <= now:
            at, i, k, ms, probe = heapq.heappop(done)
            reps[i].inflight[k] -= 1
            reps[i].ewma[k].observe(ms, at, probe)
        for r, rep in enumerate(reps):
            if tick % 20 == 10 * r:  # every 0.5 s, r1 0.25 s after r0
                rep.publish(now)
                rep.merge(reps[1 - r], now, ages, t)
            if tick % 2 != r or t >= rep.sends_until:  # 20 requests/s each, 25 ms apart
                continue
            cands = [
                Candidate(
                    k,
                    HOME,
                    1.0,
                    0,
                    True,
                    e.value(now) * (rep.inflight[k] + 1),
                    picked_at=now if rep.inflight[k] else rep.picked_at[k],
                )
                for k, e in rep.ewma.items()
            ]
            d = choose(
                cands,
                strategy=Strategy.LATENCY,
                locality=Locality.PREFER,
                home_region=HOME,
                rng=rep.rng,
                now=now,
                probe_interval_s=5.0,
            )
            k = d.deployment_id
            if r == 0:
                picks.append((t, k, d.reason))
            rep.picked_at[k] = now
            rep.inflight[k] += 1
            ms = 3000.0 if k == "b" and 10.0 <= t < 10.2 else base[k] * rep.rng.uniform(0.9, 1.1)
            heapq.heappush(done, (now + ms / 1000.0, r, k, ms, d.reason is RouteReason.PROBE))
        clock.advance(0.025)
    return picks, reps[1].merged


def test_playbook_two_replicas_a_stale_remote_estimate_does_not_pull_back_a_probe_answer():
    # r1 has sent b nothing since its slow answers: its estimate of b is stale, and still inflated.
    picks, _ = _shared_playbook(ages=True)
    probes = [t for t, k, r in picks if r is RouteReason.PROBE]
    assert len(probes) == 1 and 13.0 < probes[0] < 18.5, probes  # 5 s after b was last picked
    assert _b_share(picks, probes[0] + 0.5, probes[0] + 5.0) > 0.5  # b's traffic is back at once
    # Without ages (a replica that publishes none merges as before them), r1's view pulls r0's probe
    # answer back up at the next sync round: b stays out until a second probe, and longer.
    old, _ = _shared_playbook(ages=False)
    old_probes = [t for t, k, r in old if r is RouteReason.PROBE]
    assert old_probes[0] == probes[0] and len(old_probes) >= 2, old_probes
    assert _b_share(old, old_probes[0] + 0.5, old_probes[0] + 5.0) < 0.1


def test_playbook_two_replicas_a_fresher_remote_estimate_still_moves_the_other():
    # r1 never probes b itself: r0's probe answer, newer than r1's own samples, is what brings b back there.
    picks, r1 = _shared_playbook(ages=True)
    probe = next(t for t, k, r in picks if r is RouteReason.PROBE)
    before = [b for t, a, b in r1 if t < probe]
    assert before[-1] > 1000.0  # r1's own slow answers, and r0's before its probe
    after = [(t, a, b) for t, a, b in r1 if t > probe]
    # Each round moves r1's view of b half way (MAX_REMOTE_WEIGHT) to r0's, which its own older samples
    # do not move back: from ~1,600 ms to below a's ~100 ms in five rounds, once r0 has published it.
    assert all(later[2] < earlier[2] for earlier, later in zip(after, after[1:6], strict=False)), after
    back = next(t for t, a, b in after if b < a)  # r1 would route to b again
    assert back < probe + 3.0, (probe, back)
    assert all(b < 80.0 for t, a, b in after if t > back + 1.0)
