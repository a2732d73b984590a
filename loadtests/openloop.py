"""Open-loop streaming load for the hedging and routing benchmarks: Poisson arrivals, client-side TTFT.

Every request is sent at its scheduled time whether or not earlier ones have answered (open loop), so a
slow upstream cannot slow the offered load down and hide its own tail. TTFT is measured from the
*scheduled* send time to the first SSE event carrying non-empty ``delta.content``, as the client sees it.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

# The simulator names the producer of every token: "{sim}#{serial}:{i} " (docs/simulator.md).
TOKEN = re.compile(r"([\w.-]+)#(\d+):\d+ ")
QUANTILES = (50.0, 95.0, 99.0, 99.9)


@dataclass(slots=True)
class StreamResult:
    request_id: str
    t_sched: float  # seconds after the start of the run
    lag_s: float  # how late the client actually sent it (its own scheduling delay)
    status: int = 0
    ttft_s: float | None = None
    total_s: float | None = None
    error: str | None = None
    producers: set[tuple[str, str]] = field(default_factory=set)  # (sim, serial) of every content token

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.ttft_s is not None


def poisson_schedule(n: int, rate: float, seed: int) -> list[float]:
    """``n`` arrival times (s from 0) of a Poisson process of ``rate`` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ttft_summary(results: Iterable[StreamResult], qs: Sequence[float] = QUANTILES) -> dict[str, float | None]:
    """TTFT percentiles in ms over the successful streams, plus their count and max."""
    v = sorted(r.ttft_s * 1000.0 for r in results if r.ok)
    out: dict[str, float | None] = {f"p{q:g}": percentile(v, q) for q in qs}
    out["max"] = v[-1] if v else None
    out["n"] = float(len(v))
    return out


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    res: StreamResult,
    t_sched_abs: float,
) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = f"http {resp.status}"
                await resp.read()
                return
            text: list[str] = []
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                choices = orjson.loads(line[6:]).get("choices") or ()
                content = choices[0].get("delta", {}).get("content") if choices else None
                if content:
                    if res.ttft_s is None:
                        res.ttft_s = time.perf_counter() - t_sched_abs
                    text.append(content)
            res.total_s = time.perf_counter() - t_sched_abs
            res.producers = {(m.group(1), m.group(2)) for m in TOKEN.finditer("".join(text))}
            if res.ttft_s is None:
                res.error = "no content token"
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"


async def run_open_loop(
    url: str,
    model: str,
    schedule: Sequence[float],
    *,
    id_prefix: str,
    headers: dict[str, str] | None = None,
    max_tokens: int = 16,
    timeout_s: float = 30.0,
) -> list[StreamResult]:
    """Send one streaming chat completion per scheduled time to ``url`` (…/v1/chat/completions)."""
    body = orjson.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Say something short."}],
        }
    )
    base = {"content-type": "application/json", "authorization": "Bearer bench", **(headers or {})}
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    results: list[StreamResult] = []
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as session:
        start = time.perf_counter()
        for i, t in enumerate(schedule):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rid = f"{id_prefix}{i}"
            res = StreamResult(rid, t, max(0.0, time.perf_counter() - (start + t)))
            results.append(res)
            tasks.append(
                asyncio.create_task(_one(session, url, body, {**base, "x-request-id": rid}, res, start + t))
            )
        await asyncio.gather(*tasks)
    return results


__all__ = ["QUANTILES", "StreamResult", "percentile", "poisson_schedule", "run_open_loop", "ttft_summary"]
