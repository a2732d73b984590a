"""`llmgw report` output: an aligned text table for a terminal at 3 a.m., markdown for an incident doc,
csv for a spreadsheet, json for a program. Times in ms; text and markdown round to 0.1 ms, csv and json
keep the logged values. Group names come from the log, partly from clients: text, markdown and csv print
them escaped (``_shown``), markdown with its markup escaped too (``_md_cell``), csv kept from starting a
spreadsheet formula (``_csv_text``), json through its encoder."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import orjson

from gateway.telemetry.report_stats import (
    METRIC_LABELS,
    METRICS,
    NONE_LABEL,
    PERCENTILE_METHOD,
    Cause,
    GroupStats,
    Report,
    TailBreakdown,
    ThresholdSource,
    parse_choice,
)


class Format(StrEnum):
    TEXT = "text"
    MARKDOWN = "markdown"
    CSV = "csv"
    JSON = "json"


def render(report: Report, fmt: str = "text") -> str:
    f = parse_choice(Format, fmt, "format")
    if f is Format.TEXT:
        return _render_text(report)
    if f is Format.MARKDOWN:
        return _render_markdown(report)
    if f is Format.CSV:
        return _render_csv(report)
    out = orjson.dumps(_as_json(report), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE).decode()
    return out.translate(_JSON_MORE)


# What JSON string escaping leaves raw but a terminal may act on: DEL, the C1 controls (CSI among them) and the
# Unicode line and paragraph separators. They occur only inside strings, so \u-escaping them keeps the JSON.
_JSON_MORE = {c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), 0x2028, 0x2029)}


def _shown(name: str) -> str:
    """A name from the log as text, markdown and csv print it: each character that is not printable (the C0
    and C1 controls and DEL, ESC, CR, LF and NUL among them; line separators; bidi and other format
    characters) and the backslash escaped as in a Python string literal (``\\x1b``, ``\\r``, ``\\n``,
    ``\\\\``), so a name cannot drive the terminal, start a line or pass for another name. Plain names are
    unchanged."""
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in name)


def _ms(v: float | None) -> str:
    return NONE_LABEL if v is None else f"{v:.1f}"


def _pct(share: float | None) -> str:
    return NONE_LABEL if share is None else f"{share * 100:.1f}%"


def _err_pct(g: GroupStats) -> str:
    return _pct(g.errors / g.requests if g.requests else None)


_LATENCY_HEADER = ("requests", "errors", "err %", "metric", "n", "p50 ms", "p95 ms", "p99 ms", "max ms")
_TAIL_HEADER = ("cause", "primary", "primary %", "involved", "involved %")


def _latency_rows(g: GroupStats, thousands: bool) -> list[list[str]]:
    fmt_int = "{:,}".format if thousands else str
    rows = []
    for i, name in enumerate(METRICS):
        m = g.metrics[name]
        lead = (
            [_shown(g.key), fmt_int(g.requests), fmt_int(g.errors), _err_pct(g)]
            if i == 0
            else ["", "", "", ""]
        )
        rows.append(
            [*lead, METRIC_LABELS[name], fmt_int(m.n), _ms(m.p50), _ms(m.p95), _ms(m.p99), _ms(m.max)]
        )
    return rows


def _tail_rows(t: TailBreakdown, thousands: bool) -> list[list[str]]:
    fmt_int = "{:,}".format if thousands else str
    return [
        [
            c.cause.value,
            fmt_int(c.primary),
            _pct(t.share(c.primary)),
            fmt_int(c.involved),
            _pct(t.share(c.involved)),
        ]
        for c in t.causes
    ]


def _tail_title(r: Report) -> str:
    t = r.tail
    if t.threshold_ms is None:
        return "Tail: no request has a duration, so there is no tail."
    why = (
        "--threshold-ms"
        if t.source is ThresholdSource.OPTION
        else f"P{t.percentile:g} of duration, all requests"
    )
    noun = "request" if t.requests == 1 else "requests"
    return f"Tail: {t.requests:,} {noun} with duration >= {t.threshold_ms:.1f} ms ({why})"


_TAIL_NOTE = (
    "primary = first matching cause in the order listed; involved = every cause a request shows.",
    f"{Cause.QUEUEING.value} / {Cause.GATEWAY_OVERHEAD.value}: pool wait / gateway overhead > 10% of duration.",
    f"{Cause.SLOW_UPSTREAM_TTFT.value}: ttft (non-stream: upstream time) at or above the tail percentile and "
    "above the median of the same model and stream mode.",
)


def _summary(r: Report) -> str:
    skipped = f", {r.skipped_lines:,} lines skipped (not access-log records)" if r.skipped_lines else ""
    return (
        f"{r.records:,} requests by {r.group_by.value}{skipped}. "
        f"Percentiles: {PERCENTILE_METHOD} over non-null values; times in ms."
    )


def _align(header: Sequence[str], rows: list[list[str]], left: frozenset[int]) -> list[str]:
    """Columns padded to their widest cell: the ``left`` columns (names) left-aligned, numbers right-aligned.
    An empty row prints as a blank line."""
    full = [r for r in rows if r]
    widths = [max(len(header[i]), *(len(r[i]) for r in full)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(r) if r else "" for r in rows)]


_LATENCY_LEFT = frozenset((0, 1 + _LATENCY_HEADER.index("metric")))  # group and metric names
_TAIL_LEFT = frozenset((0,))


def _render_text(r: Report) -> str:
    rows: list[list[str]] = []
    for g in (*r.groups, r.overall):
        if rows:
            rows.append([])  # a blank line between groups
        rows.extend(_latency_rows(g, thousands=True))
    lines = [f"llmgw report: {_summary(r)}", ""]
    lines += _align((r.group_by.value, *_LATENCY_HEADER), rows, _LATENCY_LEFT)
    lines += ["", _tail_title(r)]
    if r.tail.requests:
        lines += ["", *_align(_TAIL_HEADER, _tail_rows(r.tail, thousands=True), _TAIL_LEFT), "", *_TAIL_NOTE]
    return "\n".join(lines) + "\n"


# What makes markdown of a name: a pipe ends the cell; backticks, emphasis and strikethrough, links and images
# ([text](url), ![](url)), HTML and autolinks (<img ...>, <http://...>) and entities (&#124;) would render as
# something else than the name, and a backslash would eat the next character (so _shown's "\\x1b" for a
# literal backslash and "x1b" would render as its "\x1b" for ESC). Each is backslash-escaped (CommonMark
# escapes any ASCII punctuation), which renders as the character itself: the rendered name reads as in text.
_MD_SPECIAL = {ord(c): "\\" + c for c in "\\|`*_~[]<>&"}


# A name (a row's first cell) is escaped further: renderers that link bare URLs, e-mail addresses and
# domains (GFM's autolinks, markdown-it's linkify) would link "https://evil.example", "www.evil.example",
# "a@b.example" or "evil.com". An escaped ":" or "@", and a "." before a letter (where a domain's name
# would go on), keep each a text of its own; "llama-3.1-70b" reads as it is.
_MD_NAME_SPECIAL = {**_MD_SPECIAL, ord(":"): "\\:", ord("@"): "\\@"}
_DOT_BEFORE_LETTER = re.compile(r"\.(?=[A-Za-z])")


def _md_name(s: str) -> str:
    return _DOT_BEFORE_LETTER.sub(r"\\.", s.translate(_MD_NAME_SPECIAL))


def _md_cell(s: str) -> str:
    return s.translate(_MD_SPECIAL)


def _md_table(header: Sequence[str], rows: list[list[str]], left: frozenset[int]) -> list[str]:
    sep = ["---" if i in left else "---:" for i in range(len(header))]
    return [
        "| " + " | ".join(_md_name(c) if i == 0 else _md_cell(c) for i, c in enumerate(row)) + " |"
        for row in (header, sep, *rows)
    ]


def _render_markdown(r: Report) -> str:
    header = (r.group_by.value, *(h.replace(" ms", " (ms)") for h in _LATENCY_HEADER))
    rows: list[list[str]] = []
    for g in (*r.groups, r.overall):
        rows.extend(_latency_rows(g, thousands=False))
    lines = [f"## Latency by {r.group_by.value}", "", _summary(r), ""]
    lines += _md_table(header, rows, _LATENCY_LEFT)
    lines += ["", f"## {_tail_title(r)}"]
    if r.tail.requests:
        lines += [
            "",
            *_md_table(_TAIL_HEADER, _tail_rows(r.tail, thousands=False), _TAIL_LEFT),
            "",
            " ".join(_TAIL_NOTE),
        ]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "table",
    "group_by",
    "group",
    "metric",
    "requests",
    "errors",
    "n",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "cause",
    "tail_requests",
    "threshold_ms",
    "primary",
    "primary_share",
    "involved",
    "involved_share",
)


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets (=HYPERLINK(...),
# @SUM(...), -1+1): OWASP's advice is a leading single quote, which keeps it text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\0")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _csv_text(name: str) -> str:
    """A name from the log as a csv cell: escaped as ``_shown`` does, and quoted when a spreadsheet would take
    it for a formula. A plain number (-1) stays a number, and the report's own "-" (none) stays as it is."""
    shown = _shown(name)
    start = shown.lstrip(" ")  # " =1+1": some spreadsheets skip leading spaces before a formula
    if start.startswith(_FORMULA_START) and shown != NONE_LABEL and not _PLAIN_NUMBER.fullmatch(start):
        return "'" + shown
    return shown


