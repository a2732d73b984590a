"""The benchmark's arithmetic: added latency is paired with direct per round, ratios ignore noise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "loadtests" / "bench_report.py"
_spec = importlib.util.spec_from_file_location("bench_report", _PATH)
assert _spec is not None and _spec.loader is not None
br = importlib.util.module_from_spec(_spec)
sys.modules["bench_report"] = br
_spec.loader.exec_module(br)


def run(
    target: str,
    rnd: int,
    p50: float,
    conc: int = 1,
    mode: str = "json",
    cpu: float | None = None,
    rate: float | None = None,
    rps: float = 100.0,
) -> br.Run:
    r = br.Run(target, mode, conc, rnd, rps, 10, 10, {}, {"p50": p50, "p99": p50 * 2}, None)
    r.cpu_ms_per_req = cpu
    r.rate = rate
    return r


def test_added_latency_is_the_median_of_per_round_differences_with_direct() -> None:
    # direct drifts between rounds; the gateway is always 1 ms above it in the same round
    runs = [
        run("direct", 0, 1.0),
        run("direct", 1, 5.0),
        run("direct", 2, 9.0),
        run("llmgw", 0, 2.0),
        run("llmgw", 1, 6.0),
        run("llmgw", 2, 10.0),
    ]
    summ = br.summarize(runs, ["direct", "llmgw"], ["json"], [1])
    gw = next(s for s in summ if s.target == "llmgw")
    assert gw.added_p50 == 1.0
    assert gw.added_p99 == 2.0
    assert gw.p50 == 6.0  # the plain median mixes the drift in; 'added' does not


def test_ratio_is_undefined_for_non_positive_added_latency() -> None:
    assert br.ratio(2.0, 1.0) == 2.0
    assert br.ratio(-0.1, 1.0) is None
    assert br.ratio(1.0, None) is None


def test_headline_takes_latency_at_low_and_cpu_at_chosen_concurrency() -> None:
    runs = [
        run("direct", 0, 1.0),
        run("direct", 0, 3.0, conc=16),
        run("floor", 0, 1.5, cpu=0.5),
        run("floor", 0, 5.0, conc=16, cpu=0.4),
    ]
    summ = br.summarize(runs, ["direct", "floor"], ["json"], [1, 16])
    h = br.headline(summ, "floor", lat_conc=1, cpu_conc=16)
    assert h.added_p50_json == 0.5
    assert h.cpu_json == 0.4
    table = br.headline_table(summ, ["direct", "floor"], 1, 16)
    assert "| floor | 0.50 |" in table


def test_gateway_rows_compare_with_each_reference_present_and_lean_is_not_a_gateway() -> None:
    runs = [
        run("direct", 0, 1.0, cpu=None),
        run("lean", 0, 1.2, cpu=0.02),
        run("envoy", 0, 1.2, cpu=0.03),
        run("llmgw", 0, 1.4, cpu=0.09),
    ]
    targets = ["direct", "lean", "envoy", "llmgw"]
    table = br.headline_table(br.summarize(runs, targets, ["json"], [1]), targets, 1, 1)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()}
    assert "**llmgw ÷ lean**" in rows and "**llmgw ÷ Envoy**" in rows
    assert "| 2.00x |" in rows["**llmgw ÷ lean**"]  # added p50: 0.4 ms against 0.2 ms
    assert "| 4.50x |" in rows["**llmgw ÷ lean**"]  # CPU per request: 0.09 against 0.02
    assert not any(name.startswith("**lean ÷") for name in rows)  # a reference, never compared itself
    assert "**llmgw ÷ floor**" not in rows  # absent from the run: no row


def test_paced_level_is_its_own_group_with_its_own_headline_columns() -> None:
    # Same clients (8), one closed loop and one paced at 25/s: never mixed, paired with direct's paced runs.
    runs = [
        run("direct", 0, 1.0),
        run("direct", 0, 0.9, conc=8, rate=25.0, rps=25.0),
        run("direct", 0, 3.0, conc=8, rps=9000.0),
        run("envoy", 0, 1.2),
        run("envoy", 0, 1.9, conc=8, rate=25.0, rps=25.0),
        run("envoy", 0, 3.2, conc=8, rps=8000.0),
        run("llmgw", 0, 1.3),
        run("llmgw", 0, 2.4, conc=8, rate=25.0, rps=25.0),
        run("llmgw", 0, 3.5, conc=8, rps=7000.0),
    ]
    paced = br.Level(8, 25.0)
    targets = ["direct", "envoy", "llmgw"]
    summ = br.summarize(runs, targets, ["json"], [1, 8], [paced])
    gw = br.headline(summ, "llmgw", lat_conc=1, cpu_conc=8, paced=paced)
    assert gw.added_p50_json is not None and abs(gw.added_p50_json - 0.3) < 1e-9  # back to back, c=1
    assert gw.paced_p50_json is not None and abs(gw.paced_p50_json - 1.5) < 1e-9  # 2.4 - 0.9, same level
    assert gw.rps_json == 7000.0  # a paced run's rate is what was offered, never the best RPS
    table = br.headline_table(summ, targets, 1, 8, paced)
    header = table.splitlines()[0]
    assert "added p50 json, c=1 (ms)" in header and "added p50 json, 25/s (ms)" in header
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()}
    assert "| 1.50x |" in rows["**llmgw ÷ Envoy**"]  # paced added p50: 1.5 ms against 1.0 ms
    assert "25/s" in br.full_table(summ)
    # without a paced level the table keeps its columns
    plain = br.headline_table(br.summarize(runs, targets, ["json"], [1, 8]), targets, 1, 8)
    assert "/s (ms)" not in plain.splitlines()[0]
