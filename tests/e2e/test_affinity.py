"""Prefix-cache affinity through the real gateway, the real openai SDK and three simulated deployments.

The simulators model a provider's prefix cache; each tells which conversation's turns it served (the
x-conv header the client sends is forwarded and shows in the simulator's recent requests).
"""

from __future__ import annotations

from collections import defaultdict

from harness import HTTP, dep, metric_value, model

SIMS = ("sim-a", "sim-b", "sim-c")
KNOBS = {
    "ttft_ms": 5,
    "ttft_dist": "fixed",
    "itl_ms": 1,
    "tokens": 2,
    "tail_p": 0,
    "prefix_cache_tokens": 200_000,
    "prefill_ms_per_1k": 20,
}
SYSTEM = "You are the support assistant of a bicycle shop. Answer with care and cite the manual. " * 60


def _fleet(sims_factory, gateways, **routing):
    sims = sims_factory({name: ("us-east", KNOBS) for name in SIMS})
    cfg = {
        "server": {"region": "us-east"},
        "models": [
            model(
                "chat",
                [dep(name, sims.base_url(name)) for name in SIMS],
                routing={"affinity": "prefix", **routing},
                outlier={"consecutive_failures": 1, "base_ejection_s": 60},
                retry={"backoff_base_ms": 1},
            )
        ],
    }
    return sims, gateways(cfg)


def _turn(client, conv: int, history: list[dict], question: str, **kw):
    history.append({"role": "user", "content": question})
    raw = client.chat.completions.with_raw_response.create(
        model="chat",
        messages=[{"role": "system", "content": SYSTEM}, *history],
        extra_headers={"x-conv": str(conv)},
        **kw,
    )
    resp = raw.parse()
    history.append({"role": "assistant", "content": resp.choices[0].message.content})
    return raw.headers["x-gateway-upstream"], resp


def _served(sims) -> dict[str, list[str]]:
    """conversation -> the simulators that served its turns, in order (what the providers saw)."""
    seen: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in SIMS:
        for rec in sims.stats(name)["recent"]:
            conv = rec["headers_seen"].get("x-conv")
            if conv is not None and rec["outcome"] == "ok":
                seen[conv].append((rec["started_at"], name))
    return {c: [n for _, n in sorted(v)] for c, v in seen.items()}


def test_each_conversation_stays_on_one_deployment_and_hits_its_cache(sims_factory, gateways):
    sims, gw = _fleet(sims_factory, gateways)
    client = gw.client()
    histories: dict[int, list[dict]] = {c: [] for c in range(9)}
    cached_later_turns = []
    for turn in range(4):
        for conv, history in histories.items():
            _, resp = _turn(
                client, conv, history, f"conversation {conv}, question {turn}: how do I true a wheel?"
            )
            if turn > 0:
                cached_later_turns.append(
                    resp.usage.prompt_tokens_details.cached_tokens / resp.usage.prompt_tokens
                )
    served = _served(sims)
    assert len(served) == 9
    for conv, names in served.items():
        assert len(names) == 4 and len(set(names)) == 1, (conv, names)  # every turn on one deployment
    assert len({names[0] for names in served.values()}) >= 2  # and the conversations spread over the fleet
    assert min(cached_later_turns) > 0.5, cached_later_turns  # later turns find most of their prompt cached
    cached = sum(sims.stats(n)["prompt_tokens"]["cached"] for n in SIMS)
    uncached = sum(sims.stats(n)["prompt_tokens"]["uncached"] for n in SIMS)
    assert cached / (cached + uncached) > 0.6

    recs = gw.records(wait_for=36)
    assert {r["route_reason"] for r in recs} == {"affinity-home"}
    keys = defaultdict(set)
    for r in recs:
        assert len(r["affinity_key"]) == 16 and SYSTEM[:20] not in str(r)  # a hash, never the content
        keys[r["upstream_cluster"]].add(r["affinity_key"])
    assert sum(len(k) for k in keys.values()) == 9  # one key per conversation
    assert metric_value(gw.metrics(), "llmgw_affinity_routes_total", model="chat", result="home") == 36


def test_an_ejected_home_rehomes_its_conversations_to_one_other_deployment(sims_factory, gateways):
    sims, gw = _fleet(sims_factory, gateways)
    client = gw.client()
    history: list[dict] = []
    home, _ = _turn(client, 0, history, "first question")
    assert _turn(client, 0, history, "second question")[0] == home
    sims.set(home, error_rate=1.0, error_status=503)  # home fails: the retry goes on, home is ejected
    moved = [_turn(client, 0, history, f"question {i}")[0] for i in range(5)]
    assert home not in moved and len(set(moved)) == 1, moved  # all later turns on the same next deployment
    served = _served(sims)["0"]
    assert served[:2] == [home, home] and set(served[2:]) == {moved[0]}
    assert sims.stats(moved[0])["prompt_tokens"]["cached"] > 0  # the new home caches the conversation again

    recs = gw.records(wait_for=7)
    assert [r["route_reason"] for r in recs[-4:]] == ["affinity-rehome"] * 4
    assert recs[2]["retry_count"] == 1
    text = gw.metrics()
    assert metric_value(text, "llmgw_affinity_routes_total", model="chat", result="rehome") == 4


def test_key_mode_follows_the_header_or_prompt_cache_key_only(sims_factory, gateways):
    sims, gw = _fleet(sims_factory, gateways, affinity="key")
    picks = set()
    for i in range(6):
        r = HTTP.post(
            gw.url + "/v1/chat/completions",
            headers={"x-llmgw-affinity": "tenant-7"},
            timeout=30,
            json={"model": "chat", "messages": [{"role": "user", "content": f"q{i}"}]},
        )
        assert r.status_code == 200, r.text
        picks.add(r.headers["x-gateway-upstream"])
    client = gw.client()
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="chat",
            messages=[{"role": "user", "content": f"other {i}"}],
            extra_body={"prompt_cache_key": "tenant-7"},
        )
        picks.add(raw.headers["x-gateway-upstream"])
    assert len(picks) == 1  # the header and prompt_cache_key name the same key
    HTTP.post(
        gw.url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    recs = gw.records(wait_for=10)
    assert recs[-1]["affinity_key"] is None and recs[-1]["route_reason"] != "affinity-home"
    assert metric_value(gw.metrics(), "llmgw_affinity_routes_total", model="chat", result="unkeyed") == 1


def test_two_replicas_without_shared_state_agree_on_every_home(sims_factory, gateways):
    """The ring is a function of the deployment ids: replicas need no state backend to agree."""
    sims = sims_factory({name: ("us-east", KNOBS) for name in SIMS})
    cfg = {
        "server": {"region": "us-east"},
        "models": [
            model("chat", [dep(name, sims.base_url(name)) for name in SIMS], routing={"affinity": "prefix"})
        ],
    }
    clients = [gateways(cfg).client(), gateways(cfg).client()]
    histories: dict[int, list[dict]] = {c: [] for c in range(6)}
    for turn in range(4):
        for conv, history in histories.items():
            _turn(clients[(conv + turn) % 2], conv, history, f"question {turn}")  # turns alternate replicas
    served = _served(sims)
    assert len(served) == 6
    for conv, names in served.items():
        assert len(names) == 4 and len(set(names)) == 1, (conv, names)
