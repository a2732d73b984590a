"""Summaries and the markdown report of loadtests/bench.py (pure functions of the measured runs)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DIRECT = "direct"
FLOOR = "floor"
LEAN = "lean"
LITELLM = "litellm"
ENVOY = "envoy"
PORTKEY = "portkey"
PEERS = (DIRECT, FLOOR, LEAN, ENVOY, PORTKEY, LITELLM)


@dataclass(frozen=True, slots=True)
class Level:
    """How the load is offered: ``conc`` closed-loop clients, or (``rate`` set) Poisson arrivals per second
    with at most ``conc`` in flight. A paced level leaves the proxy idle between requests, as light traffic
    does: what a request costs when caches and an idle CPU have to wake up, which back-to-back load hides."""

    conc: int
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"{self.rate:g}/s" if self.rate is not None else str(self.conc)


@dataclass(slots=True)
class Run:
    """One loadgen run against one target, with the proxy's CPU and memory over the same interval."""

    target: str
    mode: str  # json | stream
    conc: int  # closed loop: clients; paced: the most in flight
    round: int
    rps: float
    ok: int
    completed_all: int  # every response, warm-up included (the CPU interval covers them all)
    errors: dict[str, int]
    lat: dict[str, float] | None
    ttft: dict[str, float] | None
    cpu_ms_per_req: float | None = None
    sys_ms_per_req: float | None = None  # of cpu_ms_per_req, the part spent in the kernel
    cpu_pct: float | None = None
    rss_mb: float | None = None
    gateway_overhead_ms: float | None = None  # median of the access log's gateway_overhead_ms over the run
    rate: float | None = None  # paced runs: arrivals per second (None: closed loop)

    @property
    def level(self) -> Level:
        return Level(self.conc, self.rate)

    @classmethod
    def from_loadgen(cls, target: str, mode: str, level: Level, rnd: int, r: dict[str, Any]) -> Run:
        return cls(
            target,
            mode,
            level.conc,
            rnd,
            float(r["rps"]),
            int(r["ok"]),
            int(r["completed_all"]),
            dict(r.get("errors") or {}),
            r.get("latency_ms") or None,
            r.get("ttft_ms") or None,
            rate=level.rate,
        )


@dataclass(slots=True)
class Summary:
    """Median over rounds for one (mode, concurrency, target); 'added' is paired with direct per round."""

    mode: str
    conc: int
    target: str
    rounds: int
    rps: float | None
    p50: float | None
    p99: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    added_p50: float | None
    added_p99: float | None
    added_ttft_p50: float | None
    added_ttft_p99: float | None
    cpu_ms: float | None
    cpu_pct: float | None
    rss_mb: float | None
    errors: dict[str, int] = field(default_factory=dict)
    gateway_overhead_ms: float | None = None
    rate: float | None = None  # paced level: arrivals per second
    sys_ms: float | None = None  # of cpu_ms, the kernel's part

    @property
    def level(self) -> Level:
        return Level(self.conc, self.rate)


