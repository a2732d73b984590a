#!/usr/bin/env python3
"""Hedging benchmark: a heavy-tailed provider, hedging off vs on, in ONE run.

Each arm is its own gateway in front of its own two simulated deployments in two regions (``us-east``,
the gateway's region, and ``eu-west``), both heavy-tailed: lognormal TTFT (median 200 ms, sigma 0.3)
plus 2 % of requests at 2 s. The arms run at the same time, each fed its own open-loop Poisson stream
of streaming chat completions, so drift on the machine hits all of them alike:

- ``off``:   hedging disabled;
- ``auto``:  ``hedging: {delay_ms: auto, quantile: 0.95, budget_percent: 5}``;
- ``fixed``: ``hedging: {delay_ms: <--fixed-delay-ms>, budget_percent: 5}``.

A warm-up phase (not measured) fills the auto delay's window; then the simulators' counters are reset
and the measured phase runs. Reported per arm: client-side TTFT p50/p95/p99/p99.9; hedges started
(access log ``hedge_count``) and suppressed by the budget; extra upstream requests (what the simulators
received vs what the clients sent); losers cancelled (simulators' ``cancelled`` counters vs hedges);
how fast a loser was cancelled after the winner's first byte; and that every stream carried the tokens
of exactly one attempt.

    .venv/bin/python loadtests/hedge_bench.py                       # 30 req/s, 3000 requests per arm
    .venv/bin/python loadtests/hedge_bench.py --rate 20 --requests 2000 --arms off,auto

Exit codes: 0 targets met, 1 a target missed, 2 set-up failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleet import (
    Fleet,
    Proc,
    SimRecorder,
    access_records,
    drive_arms,
    machine,
    metric_value,
    open_loop_line,
    report_meta,
    sim_reset,
    sim_stats,
    take_lock,
    upstream_requests,
    write_report,
)
from openloop import StreamResult, percentile, ttft_summary

REPO = Path(__file__).resolve().parent.parent
ARMS = ("off", "auto", "fixed")
TARGET_P99_CUT = 3.0
TARGET_EXTRA_PCT = 6.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help="subset of off,auto,fixed (default: all)")
    p.add_argument("--rate", type=float, default=30.0, help="arrivals per second per arm (Poisson)")
    p.add_argument("--requests", type=int, default=3000, help="measured requests per arm")
    p.add_argument("--warmup-requests", type=int, default=300, help="unmeasured requests per arm first")
    p.add_argument("--ttft-ms", type=float, default=200.0, help="median TTFT of the lognormal body")
    p.add_argument("--sigma", type=float, default=0.3, help="lognormal sigma")
    p.add_argument("--tail-p", type=float, default=0.02, help="share of requests in the tail")
    p.add_argument("--tail-ms", type=float, default=2000.0, help="TTFT of tail requests")
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument(
        "--fixed-delay-ms",
        type=float,
        default=350.0,
        help="the fixed arm's hedge delay (default ~ the p95 of the default TTFT mixture)",
    )
    p.add_argument("--quantile", type=float, default=0.95)
    p.add_argument("--budget-percent", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-lock", action="store_true", help="do not take the shared benchmark lock")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (a .json with the raw summary "
        "is written next to it); default loadtests/results/hedging-<date>.md",
    )
    a = p.parse_args(argv)
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if not a.arms or any(x not in ARMS for x in a.arms):
        p.error(f"--arms: expected some of {','.join(ARMS)}")
    return a


def hedging_cfg(a: argparse.Namespace, arm: str) -> dict[str, Any]:
    if arm == "off":
        return {"enabled": False}
    delay: float | str = "auto" if arm == "auto" else a.fixed_delay_ms
    return {
        "enabled": True,
        "delay_ms": delay,
        "quantile": a.quantile,
        "budget_percent": a.budget_percent,
        "max_hedges": 1,
    }


@dataclass(slots=True)
class Arm:
    name: str
    gateway: Proc
    access_log: Path
    sims: list[Proc]


@dataclass(slots=True)
class ArmResult:
    arm: str
    hedging: dict[str, Any]
    client_requests: int
    ok: int
    errors: int
    ttft_ms: dict[str, float | None]
    gateway_ttft_p99_ms: float | None
    max_client_lag_ms: float
    upstream_requests: int
    extra_upstream: int
    extra_upstream_pct: float
    hedges: int
    hedge_wins: int
    suppressed: int
    cancelled: int
    cancelled_before_first_byte: int
    cancelled_mid_stream: int
    losers_cancelled: bool
    cancel_lag_ms: dict[str, float | None]
    cancel_lag_checked: int
    cancel_lag_unmatched: int
    hedges_never_sent: int
    slow_over_1s: dict[str, int]
    mixed_streams: int
    hedge_delay_ms: dict[str, float | None]
    warmup_hedge_delay_ms: dict[str, float | None]


def start(fleet: Fleet, a: argparse.Namespace) -> dict[str, Arm]:
    knobs = {
        "ttft_ms": a.ttft_ms,
        "ttft_dist": "lognormal",
        "ttft_sigma": a.sigma,
        "tail_p": a.tail_p,
        "tail_ms": a.tail_ms,
        "itl_ms": a.itl_ms,
        "tokens": a.tokens,
    }
    arms = {}
    for i, arm in enumerate(a.arms):
        us = fleet.sim(f"{arm}-us", "us-east", seed=a.seed * 100 + 2 * i, **knobs)
        eu = fleet.sim(f"{arm}-eu", "eu-west", seed=a.seed * 100 + 2 * i + 1, **knobs)
        deps = [
            {
                "id": s.name,
                "base_url": s.url + "/v1",
                "api_key": "sim-key",
                "model": "sim-large",
                "region": region,
            }
            for s, region in ((us, "us-east"), (eu, "eu-west"))
        ]
        cfg = {
            "server": {"region": "us-east"},
            "models": [{"name": "chat", "deployments": deps, "hedging": hedging_cfg(a, arm)}],
        }
        gw, log = fleet.gateway(f"gw-{arm}", cfg)
        arms[arm] = Arm(arm, gw, log, [us, eu])
    fleet.wait_ready()
    return arms


def spread(values: list[float]) -> dict[str, float | None]:
    v = sorted(values)
    if not v:
        return {"n": 0, "min": None, "p50": None, "p99": None, "max": None}
    return {"n": len(v), "min": v[0], "p50": percentile(v, 50), "p99": percentile(v, 99), "max": v[-1]}


def cancel_lags(
    attempts: dict[str, list[dict[str, Any]]], hedged_ids: set[str]
) -> tuple[list[float], int, int, int]:
    """Per hedged request, as the simulators recorded it: loser end minus winner first byte (ms); how many
    had a loser that was not cancelled; how many hedges never reached a simulator (the race was decided
    while the hedge was still connecting: nothing to cancel); how many could not be matched."""
    lags, not_cancelled, never_sent, missing = [], 0, 0, 0
    for rid in hedged_ids:
        atts = attempts.get(rid, [])
        if len(atts) == 1 and atts[0]["outcome"] == "ok":
            never_sent += 1
            continue
        if len(atts) != 2:
            missing += 1
            continue
        winners = [x for x in atts if x["outcome"] == "ok"]
        losers = [x for x in atts if x["outcome"] != "ok"]
        if len(winners) != 1 or losers[0]["outcome"] != "cancelled":
            not_cancelled += 1
            continue
        lags.append((losers[0]["ended_at"] - winners[0]["first_byte_at"]) * 1000.0)
    return lags, not_cancelled, never_sent, missing


def slow_reasons(
    a: argparse.Namespace,
    recs: list[dict[str, Any]],
    attempts: dict[str, list[dict[str, Any]]],
    results: list[StreamResult],
    slow_ms: float,
) -> dict[str, int]:
    """Why each stream slower than ``slow_ms`` (client TTFT) was slow."""
    by_id = {r["request_id"]: r for r in recs}
    out: dict[str, int] = {}
    for res in results:
        if not res.ok or res.ttft_s * 1000.0 < slow_ms:
            continue
        rec = by_id.get(res.request_id, {})
        sampled = [x.get("ttft_ms") or 0.0 for x in attempts.get(res.request_id, [])]
        if "HS" in rec.get("response_flags", ""):
            why = "hedge suppressed by the budget"
        elif rec.get("hedge_count"):
            tails = sum(t >= a.tail_ms for t in sampled)
            why = "both attempts in the tail" if tails == 2 else f"hedged, {tails} attempt(s) in the tail"
        elif rec.get("hedge_delay_ms") is None:
            why = "hedging off"
        else:
            why = f"not hedged (delay {rec['hedge_delay_ms']:.0f} ms)"
        out[why] = out.get(why, 0) + 1
    return out


def summarize(
    a: argparse.Namespace,
    arm: Arm,
    results: list[StreamResult],
    warm: list[dict[str, Any]],
    attempts: dict[str, list[dict[str, Any]]],
) -> ArmResult:
    n = len(results)
    recs = access_records(arm.access_log, f"m-{arm.name}-", expect=n)
    stats = [sim_stats(s) for s in arm.sims]
    upstream = sum(upstream_requests(s) for s in stats)
    cb = sum(s["cancelled"]["before_first_byte"] for s in stats)
    cm = sum(s["cancelled"]["mid_stream"] for s in stats)
    hedged = [r for r in recs if r["hedge_count"]]
    hedges = sum(r["hedge_count"] for r in recs)
    lags, not_cancelled, never_sent, unmatched = cancel_lags(attempts, {r["request_id"] for r in hedged})
    gw_ttft = sorted(r["ttft_ms"] for r in recs if r.get("ttft_ms") is not None)
    delays = [r["hedge_delay_ms"] for r in recs if r.get("hedge_delay_ms") is not None]
    wdelays = [r["hedge_delay_ms"] for r in warm if r.get("hedge_delay_ms") is not None]
    return ArmResult(
        arm=arm.name,
        hedging=hedging_cfg(a, arm.name),
        client_requests=n,
        ok=sum(r.ok for r in results),
        errors=sum(not r.ok for r in results),
        ttft_ms=ttft_summary(results),
        gateway_ttft_p99_ms=percentile(gw_ttft, 99),
        max_client_lag_ms=max((r.lag_s for r in results), default=0.0) * 1000.0,
        upstream_requests=upstream,
        extra_upstream=upstream - n,
        extra_upstream_pct=100.0 * (upstream - n) / n,
        hedges=hedges,
        hedge_wins=sum(r.get("hedge_winner") == "hedge" for r in hedged),
        suppressed=sum("HS" in r["response_flags"] for r in recs),
        cancelled=cb + cm,
        cancelled_before_first_byte=cb,
        cancelled_mid_stream=cm,
        # every hedge's loser was cancelled at its provider, or never got there; the simulators' request
        # count must agree (no hedge went out uncounted)
        losers_cancelled=(
            cb + cm + never_sent == hedges
            and not_cancelled == 0
            and unmatched == 0
            and upstream - n == hedges - never_sent
        ),
        hedges_never_sent=never_sent,
        cancel_lag_ms=spread(lags),
        cancel_lag_checked=len(lags) + not_cancelled,
        cancel_lag_unmatched=unmatched,
        slow_over_1s=slow_reasons(a, recs, attempts, results, 1000.0),
        mixed_streams=sum(len(r.producers) != 1 for r in results if r.ok),
        hedge_delay_ms=spread(delays),
        warmup_hedge_delay_ms=spread(wdelays),
    )


def fmt(v: float | None, d: int = 0) -> str:
    return "–" if v is None else f"{v:,.{d}f}"


def report(a: argparse.Namespace, res: list[ArmResult], meta: dict[str, str]) -> tuple[str, bool]:
    rows = [
        "| arm | hedging | TTFT p50 | p95 | p99 | p99.9 | max | hedges (won by hedge) | suppressed by budget "
        "| upstream requests (extra) | losers cancelled (before 1st byte / mid-stream) | cancel lag p50 / max "
        "| errors | streams with 2 producers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        t = r.ttft_ms
        h = r.hedging
        desc = (
            "off"
            if not h["enabled"]
            else (
                f"delay {h['delay_ms']}"
                + (f" (p{a.quantile * 100:g})" if h["delay_ms"] == "auto" else " ms")
                + f", budget {h['budget_percent']:g} %"
            )
        )
        lag = r.cancel_lag_ms
        rows.append(
            f"| {r.arm} | {desc} | {fmt(t['p50'])} | {fmt(t['p95'])} | {fmt(t['p99'])} | {fmt(t['p99.9'])} "
            f"| {fmt(t['max'])} | {r.hedges} ({r.hedge_wins}) | {r.suppressed} "
            f"| {r.upstream_requests:,} (+{r.extra_upstream}, {r.extra_upstream_pct:+.2f} %) "
            f"| {r.cancelled} of {r.hedges} ({r.cancelled_before_first_byte} / {r.cancelled_mid_stream}) "
            f"| {fmt(lag['p50'], 1)} / {fmt(lag['max'], 1)} ms (n={lag['n']}) | {r.errors} | {r.mixed_streams} |"
        )
    checks, met = [], True
    base = next((r for r in res if r.arm == "off"), None)
    for r in res:
        if r.arm == "off" or base is None:
            continue
        cut = (base.ttft_ms["p99"] or 0) / (r.ttft_ms["p99"] or float("inf"))
        ok = (
            cut >= TARGET_P99_CUT
            and r.extra_upstream_pct <= TARGET_EXTRA_PCT
            and r.losers_cancelled
            and r.mixed_streams == 0
            and r.errors == 0
        )
        met = met and ok
        checks.append(
            f"- **{r.arm}**: p99 TTFT cut {cut:.2f}x (target >= {TARGET_P99_CUT:g}x), extra upstream "
            f"{r.extra_upstream_pct:.2f} % (target <= {TARGET_EXTRA_PCT:g} %), every loser cancelled: "
            f"{'yes' if r.losers_cancelled else 'NO'} ({r.cancelled} cancelled for {r.hedges} hedges, "
            f"{r.hedges_never_sent} decided before the hedge reached a provider; "
            f"{r.cancel_lag_checked} checked one by one, {r.cancel_lag_unmatched} unmatched), one producer "
            "per stream: "
            f"{'yes' if r.mixed_streams == 0 else 'NO'} -> **{'met' if ok else 'MISSED'}**"
        )
        d, w = r.hedge_delay_ms, r.warmup_hedge_delay_ms
        if d["n"]:
            checks.append(
                f"  - hedge delay used (ms): measured phase min {fmt(d['min'])} / p50 {fmt(d['p50'])} / "
                f"max {fmt(d['max'])}; warm-up phase min {fmt(w['min'])} / p50 {fmt(w['p50'])} / "
                f"max {fmt(w['max'])}; gateway-side TTFT p99 {fmt(r.gateway_ttft_p99_ms)} ms"
            )
    for r in res:
        if r.slow_over_1s:
            why = "; ".join(f"{k}: {v}" for k, v in sorted(r.slow_over_1s.items(), key=lambda kv: -kv[1]))
            checks.append(
                f"- streams with TTFT over 1 s, **{r.arm}**: {sum(r.slow_over_1s.values())} ({why})"
            )
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    md = (
        f"# Hedging benchmark ({meta['date']})\n\n{head}\n\nClient-side TTFT in ms, measured phase only.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(checks)
        + "\n"
    )
    return md, met


def default_out() -> Path:
    return REPO / "loadtests" / "results" / f"hedging-{time.strftime('%Y-%m-%d')}.md"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not a.no_lock:
        take_lock()
    fleet = Fleet()
    load_start = machine()
    try:
        try:
            arms = start(fleet, a)
        except RuntimeError as exc:
            print(f"hedge_bench: {exc}", file=sys.stderr)
            return 2
        urls = {name: arm.gateway.url for name, arm in arms.items()}
        t0 = time.monotonic()
        asyncio.run(drive_arms(urls, "w", a.warmup_requests, a.rate, a.seed, a.tokens))
        warm = {
            name: access_records(arm.access_log, f"w-{name}-", expect=a.warmup_requests)
            for name, arm in arms.items()
        }
        for arm in arms.values():
            for s in arm.sims:
                sim_reset(s)
        recorder = SimRecorder([s for arm in arms.values() for s in arm.sims])
        recorder.start()
        measured = asyncio.run(drive_arms(urls, "m", a.requests, a.rate, a.seed, a.tokens))
        recorder.stop()
        wall = time.monotonic() - t0
        attempts = recorder.by_request()
        res = [summarize(a, arms[n], measured[n], warm[n], attempts) for n in arms]
        for r in res:
            if r.hedges:
                gw = arms[r.arm].gateway.url
                r.hedging["metric_cancelled_total"] = metric_value(
                    gw, "llmgw_hedges_total", outcome="cancelled"
                )
    finally:
        fleet.stop()
    sim_line = (
        f"lognormal TTFT median {a.ttft_ms:g} ms, sigma {a.sigma:g}, plus {a.tail_p * 100:g} % at "
        f"{a.tail_ms:g} ms; {a.tokens} tokens {a.itl_ms:g} ms apart; two deployments (us-east, eu-west), "
        "gateway in us-east, latency routing, locality prefer"
    )
    meta = report_meta(
        "hedge_bench.py",
        argv,
        load_start,
        sim_line,
        open_loop_line(a.rate, a.warmup_requests, a.requests, wall),
    )
    md, met = report(a, res, meta)
    out = a.out or default_out()
    write_report(out, md, {"meta": meta, "arms": [asdict(r) for r in res]})
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
