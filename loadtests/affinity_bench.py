#!/usr/bin/env python3
"""Prefix-cache affinity benchmark: affinity prefix vs latency routing vs round-robin, arms side by side.

Each arm is its own gateway in front of its own simulated deployments, each with a provider-side prompt
prefix cache (``prefix_cache_tokens``) and a prefill cost for every uncached prompt token
(``prefill_ms_per_1k``). Every arm runs the same multi-turn conversations at the same time: each opens
with a shared system prompt and a long document of its own (the prefix that dominates prefill), then
asks short questions, each turn resending the whole conversation (closed loop per conversation, a short
think time between turns).

Scenarios: ``steady``; ``slow`` (one deployment's base TTFT multiplied by ``--slow-x`` once half the
turns are done); ``eject`` (one deployment answers 503 from then on, so outlier detection ejects it).
Reported per arm: client-side TTFT of turns after the first (mean, p50, p95, p99), of first turns (p50),
the provider-side cache-hit share of prompt tokens (what the simulators counted), and load balance
(requests the busiest deployment served / the mean).

    .venv/bin/python loadtests/affinity_bench.py                      # 18 conversations x 8 turns per arm
    .venv/bin/python loadtests/affinity_bench.py --scenarios steady --conversations 30 --turns 10

Exit codes: 0 targets met, 1 some target missed (the report says which), 2 set-up failure.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from fleet import Fleet, Proc, access_records, machine, report_meta, sim_stats, take_lock, write_report
from openloop import percentile

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "affinity": {"strategy": "latency", "affinity": "prefix"},
    "latency": {"strategy": "latency"},
    "round-robin": {"strategy": "round-robin"},
}
SCENARIOS = ("steady", "slow", "eject")
WORDS = (
    "gear",
    "chain",
    "brake",
    "wheel",
    "spoke",
    "rim",
    "hub",
    "pedal",
    "crank",
    "saddle",
    "frame",
    "fork",
    "tyre",
    "valve",
    "cable",
    "lever",
    "shifter",
    "bearing",
    "axle",
    "derailleur",
    "cassette",
    "sprocket",
    "bolt",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="some of steady,slow,eject")
    p.add_argument("--deployments", type=int, default=3)
    p.add_argument("--conversations", type=int, default=18, help="concurrent conversations per arm")
    p.add_argument("--turns", type=int, default=8, help="turns per conversation")
    p.add_argument("--system-tokens", type=int, default=1000, help="shared system prompt")
    p.add_argument(
        "--doc-tokens", type=int, default=5000, help="each conversation's own document (first turn)"
    )
    p.add_argument("--question-tokens", type=int, default=40, help="each later question")
    p.add_argument("--ttft-ms", type=float, default=40.0, help="simulated base TTFT (median, lognormal)")
    p.add_argument("--sigma", type=float, default=0.2)
    p.add_argument(
        "--prefill-ms-per-1k", type=float, default=40.0, help="prefill cost per 1,000 uncached tokens"
    )
    p.add_argument("--cache-tokens", type=int, default=60_000, help="each deployment's prefix-cache capacity")
    p.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    p.add_argument("--itl-ms", type=float, default=5.0)
    p.add_argument("--think-ms", type=float, default=50.0, help="mean pause between a conversation's turns")
    p.add_argument(
        "--slow-x", type=float, default=8.0, help="scenario slow: the slow deployment's TTFT factor"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-lock", action="store_true", help="do not take the shared benchmark lock")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (JSON beside it); default loadtests/results/affinity-<date>.md",
    )
    a = p.parse_args(argv)
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if not a.scenarios or any(s not in SCENARIOS for s in a.scenarios):
        p.error("--scenarios: expected some of steady,slow,eject")
    return a


def text(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of filler (the simulator counts 4 bytes a token)."""
    out, size = [], 0
    while size < tokens * 4:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