def median(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _q(d: dict[str, float] | None, key: str) -> float | None:
    return None if d is None else d.get(key)


def _paired(runs: list[Run], base: dict[int, Run], attr: str, key: str) -> float | None:
    diffs = []
    for r in runs:
        b = base.get(r.round)
        mine, theirs = _q(getattr(r, attr), key), _q(getattr(b, attr), key) if b else None
        if mine is not None and theirs is not None:
            diffs.append(mine - theirs)
    return median(diffs)


def summarize(
    runs: list[Run], targets: list[str], modes: list[str], concs: list[int], paced: Iterable[Level] = ()
) -> list[Summary]:
    groups: dict[tuple[str, Level, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.mode, r.level, r.target), []).append(r)
    levels = [Level(c) for c in concs] + list(paced)
    out = []
    for mode in modes:
        for lv in levels:
            base = {r.round: r for r in groups.get((mode, lv, DIRECT), [])}
            for t in targets:
                rs = groups.get((mode, lv, t), [])
                if not rs:
                    continue
                paired = t != DIRECT
                errors: dict[str, int] = {}
                for r in rs:
                    for k, v in r.errors.items():
                        errors[k] = errors.get(k, 0) + v
                out.append(
                    Summary(
                        mode,
                        lv.conc,
                        t,
                        len(rs),
                        median(r.rps for r in rs),
                        median(_q(r.lat, "p50") for r in rs),
                        median(_q(r.lat, "p99") for r in rs),
                        median(_q(r.ttft, "p50") for r in rs),
                        median(_q(r.ttft, "p99") for r in rs),
                        _paired(rs, base, "lat", "p50") if paired else None,
                        _paired(rs, base, "lat", "p99") if paired else None,
                        _paired(rs, base, "ttft", "p50") if paired else None,
                        _paired(rs, base, "ttft", "p99") if paired else None,
                        median(r.cpu_ms_per_req for r in rs),
                        median(r.cpu_pct for r in rs),
                        max((r.rss_mb for r in rs if r.rss_mb is not None), default=None),
                        errors,
                        median(r.gateway_overhead_ms for r in rs),
                        lv.rate,
                        median(r.sys_ms_per_req for r in rs),
                    )
                )
    return out


# ------------------------------------------------------------------ headline


@dataclass(slots=True)
class Headline:
    target: str
    added_p50_json: float | None
    added_p99_json: float | None
    added_ttft_p50: float | None
    added_ttft_p99: float | None
    cpu_json: float | None
    cpu_stream: float | None
    rps_json: float | None
    rps_stream: float | None
    rss_mb: float | None
    paced_p50_json: float | None = None
    paced_p99_json: float | None = None
    paced_ttft_p50: float | None = None
    paced_ttft_p99: float | None = None

    LATENCY = ("added_p50_json", "added_p99_json", "added_ttft_p50", "added_ttft_p99")
    PACED = ("paced_p50_json", "paced_p99_json", "paced_ttft_p50", "paced_ttft_p99")
    COST = ("cpu_json", "cpu_stream", "rps_json", "rps_stream")
    METRICS = LATENCY + COST

    @staticmethod
    def metrics(paced: bool) -> tuple[str, ...]:
        return Headline.LATENCY + Headline.PACED + Headline.COST if paced else Headline.METRICS


def headline(
    summ: list[Summary], target: str, lat_conc: int, cpu_conc: int, paced: Level | None = None
) -> Headline:
    def one(mode: str, level: Level) -> Summary | None:
        return next((s for s in summ if s.target == target and s.mode == mode and s.level == level), None)

    def best_rps(mode: str) -> float | None:
        vals = [
            s.rps
            for s in summ
            if s.target == target and s.mode == mode and s.rate is None and s.rps is not None
        ]
        return max(vals) if vals else None

    j, s = one("json", Level(lat_conc)), one("stream", Level(lat_conc))
    jc, sc = one("json", Level(cpu_conc)), one("stream", Level(cpu_conc))
    jp, sp = (one("json", paced), one("stream", paced)) if paced is not None else (None, None)
    rss = [x.rss_mb for x in summ if x.target == target and x.rss_mb is not None]
    return Headline(
        target,
        j and j.added_p50,
        j and j.added_p99,
        s and s.added_ttft_p50,
        s and s.added_ttft_p99,
        jc and jc.cpu_ms,
        sc and sc.cpu_ms,
        best_rps("json"),
        best_rps("stream"),
        max(rss) if rss else None,
        jp and jp.added_p50,
        jp and jp.added_p99,
        sp and sp.added_ttft_p50,
        sp and sp.added_ttft_p99,
    )


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a <= 0 or b <= 0:
        return None  # a non-positive 'added' is noise around zero: no meaningful ratio
    return a / b


# ------------------------------------------------------------------ rendering


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f}x" if v >= 10 else f"{v:.2f}x")


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def headline_table(
    summ: list[Summary], targets: list[str], lat_conc: int, cpu_conc: int, paced: Level | None = None
) -> str:
    heads = {t: headline(summ, t, lat_conc, cpu_conc, paced) for t in targets if t != DIRECT}
    metrics = Headline.metrics(paced is not None)
    latency = ["added p50 json", "added p99 json", "added TTFT p50 stream", "added TTFT p99 stream"]
    cols = [
        *(f"{c}, c={lat_conc} (ms)" for c in latency),
        *(f"{c}, {paced.label} (ms)" for c in latency if paced is not None),
        f"CPU/request json, c={cpu_conc} (ms)",
        f"CPU/request stream, c={cpu_conc} (ms)",
        "RPS per core json",
        "RPS per core stream",
        "RSS max (MB)",
    ]
    lines = [_row(["target", *cols]), _row(["---"] * (len(cols) + 1))]
    for t, h in heads.items():
        lines.append(_row([t, *(fmt(getattr(h, m)) for m in metrics), fmt(h.rss_mb, 0)]))
    gateways = [t for t in heads if t not in PEERS]
    for g in gateways:
        h = heads[g]
        for peer, label in ((ENVOY, "Envoy"), (LEAN, "lean"), (FLOOR, "floor")):
            if peer in heads:
                f = heads[peer]
                lines.append(
                    _row(
                        [
                            f"**{g} ÷ {label}**",
                            *(fmt_ratio(ratio(getattr(h, m), getattr(f, m))) for m in metrics),
                            "-",
                        ]
                    )
                )
        for peer, label in ((PORTKEY, "Portkey"), (LITELLM, "LiteLLM")):
            if peer in heads:
                lt = heads[peer]
                # for RPS higher is better, so the ratio is turned round to read "how many times better"
                cells = [
                    fmt_ratio(
                        ratio(getattr(h, m), getattr(lt, m))
                        if m.startswith("rps")
                        else ratio(getattr(lt, m), getattr(h, m))
                    )
                    for m in metrics
                ]
                lines.append(_row([f"**{label} ÷ {g}** (RPS: {g} ÷ {label})", *cells, "-"]))
    return "\n".join(lines)