def _csv_num(v: float | None) -> str:
    return "" if v is None else repr(v)


def _render_csv(r: Report) -> str:
    """One header; ``table`` says which columns a row fills: ``latency`` (one row per group and metric, the
    group ``(all)`` last) or ``tail`` (one row per cause). Raw values, no rounding; empty when unknown."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for g in (*r.groups, r.overall):
        for name in METRICS:
            m = g.metrics[name]
            w.writerow(
                {
                    "table": "latency",
                    "group_by": r.group_by.value,
                    "group": _csv_text(g.key),
                    "metric": name,
                    "requests": g.requests,
                    "errors": g.errors,
                    "n": m.n,
                    "p50_ms": _csv_num(m.p50),
                    "p95_ms": _csv_num(m.p95),
                    "p99_ms": _csv_num(m.p99),
                    "max_ms": _csv_num(m.max),
                }
            )
    t = r.tail
    for c in t.causes:
        ps, inv = t.share(c.primary), t.share(c.involved)
        w.writerow(
            {
                "table": "tail",
                "cause": c.cause.value,
                "tail_requests": t.requests,
                "threshold_ms": _csv_num(t.threshold_ms),
                "primary": c.primary,
                "primary_share": "" if ps is None else f"{ps:.4f}",
                "involved": c.involved,
                "involved_share": "" if inv is None else f"{inv:.4f}",
            }
        )
    return out.getvalue()


def _group_json(g: GroupStats) -> dict[str, Any]:
    return {
        "group": g.key,
        "requests": g.requests,
        "errors": g.errors,
        "metrics": {
            name: {"n": m.n, "p50": m.p50, "p95": m.p95, "p99": m.p99, "max": m.max}
            for name, m in g.metrics.items()
        },
    }


def _as_json(r: Report) -> dict[str, Any]:
    t = r.tail
    return {
        "group_by": r.group_by.value,
        "records": r.records,
        "skipped_lines": r.skipped_lines,
        "percentile_method": PERCENTILE_METHOD,
        "unit": "ms",
        "groups": [_group_json(g) for g in r.groups],
        "overall": _group_json(r.overall),
        "tail": {
            "threshold_ms": t.threshold_ms,
            "threshold_source": t.source.value,
            "percentile": t.percentile,
            "requests": t.requests,
            "causes": [
                {
                    "cause": c.cause.value,
                    "primary": c.primary,
                    "primary_share": t.share(c.primary),
                    "involved": c.involved,
                    "involved_share": t.share(c.involved),
                }
                for c in t.causes
            ],
        },
    }