@dataclass(slots=True)
class Turn:
    conv: int
    turn: int
    ttft_ms: float | None
    status: int
    upstream: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    after_fault: bool


@dataclass(slots=True)
class Arm:
    name: str
    gateway: Proc
    access_log: Path
    sims: list[Proc]
    turns: list[Turn] = field(default_factory=list)
    done: int = 0
    fault_at: float | None = None


async def conversation(
    session: aiohttp.ClientSession,
    arm: Arm,
    a: argparse.Namespace,
    conv: int,
    system: str,
    fault: asyncio.Event,
    seed: int,
) -> None:
    rng = random.Random(seed)
    msgs: list[dict[str, str]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Conversation {conv}. Read this manual:\n" + text(rng, a.doc_tokens)},
    ]
    url = arm.gateway.url + "/v1/chat/completions"
    for turn in range(a.turns):
        body = orjson.dumps(
            {
                "model": "chat",
                "stream": True,
                "max_tokens": a.tokens,
                "messages": msgs,
                "stream_options": {"include_usage": True},
            }
        )
        after = fault.is_set()
        t0 = time.perf_counter()
        ttft = None
        usage: dict[str, Any] | None = None
        answer: list[str] = []
        upstream = None
        status = 0
        try:
            async with session.post(
                url,
                data=body,
                headers={"content-type": "application/json", "x-request-id": f"{arm.name}-{conv}-{turn}"},
            ) as r:
                status = r.status
                upstream = r.headers.get("x-gateway-upstream")
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = orjson.loads(line[6:])
                    choices = chunk.get("choices") or ()
                    content = choices[0].get("delta", {}).get("content") if choices else None
                    if content:
                        if ttft is None:
                            ttft = (time.perf_counter() - t0) * 1000.0
                        answer.append(content)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        except (TimeoutError, aiohttp.ClientError) as exc:
            print(f"{arm.name} conv {conv} turn {turn}: {type(exc).__name__}: {exc}", file=sys.stderr)
        details = (usage or {}).get("prompt_tokens_details") or {}
        arm.turns.append(
            Turn(
                conv,
                turn,
                ttft if status == 200 else None,
                status,
                upstream,
                (usage or {}).get("prompt_tokens"),
                details.get("cached_tokens"),
                after,
            )
        )
        arm.done += 1
        msgs = [
            *msgs,
            {"role": "assistant", "content": "".join(answer)},
            {"role": "user", "content": f"Question {turn + 1}: " + text(rng, a.question_tokens)},
        ]
        await asyncio.sleep(rng.expovariate(1000.0 / a.think_ms) if a.think_ms > 0 else 0)


async def inject(
    session: aiohttp.ClientSession, arm: Arm, scenario: str, a: argparse.Namespace, fault: asyncio.Event
) -> None:
    """Once half of the arm's turns are done, make its first deployment slow or failing."""
    total = a.conversations * a.turns
    while arm.done < total // 2:
        await asyncio.sleep(0.01)
    knobs = (
        {"ttft_ms": a.ttft_ms * a.slow_x} if scenario == "slow" else {"error_rate": 1.0, "error_status": 503}
    )
    async with session.post(arm.sims[0].url + "/sim/profile", json=knobs) as r:
        assert r.status == 200, await r.text()
    arm.fault_at = time.perf_counter()
    fault.set()


async def drive(arms: dict[str, Arm], scenario: str, a: argparse.Namespace) -> None:
    rng = random.Random(a.seed)
    system = "You are the workshop assistant of a bicycle shop. " + text(rng, a.system_tokens)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        jobs = []
        for arm in arms.values():
            fault = asyncio.Event()
            if scenario != "steady":
                jobs.append(inject(session, arm, scenario, a, fault))
            jobs += [
                conversation(session, arm, a, c, system, fault, a.seed * 1000 + c)
                for c in range(a.conversations)
            ]
        await asyncio.gather(*jobs)


