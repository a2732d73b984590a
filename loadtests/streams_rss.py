#!/usr/bin/env python3
"""Memory of many concurrent open streams: N streams held open at once through one gateway worker.

Starts the simulator (``python -m gateway sim``) as a slow streaming provider (default: first token after
100 ms, then one token every 500 ms, 40 tokens: each stream stays open about 20 s) and one gateway worker
in front of it (every feature on, as in ``bench.py``; its upstream pool large enough for one connection per
stream). Opens ``--streams`` streams at ``--open-rate`` per second from one asyncio client, so all of them
are open at the same time for several seconds, samples the gateway's RSS from ``/proc`` every
``--sample-s`` and checks that every stream completed (all its tokens and ``data: [DONE]``). Prints the
peak RSS, the RSS while all streams were open and the idle RSS before the first stream.

    .venv/bin/python loadtests/streams_rss.py                         # 2,000 streams, limit 300 MB
    .venv/bin/python loadtests/streams_rss.py --streams 500 --itl-ms 200 --json loadtests/results/x.json

Exit codes: 0 all streams completed and the peak stayed under ``--limit-mb``; 1 otherwise; 2 set-up problem.
Takes the same lock as the other benchmarks (``bench.lock`` in the temp dir), so it never overlaps one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from bench_procs import tree_usage
from fleet import Fleet, access_records, machine, take_lock

MODEL = "slow"


@dataclass(slots=True)
class Counts:
    """What the client saw, updated by every stream as it goes."""

    open: int = 0  # response headers received, [DONE] not yet
    max_open: int = 0
    completed: int = 0  # every token and [DONE] arrived
    failed: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1


@dataclass(slots=True)
class Result:
    streams: int
    completed: int
    failed: dict[str, int]
    max_open: int
    idle_rss_mb: float
    peak_rss_mb: float
    all_open_rss_mb: float | None  # highest sample taken while every stream was open
    all_open_samples: int
    per_stream_kb: float | None  # (RSS with all open - idle) / streams
    seconds: float
    access_log_records: int
    access_log_non200: int
    pool_wait_ms_max: float | None
    hedges: int
    retries: int
    limit_mb: float
    passed: bool
    settings: dict[str, Any]
    machine: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--open-rate", type=float, default=500.0, help="streams opened per second")
    ap.add_argument("--ttft-ms", type=float, default=100.0)
    ap.add_argument("--itl-ms", type=float, default=500.0)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--sample-s", type=float, default=0.2, help="RSS sampling interval")
    ap.add_argument("--limit-mb", type=float, default=300.0, help="pass when the peak RSS stays below this")
    ap.add_argument(
        "--timeout", type=float, default=100.0, help="give up on the streams after this many seconds"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    ap.add_argument("--no-lock", action="store_true", help="do not take the benchmark lock")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, access log, stderr)")
    a = ap.parse_args(argv)
    if a.streams < 1 or a.open_rate <= 0 or a.tokens < 1:
        ap.error("need at least one stream and token, and a positive --open-rate")
    return a


def raise_fd_limit(needed: int) -> None:
    """Each stream holds a client socket here and two in the gateway (downstream, upstream); children inherit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        print(f"streams_rss: the open-files limit ({hard}) is below the {needed} needed", file=sys.stderr)
        raise SystemExit(2)


def gateway_config(sim_url: str, streams: int) -> dict[str, Any]:
    dep = {"base_url": sim_url + "/v1", "api_key": "sk-streams", "model": "sim-model", "region": "local"}
    return {
        "server": {"region": "local", "drain_timeout_s": 2},
        "state": {"backend": "memory"},
        "model_defaults": {
            "timeouts": {
                "connect_ms": 2000,
                "ttft_ms": 10000,
                "idle_ms": 10000,
                "per_try_ms": 120000,
                "total_ms": 120000,
            },
            # one upstream connection per open stream: a smaller pool would queue streams, not hold them
            "pool": {"min_connections": 4, "max_connections": streams + 64},
        },
        "models": [
            {
                "name": MODEL,
                "deployments": [{"id": "sim-a", **dep}, {"id": "sim-b", **dep}],
                "routing": {"strategy": "latency", "locality": "prefer"},
                "retry": {"max_retries": 2},
                "hedging": {"enabled": True, "delay_ms": "auto", "min_delay_ms": 1000, "max_delay_ms": 2000},
            }
        ],
    }


