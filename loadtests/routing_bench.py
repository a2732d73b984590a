#!/usr/bin/env python3
"""Routing benchmark: latency routing (power of two choices on peak EWMA) vs round-robin, in ONE run.

Each arm is its own gateway in front of its own three simulated deployments of unequal speed in the
gateway's region (lognormal TTFT, medians 100, 150 and 400 ms by default, no tail). The arms run at the
same time, each fed its own open-loop Poisson stream of streaming chat completions. Reported per arm:
client-side TTFT p50/p95/p99/p99.9 and the share of traffic each deployment got (what the simulators
served; the access log's ``upstream_cluster`` agrees).

    .venv/bin/python loadtests/routing_bench.py                     # 30 req/s, 2000 requests per arm
    .venv/bin/python loadtests/routing_bench.py --medians 100,150,400 --rate 60 --requests 3000

Exit codes: 0 done (latency routing beat round-robin at p50 and p99), 1 it did not, 2 set-up failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fleet import (
    Fleet,
    Proc,
    access_records,
    drive_arms,
    machine,
    open_loop_line,
    report_meta,
    sim_reset,
    sim_stats,
    take_lock,
    write_report,
)
from openloop import StreamResult, ttft_summary

REPO = Path(__file__).resolve().parent.parent
ARMS = ("latency", "round-robin")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arms",
        default=",".join(ARMS),
        help="subset of latency,round-robin,weighted (default: latency,round-robin)",
    )
    p.add_argument("--medians", default="100,150,400", help="median TTFT (ms) of each deployment")
    p.add_argument("--sigma", type=float, default=0.3, help="lognormal sigma")
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rate", type=float, default=30.0, help="arrivals per second per arm (Poisson)")
    p.add_argument("--requests", type=int, default=2000, help="measured requests per arm")
    p.add_argument("--warmup-requests", type=int, default=150, help="unmeasured requests per arm first")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-lock", action="store_true", help="do not take the shared benchmark lock")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (a .json with the raw summary "
        "is written next to it); default loadtests/results/routing-<date>.md",
    )
    a = p.parse_args(argv)
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if not a.arms or any(x not in (*ARMS, "weighted") for x in a.arms):
        p.error("--arms: expected some of latency,round-robin,weighted")
    a.medians = [float(x) for x in a.medians.split(",")]
    return a


@dataclass(slots=True)
class Arm:
    name: str
    gateway: Proc
    access_log: Path
    sims: list[Proc]


@dataclass(slots=True)
class ArmResult:
    arm: str
    client_requests: int
    errors: int
    ttft_ms: dict[str, float | None]
    share: dict[str, float]  # deployment -> share of the streams it served (simulator counters)
    served: dict[str, int]
    access_log_share: dict[str, float]
    route_reasons: dict[str, int]


def dep_name(median: float) -> str:
    return f"d{median:g}ms"


def start(fleet: Fleet, a: argparse.Namespace) -> dict[str, Arm]:
    arms = {}
    for i, arm in enumerate(a.arms):
        sims = [
            fleet.sim(
                f"{arm}-{dep_name(m)}",
                "us-east",
                seed=a.seed * 100 + 10 * i + j,
                ttft_ms=m,
                ttft_dist="lognormal",
                ttft_sigma=a.sigma,
                itl_ms=a.itl_ms,
                tokens=a.tokens,
            )
            for j, m in enumerate(a.medians)
        ]
        deps = [
            {
                "id": dep_name(m),
                "base_url": s.url + "/v1",
                "api_key": "sim-key",
                "model": "sim-large",
                "region": "us-east",
            }
            for m, s in zip(a.medians, sims, strict=True)
        ]
        cfg = {
            "server": {"region": "us-east"},
            "models": [
                {
                    "name": "chat",
                    "deployments": deps,
                    "routing": {"strategy": arm},
                    "hedging": {"enabled": False},
                }
            ],
        }
        gw, log = fleet.gateway(f"gw-{arm}", cfg)
        arms[arm] = Arm(arm, gw, log, sims)
    fleet.wait_ready()
    return arms


def summarize(a: argparse.Namespace, arm: Arm, results: list[StreamResult]) -> ArmResult:
    n = len(results)
    recs = access_records(arm.access_log, f"m-{arm.name}-", expect=n)
    served = {}
    for m, s in zip(a.medians, arm.sims, strict=True):
        served[dep_name(m)] = sim_stats(s)["served"]["chat"]
    total = sum(served.values()) or 1
    by_cluster: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in recs:
        by_cluster[r["upstream_cluster"]] = by_cluster.get(r["upstream_cluster"], 0) + 1
        reasons[r["route_reason"]] = reasons.get(r["route_reason"], 0) + 1
    return ArmResult(
        arm=arm.name,
        client_requests=n,
        errors=sum(not r.ok for r in results),
        ttft_ms=ttft_summary(results),
        share={k: v / total for k, v in served.items()},
        served=served,
        access_log_share={k: v / (len(recs) or 1) for k, v in sorted(by_cluster.items())},
        route_reasons=reasons,
    )


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def report(a: argparse.Namespace, res: list[ArmResult], meta: dict[str, str]) -> tuple[str, bool]:
    deps = [dep_name(m) for m in a.medians]
    rows = [
        "| routing | TTFT p50 | p95 | p99 | p99.9 | max | "
        + " | ".join(f"share {d}" for d in deps)
        + " | errors |",
        "|---|" + "---|" * (6 + len(deps)),
    ]
    for r in res:
        t = r.ttft_ms
        rows.append(
            f"| {r.arm} | {fmt(t['p50'])} | {fmt(t['p95'])} | {fmt(t['p99'])} | {fmt(t['p99.9'])} "
            f"| {fmt(t['max'])} | "
            + " | ".join(f"{100 * r.share[d]:.1f} %" for d in deps)
            + f" | {r.errors} |"
        )
    by = {r.arm: r for r in res}
    lines, ok = [], True
    if "latency" in by and "round-robin" in by:
        lat, rr = by["latency"].ttft_ms, by["round-robin"].ttft_ms
        ok = (lat["p50"] or 0) < (rr["p50"] or 0) and (lat["p99"] or 0) < (rr["p99"] or 0)
        lines.append(
            f"- latency vs round-robin: p50 {lat['p50']:.0f} vs {rr['p50']:.0f} ms "
            f"({rr['p50'] / lat['p50']:.2f}x lower), p99 {lat['p99']:.0f} vs {rr['p99']:.0f} ms "
            f"({rr['p99'] / lat['p99']:.2f}x lower)"
        )
    for r in res:
        lines.append(
            f"- {r.arm}: route reasons {r.route_reasons}; access-log share "
            + ", ".join(f"{k} {100 * v:.1f} %" for k, v in r.access_log_share.items())
        )
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    md = (
        f"# Routing benchmark ({meta['date']})\n\n{head}\n\nClient-side TTFT in ms, measured phase only; "
        "share = streams each deployment served (simulator counters).\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
    return md, ok


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
            print(f"routing_bench: {exc}", file=sys.stderr)
            return 2
        urls = {name: arm.gateway.url for name, arm in arms.items()}
        t0 = time.monotonic()
        asyncio.run(drive_arms(urls, "w", a.warmup_requests, a.rate, a.seed, a.tokens))
        for arm in arms.values():
            for s in arm.sims:
                sim_reset(s)
        measured = asyncio.run(drive_arms(urls, "m", a.requests, a.rate, a.seed, a.tokens))
        wall = time.monotonic() - t0
        res = [summarize(a, arms[n], measured[n]) for n in arms]
    finally:
        fleet.stop()
    meta = report_meta(
        "routing_bench.py",
        argv,
        load_start,
        f"three deployments in the gateway's region, lognormal TTFT medians "
        f"{', '.join(f'{m:g}' for m in a.medians)} ms, sigma {a.sigma:g}, no tail; {a.tokens} tokens "
        f"{a.itl_ms:g} ms apart",
        open_loop_line(a.rate, a.warmup_requests, a.requests, wall),
    )
    md, ok = report(a, res, meta)
    out = a.out or REPO / "loadtests" / "results" / f"routing-{time.strftime('%Y-%m-%d')}.md"
    write_report(out, md, {"meta": meta, "arms": [asdict(r) for r in res]})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