def start(fleet: Fleet, a: argparse.Namespace, scenario: str) -> dict[str, Arm]:
    arms = {}
    for i, (name, routing) in enumerate(ARMS.items()):
        sims = [
            fleet.sim(
                f"{scenario}-{name}-d{j}",
                "us-east",
                seed=a.seed * 100 + 10 * i + j,
                ttft_ms=a.ttft_ms,
                ttft_dist="lognormal",
                ttft_sigma=a.sigma,
                itl_ms=a.itl_ms,
                tokens=a.tokens,
                prefix_cache_tokens=a.cache_tokens,
                prefill_ms_per_1k=a.prefill_ms_per_1k,
            )
            for j in range(a.deployments)
        ]
        deps = [
            {
                "id": f"d{j}",
                "base_url": s.url + "/v1",
                "api_key": "sim-key",
                "model": "sim-large",
                "region": "us-east",
            }
            for j, s in enumerate(sims)
        ]
        cfg = {
            "server": {"region": "us-east"},
            "models": [
                {
                    "name": "chat",
                    "deployments": deps,
                    "routing": routing,
                    "hedging": {"enabled": False},
                    "outlier": {"consecutive_failures": 3, "base_ejection_s": 60},
                }
            ],
        }
        gw, log = fleet.gateway(f"gw-{scenario}-{name}", cfg)
        arms[name] = Arm(name, gw, log, sims)
    fleet.wait_ready()
    return arms


@dataclass(slots=True)
class ArmResult:
    scenario: str
    arm: str
    turns: int
    errors: int
    later_ttft_ms: dict[str, float | None]
    first_ttft_p50_ms: float | None
    after_fault_p99_ms: float | None
    cache_hit_share: float  # provider side: cached / all prompt tokens the simulators prefilled or reused
    balance: float  # busiest deployment's requests / mean
    served: dict[str, int]
    route_reasons: dict[str, int]