async def one_stream(
    http: aiohttp.ClientSession, url: str, tokens: int, delay: float, counts: Counts
) -> None:
    await asyncio.sleep(delay)
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "hold this stream open"}],
    }
    got, done, opened = 0, False, False
    try:
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                counts.fail(f"HTTP {resp.status}")
                return
            opened = True
            counts.open += 1
            counts.max_open = max(counts.max_open, counts.open)
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                delta = orjson.loads(line[6:])["choices"]
                if delta and delta[0].get("delta", {}).get("content"):
                    got += 1
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        counts.fail(type(exc).__name__)
        return
    finally:
        if opened:
            counts.open -= 1
    if done and got == tokens:
        counts.completed += 1
    else:
        counts.fail("incomplete")


async def drive(
    a: argparse.Namespace, gw_url: str, gw_pid: int
) -> tuple[Counts, list[tuple[float, int, float]]]:
    """Run every stream; returns the client's counts and RSS samples (t, open streams, MB)."""
    counts = Counts()
    samples: list[tuple[float, int, float]] = []
    connector = aiohttp.TCPConnector(limit=0)  # one connection per stream, as N separate clients would have
    timeout = aiohttp.ClientTimeout(total=a.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        url = gw_url + "/v1/chat/completions"
        t0 = time.monotonic()
        tasks = [
            asyncio.create_task(one_stream(http, url, a.tokens, i / a.open_rate, counts))
            for i in range(a.streams)
        ]
        pending = asyncio.gather(*tasks)
        while not pending.done():
            samples.append((time.monotonic() - t0, counts.open, tree_usage(gw_pid).rss_bytes / 2**20))
            await asyncio.wait([pending], timeout=a.sample_s)
        await pending
    return counts, samples


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    raise_fd_limit(3 * a.streams + 512)
    if not a.no_lock:
        take_lock()
    fleet = Fleet()
    try:
        sim = fleet.sim(
            "sim", "local", 1, ttft_ms=a.ttft_ms, ttft_dist="fixed", itl_ms=a.itl_ms, tokens=a.tokens
        )
        sim.wait_ready("/sim/stats")
        gw, log_path = fleet.gateway("gw", gateway_config(sim.url, a.streams))
        gw.wait_ready("/readyz", 120)
        time.sleep(1.0)  # let start-up work (pre-warm, first metrics) settle before the idle reading
        idle = tree_usage(gw.proc.pid).rss_bytes / 2**20
        t0 = time.monotonic()
        counts, samples = asyncio.run(drive(a, gw.url, gw.proc.pid))
        seconds = time.monotonic() - t0
        recs = access_records(log_path, "", timeout=10.0, expect=a.streams)
    finally:
        fleet.stop()
        if a.keep:
            print(f"kept {fleet.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(fleet.tmp, ignore_errors=True)
    all_open = [mb for _, n, mb in samples if n == a.streams]
    waits = [r["pool_wait_ms"] for r in recs if r.get("pool_wait_ms") is not None]
    peak = max([mb for _, _, mb in samples] + [idle])
    res = Result(
        streams=a.streams,
        completed=counts.completed,
        failed=counts.failed,
        max_open=counts.max_open,
        idle_rss_mb=round(idle, 1),
        peak_rss_mb=round(peak, 1),
        all_open_rss_mb=round(max(all_open), 1) if all_open else None,
        all_open_samples=len(all_open),
        per_stream_kb=round((max(all_open) - idle) * 1024 / a.streams, 1) if all_open else None,
        seconds=round(seconds, 1),
        access_log_records=len(recs),
        access_log_non200=sum(1 for r in recs if r.get("response_code") != 200),
        pool_wait_ms_max=max(waits) if waits else None,
        hedges=sum(r.get("hedge_count") or 0 for r in recs),
        retries=sum(r.get("retry_count") or 0 for r in recs),
        limit_mb=a.limit_mb,
        passed=counts.completed == a.streams and peak < a.limit_mb,
        settings={
            "open_rate": a.open_rate,
            "ttft_ms": a.ttft_ms,
            "itl_ms": a.itl_ms,
            "tokens": a.tokens,
            "sample_s": a.sample_s,
            "workers": 1,
        },
        machine=machine(),
    )
    print(
        f"streams: {res.completed}/{res.streams} completed, at most {res.max_open} open at once "
        f"(failures: {res.failed or 'none'}) in {res.seconds} s"
    )
    print(
        f"gateway RSS: idle {res.idle_rss_mb} MB, with all {res.streams} open {res.all_open_rss_mb} MB "
        f"({res.all_open_samples} samples, {res.per_stream_kb} KB per stream), peak {res.peak_rss_mb} MB "
        f"(limit {res.limit_mb:g} MB)"
    )
    print(
        f"access log: {res.access_log_records} records, {res.access_log_non200} non-200, "
        f"max pool_wait_ms {res.pool_wait_ms_max}, {res.retries} retries, {res.hedges} hedges"
    )
    print("PASS" if res.passed else "FAIL")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(asdict(res), indent=1) + "\n")
    return 0 if res.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
