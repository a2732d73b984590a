"""Region- and latency-aware routing with shared state, through real gateways and simulators."""

from __future__ import annotations

import collections
import time

from harness import HTTP, Sims, dep, metric_value, model, shared_state, wait_until

BASE = {"ttft_ms": 60, "ttft_dist": "fixed", "itl_ms": 2, "tokens": 2, "tail_p": 0}


def _post(gw, headers=None, stream=True):
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers=headers or {},
        timeout=30,
        json={"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 200, r.text
    return r.headers["x-gateway-upstream"]


def _two_regions(sims_factory, gateways, routing=None, state=None, n_gateways=1):
    sims = sims_factory({"sim-us": ("us-east", BASE), "sim-eu": ("eu-west", BASE)})
    cfg = {
        "server": {"region": "us-east"},
        "models": [
            model(
                "chat",
                [
                    dep("us", sims.base_url("sim-us"), region="us-east"),
                    dep("eu", sims.base_url("sim-eu"), region="eu-west"),
                ],
                routing={"ewma_decay_s": 1.0, "cross_region_penalty_ms": 30, **(routing or {})},
                outlier={"consecutive_failures": 2, "base_ejection_s": 1},
                retry={"backoff_base_ms": 1},
            )
        ],
    }
    if state:
        cfg["state"] = state
    gws = [gateways(cfg) for _ in range(n_gateways)]
    return sims, gws


def test_traffic_stays_local_while_local_is_healthy(sims_factory, gateways):
    _, (gw,) = _two_regions(sims_factory, gateways)
    picks = collections.Counter(_post(gw) for _ in range(30))
    assert picks == {"us": 30}
    assert {r["route_reason"] for r in gw.records(wait_for=30)} == {"local"}


def test_slow_local_region_spills_over_and_comes_back(sims_factory, gateways):
    sims, (gw,) = _two_regions(sims_factory, gateways)
    for _ in range(5):
        _post(gw)
    sims.set("sim-us", ttft_ms=180)  # 3x slower
    picks = [_post(gw) for _ in range(40)]
    moved_after = next(i for i in range(len(picks)) if picks[i : i + 10].count("eu") >= 9)
    assert moved_after <= 10, picks
    assert picks[-20:].count("eu") >= 18, picks
    sims.set("sim-us", ttft_ms=60)  # recovered
    time.sleep(2.5)  # estimates decay, so the local region is tried again
    back = [_post(gw) for _ in range(30)]
    assert back[-15:].count("us") >= 13, back
    reasons = {r["route_reason"] for r in gw.records(wait_for=75)}
    assert {"local", "spillover"} <= reasons


def test_failed_local_deployment_fails_over_at_once(sims_factory, gateways):
    sims, (gw,) = _two_regions(sims_factory, gateways)
    sims.set("sim-us", error_rate=1.0, error_status=503)
    first = HTTP.post(gw.url + "/v1/chat/completions", json={"model": "chat", "messages": []}, timeout=10)
    assert first.status_code == 200 and first.headers["x-gateway-upstream"] == "eu"
    for _ in range(5):
        assert _post(gw, stream=False) == "eu"
    recs = gw.records(wait_for=6)
    assert recs[0]["retry_count"] == 1
    assert "failover" in {r["route_reason"] for r in recs[2:]}


def test_hints_prefer_a_region_and_pin_a_deployment(sims_factory, gateways):
    _, (gw,) = _two_regions(sims_factory, gateways)
    assert _post(gw, {"x-gateway-region": "eu-west"}) == "eu"
    assert _post(gw, {"x-gateway-deployment": "eu"}) == "eu"
    recs = gw.records(wait_for=2)
    assert recs[-1]["route_reason"] == "pinned"
    # a pin that cannot hold is said, not silently routed elsewhere
    r = HTTP.post(
        gw.url + "/v1/chat/completions",
        headers={"x-gateway-deployment": "nope"},
        json={"model": "chat", "messages": []},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_header"
    assert err["message"] == (
        "x-gateway-deployment: 'nope' is not a deployment of model 'chat' (its deployments: us, eu)."
    )
    refused = gw.records(wait_for=3)[-1]
    assert (refused["response_code"], refused["response_flags"], refused["attempts"]) == (400, "BR", 0)


def test_strict_locality_never_leaves_the_region(sims_factory, gateways):
    sims, (gw,) = _two_regions(sims_factory, gateways, routing={"locality": "strict"})
    sims.set("sim-us", ttft_ms=200)
    assert {_post(gw) for _ in range(15)} == {"us"}


def test_round_robin_alternates(sims_factory, gateways):
    _, (gw,) = _two_regions(sims_factory, gateways, routing={"strategy": "round-robin", "locality": "off"})
    picks = [_post(gw) for _ in range(10)]
    assert picks.count("us") == 5 and picks.count("eu") == 5


def _view(gw) -> dict:
    return {d["deployment"]: d for d in HTTP.get(gw.url + "/admin/deployments").json()["deployments"]}


def test_two_gateways_sharing_redis_converge(sims_factory, gateways, redis_prefix):
    state = shared_state(redis_prefix)
    sims, (gw1, gw2) = _two_regions(
        sims_factory, gateways, state=state, n_gateways=2, routing={"ewma_decay_s": 30.0}
    )
    sims.set("sim-us", ttft_ms=250)
    for _ in range(10):  # gw1 measures both regions; gw2 measures nothing itself
        _post(gw1, {"x-gateway-deployment": "us"})
        _post(gw1, {"x-gateway-deployment": "eu"})
    # a sync round or two
    wait_until("gw2 to learn gw1's estimates", lambda: _view(gw2)["us"]["ttft_estimate_ms"] > 150)
    view1, view2 = _view(gw1), _view(gw2)
    assert view1["us"]["ttft_estimate_ms"] > 150
    assert view2["us"]["ttft_estimate_ms"] > 150  # gw2 sent nothing there, yet knows it is slow
    assert view2["eu"]["ttft_estimate_ms"] < 120 and view2["us"]["ttft_samples"] == 0
    # and so gw2 routes its own first requests away from the slow local region
    picks = [_post(gw2) for _ in range(10)]
    assert picks.count("eu") >= 8, picks


def test_redis_stopped_mid_test_no_request_fails(sims_factory, gateways, private_redis):
    port, proc = private_redis
    state = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0", "sync_interval_ms": 100}
    _, (gw,) = _two_regions(sims_factory, gateways, state=state)
    for _ in range(5):
        _post(gw)
    proc.kill()
    proc.wait()
    for _ in range(20):
        _post(gw)  # asserts 200 each
    down = 'llmgw_state_backend_up{backend="redis"} 0.0'
    wait_until("the gateway to report Redis down", lambda: down in HTTP.get(gw.url + "/metrics").text)
    assert gw.stderr().count("unreachable") == 1  # logged once, not per request


def _probed_pair(sims: Sims) -> dict[str, object]:
    """Latency routing between sim-a and sim-b with a slow decay (30 s), probes every 0.5 s."""
    return {
        "server": {"region": "us-east"},
        "models": [
            model(
                "chat",
                [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                routing={"ewma_decay_s": 30.0, "probe_interval_s": 0.5},
            )
        ],
    }


def test_a_deployment_one_outlier_took_out_is_probed_and_wins_its_traffic_back(sims_factory, gateways):
    """b (20 ms) is better than a (80 ms) until one answer of b takes 1.5 s. With a 30 s decay its
    estimate alone would keep b out for over a minute; a probe after probe_interval_s measures it again."""
    fast = {**BASE, "ttft_ms": 20}
    sims = sims_factory({"sim-a": ("us-east", {**BASE, "ttft_ms": 80}), "sim-b": ("us-east", fast)})
    cfg = _probed_pair(sims)
    gw = gateways(cfg)
    warm = [_post(gw) for _ in range(10)]
    assert warm[-3:] == ["b"] * 3, warm  # both measured, b the better
    sims.set("sim-b", ttft_ms=1500)
    assert _post(gw) == "b"  # the outlier: b's estimate is now 1.5 s, a's 80 ms
    sims.set("sim-b", ttft_ms=20)
    after = []
    while "b" not in after:  # the event: b picked again (a request every ~80 ms; the probe is due in 0.5 s)
        after.append(_post(gw))
        assert len(after) < 200, "b was never probed"
    assert len(after) >= 2, after  # not at once: a took the traffic first
    then = [_post(gw) for _ in range(10)]
    assert then.count("b") >= 8, then  # the probe's sample replaced the outlier's estimate
    recs = gw.records(wait_for=11 + len(after) + 10)
    outlier_i = 10
    probe = recs[outlier_i + len(after)]
    assert (probe["upstream_cluster"], probe["route_reason"]) == ("b", "probe")
    assert {r["route_reason"] for r in recs[outlier_i + 1 : outlier_i + len(after)]} == {"local"}
    probes = metric_value(gw.metrics(), "llmgw_route_decisions_total", deployment="b", reason="probe")
    assert probes >= 1


def _ttft_estimate(gw, deployment: str) -> float:
    views = HTTP.get(gw.url + "/admin/deployments").json()["deployments"]
    return next(d["ttft_estimate_ms"] for d in views if d["deployment"] == deployment)


def test_two_gateways_a_probe_answer_is_not_pulled_back_by_a_replica_that_sent_nothing_since(
    sims_factory, gateways, redis_prefix
):
    """b (20 ms) is better than a (80 ms). b answers gw1 once in 1.5 s; gw2, sending nothing more, learns
    that through Redis. gw1's probe measures b fast again: gw2's view, based on its own older samples,
    must not pull gw1's back up, and gw2 must learn the probe's answer (it is newer than its samples)."""
    sims = sims_factory(
        {"sim-a": ("us-east", {**BASE, "ttft_ms": 80}), "sim-b": ("us-east", {**BASE, "ttft_ms": 20})}
    )
    cfg = {
        **_probed_pair(sims),
        "state": shared_state(redis_prefix),
    }
    gw1, gw2 = gateways(cfg), gateways(cfg)
    for gw in (gw1, gw2):  # both measure both
        for d in ("a", "b", "a", "b"):
            assert _post(gw, {"x-gateway-deployment": d}) == d
    sims.set("sim-b", ttft_ms=1500)
    _post(gw1, {"x-gateway-deployment": "b"})  # the slow answer, on gw1
    sims.set("sim-b", ttft_ms=20)
    wait_until("gw2 to learn b's slow answer from gw1", lambda: _ttft_estimate(gw2, "b") > 500)
    after = []
    while "b" not in after:  # the event: gw1 probes b (a request every ~80 ms; the probe is due in 0.5 s)
        after.append(_post(gw1))
        assert len(after) < 200, "b was never probed"
    # gw1 publishes the probe's answer and reads gw2's stale view every 100 ms; gw2 takes gw1's in, half
    # way each round: below 60 ms only after several rounds (from ~1.5 s), each of which gw1 also read.
    wait_until("gw2 to learn b is fast again", lambda: _ttft_estimate(gw2, "b") < 60)
    assert _ttft_estimate(gw1, "b") < 40  # the probe's 20 ms, not pulled back
    assert [_post(gw1) for _ in range(10)].count("b") >= 8
    assert _post(gw2) == "b"  # by its estimate: gw2 sent b nothing since its warm-up
    assert gw2.records(wait_for=5)[4]["route_reason"] == "local"
    probe = gw1.records(wait_for=5 + len(after))[4 + len(after)]
    assert (probe["upstream_cluster"], probe["route_reason"]) == ("b", "probe")
    counted = "llmgw_state_remote_estimates_total"
    stale = metric_value(gw1.metrics(), counted, deployment="b", result="stale")
    merged = metric_value(gw2.metrics(), counted, deployment="b", result="merged")
    assert stale >= 5 and merged >= 5, (stale, merged)