def summarize(scenario: str, arm: Arm) -> ArmResult:
    later = sorted(t.ttft_ms for t in arm.turns if t.turn > 0 and t.ttft_ms is not None)
    first = sorted(t.ttft_ms for t in arm.turns if t.turn == 0 and t.ttft_ms is not None)
    after = sorted(t.ttft_ms for t in arm.turns if t.after_fault and t.ttft_ms is not None)
    stats = [sim_stats(s) for s in arm.sims]
    cached = sum(s["prompt_tokens"]["cached"] for s in stats)
    uncached = sum(s["prompt_tokens"]["uncached"] for s in stats)
    served = {f"d{j}": s["served"]["chat"] for j, s in enumerate(stats)}
    mean = statistics.mean(served.values()) or 1.0
    recs = access_records(arm.access_log, "", expect=len(arm.turns))
    reasons: dict[str, int] = {}
    for r in recs:
        reasons[str(r["route_reason"])] = reasons.get(str(r["route_reason"]), 0) + 1
    return ArmResult(
        scenario=scenario,
        arm=arm.name,
        turns=len(arm.turns),
        errors=sum(t.status != 200 for t in arm.turns),
        later_ttft_ms={
            "mean": statistics.mean(later) if later else None,
            "p50": percentile(later, 50),
            "p95": percentile(later, 95),
            "p99": percentile(later, 99),
        },
        first_ttft_p50_ms=percentile(first, 50),
        after_fault_p99_ms=percentile(after, 99) if after else None,
        cache_hit_share=cached / ((cached + uncached) or 1),
        balance=max(served.values()) / mean,
        served=served,
        route_reasons=reasons,
    )


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def report(a: argparse.Namespace, res: list[ArmResult], meta: dict[str, str]) -> tuple[str, bool]:
    rows = [
        "| scenario | routing | later turns TTFT mean | p50 | p95 | p99 | after the fault p99 | first turn p50 "
        "| cache-hit share | busiest / mean | errors |",
        "|---|---|" + "---|" * 9,
    ]
    for r in res:
        t = r.later_ttft_ms
        rows.append(
            f"| {r.scenario} | {r.arm} | {fmt(t['mean'])} | {fmt(t['p50'])} | {fmt(t['p95'])} "
            f"| {fmt(t['p99'])} | {fmt(r.after_fault_p99_ms)} | {fmt(r.first_ttft_p50_ms)} "
            f"| {100 * r.cache_hit_share:.0f} % | {r.balance:.2f} | {r.errors} |"
        )
    by = {(r.scenario, r.arm): r for r in res}
    checks: list[tuple[str, bool]] = []
    for sc in a.scenarios:
        aff, lat = by.get((sc, "affinity")), by.get((sc, "latency"))
        if aff is None or lat is None:
            continue
        if sc == "steady":
            am, lm = aff.later_ttft_ms["mean"] or 0.0, lat.later_ttft_ms["mean"] or 0.0
            checks.append(
                (
                    f"steady: later-turn mean TTFT {am:.0f} ms <= half of latency routing's {lm:.0f} ms",
                    am <= lm / 2,
                )
            )
            checks.append(
                (
                    f"steady: cache-hit share {100 * aff.cache_hit_share:.0f} % >= 70 %",
                    aff.cache_hit_share >= 0.70,
                )
            )
            checks.append(
                (f"steady: busiest deployment {aff.balance:.2f}x the mean <= 1.3x", aff.balance <= 1.3)
            )
        else:
            ap, lp = aff.later_ttft_ms["p99"] or 0.0, lat.later_ttft_ms["p99"] or 0.0
            checks.append((f"{sc}: later-turn p99 {ap:.0f} ms <= latency routing's {lp:.0f} ms", ap <= lp))
    lines = [f"- {'met' if ok else 'MISSED'}: {what}" for what, ok in checks]
    lines += [f"- {r.scenario} / {r.arm}: served {r.served}; route reasons {r.route_reasons}" for r in res]
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    md = (
        f"# Prefix-cache affinity benchmark ({meta['date']})\n\n{head}\n\nClient-side TTFT in ms of the turns "
        'after each conversation\'s first ("after the fault": turns that started after the fault was injected); '
        "cache-hit share: prompt tokens the simulated providers served from their prefix cache; busiest / mean: "
        "requests served per deployment.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(lines) + "\n"
    )
    return md, all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not a.no_lock:
        take_lock()
    load_start = machine()
    res: list[ArmResult] = []
    t0 = time.monotonic()
    for scenario in a.scenarios:
        fleet = Fleet()
        try:
            try:
                arms = start(fleet, a, scenario)
            except RuntimeError as exc:
                print(f"affinity_bench: {exc}", file=sys.stderr)
                return 2
            asyncio.run(drive(arms, scenario, a))
            res += [summarize(scenario, arm) for arm in arms.values()]
        finally:
            fleet.stop()
    wall = time.monotonic() - t0
    meta = report_meta(
        "affinity_bench.py",
        argv,
        load_start,
        f"{a.deployments} deployments per arm, lognormal base TTFT median {a.ttft_ms:g} ms (sigma "
        f"{a.sigma:g}) + {a.prefill_ms_per_1k:g} ms per 1,000 uncached prompt tokens, prefix cache "
        f"{a.cache_tokens:,} tokens each; {a.tokens} tokens {a.itl_ms:g} ms apart",
        f"{a.conversations} concurrent conversations x {a.turns} turns per arm, arms concurrent; "
        f"system prompt ~{a.system_tokens} tokens (shared) + a ~{a.doc_tokens}-token document per "
        f"conversation, ~{a.question_tokens}-token questions, think time {a.think_ms:g} ms "
        f"(mean); wall time {wall:.0f} s",
    )
    md, ok = report(a, res, meta)
    out = a.out or REPO / "loadtests" / "results" / f"affinity-{time.strftime('%Y-%m-%d')}.md"
    write_report(out, md, {"meta": meta, "results": [asdict(r) for r in res]})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
