"""`llmgw report ACCESS_LOG`: where the time went, from the gateway's JSON access logs.

Pure: reads a file (plain or .gz) or stdin, never the network. Lines are parsed one at a time with
orjson and reduced at once to a few numeric columns (report_stats): a million 1 kB lines take about
15 s and 130 MB on one core. Output formats: report_render.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import math
import sys
from dataclasses import replace
from typing import IO, cast

from gateway.telemetry.report_render import Format, render
from gateway.telemetry.report_stats import (
    TOP_GROUPS,
    Cause,
    CauseCount,
    GroupBy,
    GroupStats,
    MetricStats,
    RecordReader,
    Report,
    TailBreakdown,
    ThresholdSource,
    build_report,
    load_records,
    nearest_rank,
    parse_choice,
)


def _non_negative_ms(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {s!r}") from None
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return v


def _percentile(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentile: {s!r}") from None
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {s!r}")
    return v


def _top(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of rows: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (every group) or more, got {s!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "access_log",
        metavar="ACCESS_LOG",
        help="JSON-lines access log (access_log.format: json); .gz is read as gzip; - for stdin",
    )
    parser.add_argument(
        "--by",
        choices=[g.value for g in GroupBy],
        default=GroupBy.MODEL.value,
        help="group rows by model, deployment (upstream_cluster), region (upstream_region), "
        "route (route_reason) or path (default: model)",
    )
    parser.add_argument(
        "--top",
        type=_top,
        default=TOP_GROUPS,
        metavar="N",
        help=f"rows for the N groups with the most requests, the rest as one row (default: {TOP_GROUPS}; "
        "0: every group)",
    )
    parser.add_argument(
        "--format",
        choices=[f.value for f in Format],
        default=Format.TEXT.value,
        help="output format (default: text)",
    )
    parser.add_argument(
        "--threshold-ms",
        type=_non_negative_ms,
        default=None,
        metavar="MS",
        help="tail = requests with duration at or above MS (default: at or above the tail percentile)",
    )
    parser.add_argument(
        "--tail-percentile",
        type=_percentile,
        default=95.0,
        metavar="P",
        help="percentile of duration that starts the tail when --threshold-ms is not given, "
        "and of first-token time for 'slow upstream ttft' (default: 95)",
    )


def _open(path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    if path.endswith(".gz"):
        return cast("IO[bytes]", gzip.open(path, "rb"))
    return open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - returned to a with-statement


def _fail(message: str) -> int:
    print(f"llmgw report: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        group_by = parse_choice(GroupBy, getattr(args, "by", GroupBy.MODEL.value), "--by")
        fmt = parse_choice(Format, getattr(args, "format", Format.TEXT.value), "--format")
        threshold = getattr(args, "threshold_ms", None)
        if threshold is not None:
            threshold = _non_negative_ms(str(threshold))
        percentile = _percentile(str(getattr(args, "tail_percentile", 95.0)))
    except (ValueError, argparse.ArgumentTypeError) as e:
        return _fail(str(e))

    path = str(args.access_log)
    try:
        with _open(path) as fh:
            reader = RecordReader(fh)
            report = build_report(
                reader,
                group_by=group_by,
                threshold_ms=threshold,
                percentile_of_tail=percentile,
                top=getattr(args, "top", TOP_GROUPS) or None,
            )
    except FileNotFoundError:
        return _fail(f"no such file: {path}")
    except IsADirectoryError:
        return _fail(f"{path} is a directory, not an access log")
    except (OSError, EOFError) as e:  # unreadable, or a damaged / truncated .gz
        return _fail(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    report = replace(report, skipped_lines=reader.skipped)

    sys.stdout.write(render(report, fmt))
    if report.records == 0:
        print(
            f"llmgw report: no JSON access-log records in {path} ({reader.skipped:,} lines skipped); "
            "the report reads access_log.format: json",
            file=sys.stderr,
        )
        return 1
    return 0


__all__ = [
    "Cause",
    "CauseCount",
    "Format",
    "GroupBy",
    "GroupStats",
    "MetricStats",
    "RecordReader",
    "Report",
    "TailBreakdown",
    "ThresholdSource",
    "add_arguments",
    "build_report",
    "load_records",
    "nearest_rank",
    "render",
    "run",
]