def full_table(summ: list[Summary]) -> str:
    cols = [
        "mode",
        "c",
        "target",
        "RPS",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "TTFT p50",
        "+TTFT p50",
        "+TTFT p99",
        "CPU ms/req",
        "of it kernel",
        "CPU %",
        "RSS MB",
        "errors",
    ]
    lines = [_row(cols), _row(["---"] * len(cols))]
    for s in summ:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or ""
        lines.append(
            _row(
                [
                    s.mode,
                    s.level.label,
                    s.target,
                    fmt(s.rps, 1),
                    fmt(s.p50),
                    fmt(s.p99),
                    fmt(s.added_p50),
                    fmt(s.added_p99),
                    fmt(s.ttft_p50),
                    fmt(s.added_ttft_p50),
                    fmt(s.added_ttft_p99),
                    fmt(s.cpu_ms, 3),
                    fmt(s.sys_ms, 3),
                    fmt(s.cpu_pct, 0),
                    fmt(s.rss_mb, 0),
                    errs,
                ]
            )
        )
    return "\n".join(lines)


def markdown(
    title: str,
    meta_lines: list[str],
    summ: list[Summary],
    targets: list[str],
    lat_conc: int,
    cpu_conc: int,
    notes: list[str],
    paced: Level | None = None,
) -> str:
    parts = [
        f"# {title}",
        "",
        *(f"- {m}" for m in meta_lines),
        "",
        "## Headline",
        "",
        f"Added latency at c={lat_conc} (back to back)"
        + (
            f" and at {paced.label} (Poisson arrivals: light traffic, the proxy idle between requests)"
            if paced is not None
            else ""
        )
        + f"; CPU per request at c={cpu_conc}; RPS per core = best closed-loop "
        "level with the proxy pinned to one core. Ratios: gateway ÷ Envoy, ÷ lean and ÷ floor (lower is "
        "better, 1.00x = on par) and Portkey or LiteLLM ÷ gateway (how many times cheaper).",
        "",
        headline_table(summ, targets, lat_conc, cpu_conc, paced),
        "",
        "## All runs",
        "",
        "Medians over rounds. `+` columns: median over rounds of (target − direct) in the same round. "
        "`c`: closed-loop clients, or `N/s`: Poisson arrivals per second (open loop).",
        "",
        full_table(summ),
        "",
    ]
    if notes:
        parts += ["## Checks", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(parts)
