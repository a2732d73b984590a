#!/usr/bin/env python3
"""Resilience benchmark: client success and upstream amplification at provider failure rates 0-100 %.

For each failure rate a fresh gateway process (default retry and outlier settings) fronts one
simulated deployment that answers that share of requests with a 503; clients send ``--requests``
requests at ``--concurrency``; the simulator counts what reached it. Amplification is upstream
requests per client request: 1/(1 - rate) is what hiding every failure costs, 1.0 is no retry at all.

    .venv/bin/python loadtests/resilience.py                       # 0,10,30,50,100 %; 2,000 requests each
    .venv/bin/python loadtests/resilience.py --requests 40 --rates 0,30,100 --concurrency 4   # smoke run
    .venv/bin/python loadtests/resilience.py --out loadtests/results/resilience.md
    .venv/bin/python loadtests/resilience.py --litellm <venv>/bin/litellm   # LiteLLM's proxy next to it

Exit codes: 0 done, 1 the gateway failed to start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.sim.profile import SimProfile  # noqa: E402
from gateway.sim.runner import SimThread  # noqa: E402

PROVIDER = {"ttft_ms": 20, "ttft_dist": "fixed", "itl_ms": 2, "tokens": 4, "tail_p": 0, "error_status": 503}


@dataclass(frozen=True)
class Row:
    target: str
    rate: float
    requests: int
    ok: int
    upstream: int
    p50_ms: float
    p99_ms: float

    @property
    def success(self) -> float:
        return self.ok / self.requests

    @property
    def amplification(self) -> float:
        return self.upstream / self.requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, what: str) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"resilience: {what} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"resilience: {what} not ready after 60 s")


LITELLM_KEY = "sk-resilience-local"


def start_litellm(binary: str, num_retries: int, sim_url: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    """LiteLLM's proxy with no database or callbacks, ``num_retries`` retries (it has no retry budget)."""
    port = free_port()
    cfg = {
        "model_list": [
            {
                "model_name": "chat",
                "litellm_params": {"model": "openai/sim-large", "api_base": sim_url, "api_key": "sim"},
            }
        ],
        "litellm_settings": {"num_retries": num_retries, "request_timeout": 60, "callbacks": []},
        "router_settings": {"num_retries": num_retries},
        "general_settings": {"disable_spend_logs": True, "disable_error_logs": True},
    }
    path = tmp / f"litellm-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL")}
    env.update(
        LITELLM_LOG="ERROR",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOCAL_BLOG_POSTS="True",
        LITELLM_LOCAL_POLICY_TEMPLATES="True",
        LITELLM_MODE="PRODUCTION",
        LITELLM_TELEMETRY="False",
        DISABLE_ADMIN_UI="True",
        LITELLM_MASTER_KEY=LITELLM_KEY,
    )
    proc = subprocess.Popen(
        [binary, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + "/health/liveliness", "litellm")
    return proc, url


def start_gateway(sim_url: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = {
        "server": {"host": "127.0.0.1", "port": port},
        "access_log": {"path": str(tmp / f"access-{port}.jsonl"), "format": "json"},
        "models": [
            {
                "name": "chat",
                "deployments": [
                    {
                        "id": "a",
                        "base_url": sim_url,
                        "api_key": "sim",
                        "model": "sim-large",
                        "region": "us-east",
                    }
                ],
            }
        ],
    }
    path = tmp / f"gw-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "error"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + "/readyz", "gateway")
    return proc, url


async def drive(url: str, requests: int, concurrency: int) -> tuple[int, list[float]]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    ok = 0
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    headers = {
        "authorization": f"Bearer {LITELLM_KEY}"
    }  # LiteLLM needs its master key; the gateway ignores it
    async with httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=concurrency), headers=headers
    ) as client:

        async def one() -> None:
            nonlocal ok
            async with sem:
                t0 = time.monotonic()
                try:
                    r = await client.post(url + "/v1/chat/completions", json=body)
                    ok += r.status_code == 200
                except httpx.HTTPError:  # a client timeout is a failed request too
                    pass
                latencies.append((time.monotonic() - t0) * 1000.0)

        await asyncio.gather(*(one() for _ in range(requests)))
    return ok, sorted(latencies)


def measure(
    target: str, rate: float, requests: int, concurrency: int, tmp: Path, a: argparse.Namespace
) -> Row:
    profile = SimProfile()
    profile.update({**PROVIDER, "error_rate": rate})
    sims = SimThread([("a", "us-east", profile)])
    port = sims.start()["a"]
    sim_url = f"http://127.0.0.1:{port}/v1"
    if target == "llmgw":
        proc, url = start_gateway(sim_url, tmp)
    else:
        proc, url = start_litellm(a.litellm, a.litellm_num_retries, sim_url, tmp)
    try:
        ok, lat = asyncio.run(drive(url, requests, concurrency))
        stats = httpx.get(f"http://127.0.0.1:{port}/sim/stats", timeout=5).json()
        upstream = stats["served"]["chat"] + sum(stats["errors_injected"].values())
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:  # LiteLLM may ignore SIGTERM while it has work queued
            proc.kill()
            proc.wait()
        sims.stop()
    return Row(
        target, rate, requests, ok, upstream, lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    )


def markdown(rows: list[Row], concurrency: int, litellm_retries: int) -> str:
    lines = [
        f"Resilience, one deployment answering 503 to a share of requests, {concurrency} concurrent clients, "
        f"a fresh process per row; llmgw with default settings"
        + (
            f", LiteLLM with num_retries: {litellm_retries}"
            if any(r.target == "litellm" for r in rows)
            else ""
        ),
        "",
        "| proxy | provider failure rate | requests | client success | upstream requests | amplification "
        "| 1/(1-rate) | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        need = f"{1 / (1 - r.rate):.2f}x" if r.rate < 1 else "∞"
        lines.append(
            f"| {r.target} | {r.rate * 100:.0f}% | {r.requests} | {r.success * 100:.1f}% | {r.upstream} | "
            f"{r.amplification:.2f}x | {need} | {r.p50_ms:.0f} | {r.p99_ms:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0,10,30,50,100", help="failure rates in percent")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument(
        "--litellm", metavar="BIN", help="also measure LiteLLM's proxy (path of its `litellm` script)"
    )
    ap.add_argument("--litellm-num-retries", type=int, default=3, help="LiteLLM's num_retries (default 3)")
    a = ap.parse_args(argv)
    rows = []
    targets = ["llmgw"] + (["litellm"] if a.litellm else [])
    with tempfile.TemporaryDirectory(prefix="llmgw-resilience-") as tmp:
        for pct in (float(x) for x in a.rates.split(",") if x.strip()):
            for target in targets:
                rows.append(measure(target, pct / 100.0, a.requests, a.concurrency, Path(tmp), a))
                print(
                    f"[resilience] {target} {pct:.0f}%: {rows[-1].ok}/{rows[-1].requests} ok, "
                    f"{rows[-1].amplification:.2f}x",
                    file=sys.stderr,
                    flush=True,
                )
    text = markdown(rows, a.concurrency, a.litellm_num_retries)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
