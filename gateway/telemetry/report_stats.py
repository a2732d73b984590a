"""Access-log records reduced to latency percentiles and a tail-by-cause breakdown (`llmgw report`).

Built for million-line logs: each record is reduced at once to the few numbers the report needs, kept
in compact ``array('d')`` columns, so a streamed log never holds its parsed dicts.

Percentiles use the nearest-rank method on the non-null values of a metric: with the n values sorted
ascending, P(p) is the value at 1-based rank ceil(p/100 * n) (rank 1 for p = 0). It always returns a
value that was observed, never an interpolation, so a P99 can be traced to the request that set it.

Tail: the requests whose duration_ms is at or above a threshold: ``threshold_ms``, or by default the
P95 (``percentile_of_tail``) of duration_ms over all records, so the request that set the P95 and every
slower one. Not strictly above: the nearest-rank P95 of fewer than 20 values is their maximum, and a small
log (the demo's first dozen requests) would never show a tail. Each tail request gets every cause that
matches, and a primary cause: the first match in ``Cause`` order. "slow upstream ttft" compares a
request's first-token time (ttft_ms when streamed, upstream_service_time_ms otherwise: the whole body is
the first token) with the same percentile over the records of the same model and stream mode: at or above
it, and above their median (``_slow_first_token``).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from operator import itemgetter
from typing import Any, TypeVar

import orjson

from gateway.flags import ResponseFlag

METRICS = ("duration_ms", "ttft_ms", "upstream_service_time_ms", "gateway_overhead_ms")
METRIC_LABELS = {
    "duration_ms": "duration",
    "ttft_ms": "ttft",
    "upstream_service_time_ms": "upstream",
    "gateway_overhead_ms": "overhead",
}
PERCENTILE_METHOD = "nearest-rank"
NONE_LABEL = "-"  # group label for records without the grouping field (Envoy's "unknown")
ALL_LABEL = "(all)"
# Requests the gateway answered 404 NR: a model it does not serve (the name is the client's, so one group for
# them all: the report grows with the configured models, not with what clients send), or, with no model, a
# path it does not serve (grouped the same way under --by path).
UNKNOWN_MODEL_LABEL = "(unknown model)"
UNKNOWN_PATH_LABEL = "(unknown path)"
# Groups shown by default; the rest are one row. Requests refused before routing (no key, a bad body) keep
# the model name the client sent, so a client can make a group per request.
TOP_GROUPS = 50
_NAN = math.nan


class GroupBy(StrEnum):
    MODEL = "model"
    DEPLOYMENT = "deployment"
    REGION = "region"
    ROUTE = "route"
    PATH = "path"


# The access-log field each grouping reads.
GROUP_FIELD = {
    GroupBy.MODEL: "model",
    GroupBy.DEPLOYMENT: "upstream_cluster",
    GroupBy.REGION: "upstream_region",
    GroupBy.ROUTE: "route_reason",
    GroupBy.PATH: "path",
}


class Cause(StrEnum):
    """Why a tail request was slow. Definition order is the priority of the primary cause."""

    TIMEOUT = "timeout"  # timeout_flag set, or response_flags has UT / DT
    RETRY = "retry"  # retry_count > 0
    HEDGE = "hedge"  # hedge_count > 0
    COLD_CONNECTION = "cold connection"  # a new upstream connection: not reused and connect time > 0
    QUEUEING = "queueing"  # pool_wait_ms > 10% of duration
    GATEWAY_OVERHEAD = "gateway overhead"  # gateway_overhead_ms > 10% of duration
    SLOW_UPSTREAM_TTFT = "slow upstream ttft"  # first token among its model's slowest (_slow_first_token)
    UNEXPLAINED = "unexplained"  # none of the above


class ThresholdSource(StrEnum):
    OPTION = "option"  # --threshold-ms
    PERCENTILE = "percentile"  # the tail percentile of duration over all records


_CAUSES = tuple(Cause)
_BIT = {c: 1 << i for i, c in enumerate(_CAUSES)}
_SHARE_OF_DURATION = 0.10  # queueing / gateway overhead count as a cause above this share of the request
_TIMEOUT_FLAGS = frozenset((ResponseFlag.UPSTREAM_TIMEOUT, ResponseFlag.DEADLINE))


@dataclass(frozen=True, slots=True)
class MetricStats:
    n: int  # non-null values
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True, slots=True)
class GroupStats:
    key: str
    requests: int
    errors: int  # response_code >= 400
    metrics: dict[str, MetricStats]  # by METRICS name


@dataclass(frozen=True, slots=True)
class CauseCount:
    cause: Cause
    primary: int  # tail requests whose first matching cause is this one
    involved: int  # tail requests that show this cause at all


@dataclass(frozen=True, slots=True)
class TailBreakdown:
    threshold_ms: float | None  # None: no durations, so no tail
    source: ThresholdSource
    percentile: float  # of duration (PERCENTILE source) and of first-token time (slow upstream ttft)
    requests: int
    causes: tuple[CauseCount, ...]  # every Cause, in priority order

    def share(self, count: int) -> float | None:
        return count / self.requests if self.requests else None


@dataclass(frozen=True, slots=True)
class Report:
    group_by: GroupBy
    records: int
    skipped_lines: int
    groups: tuple[GroupStats, ...]  # most requests first
    overall: GroupStats
    tail: TailBreakdown


# ---------------------------------------------------------------------------------------------- reading


class RecordReader:
    """Yields the request records of an access log: its JSON-object lines with a ``response_code`` or a
    ``duration_ms`` (every record the gateway writes has both). Counts the other non-blank lines in
    ``skipped``: text, other JSON, and the gateway's own log lines (``{"timestamp","level","logger",...}``,
    on stderr), which ``kubectl logs`` or ``2>&1`` interleave with an access log on stdout."""

    __slots__ = ("_lines", "skipped")

    def __init__(self, lines: Iterable[str | bytes]) -> None:
        self._lines = lines
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loads = orjson.loads
        for line in self._lines:
            try:
                rec = loads(line)
            except orjson.JSONDecodeError:
                if line.strip():  # blank lines (a trailing newline, a spacer) are not damage
                    self.skipped += 1
                continue
            if type(rec) is dict and ("response_code" in rec or "duration_ms" in rec):
                yield rec
            else:
                self.skipped += 1


def load_records(stream: Iterable[str]) -> tuple[list[dict], int]:
    """All JSON-object records of ``stream`` and the count of skipped lines. Holds every record in memory;
    ``run`` streams instead."""
    reader = RecordReader(stream)
    records = list(reader)
    return records, reader.skipped


# ---------------------------------------------------------------------------------------------- numbers


def _rank_or_inf(sorted_values: Sequence[float], p: float) -> float:
    """``nearest_rank``, or infinity (no value is above it) when there are no values."""
    r = nearest_rank(sorted_values, p)
    return math.inf if r is None else r


def _slow_first_token(sorted_values: Sequence[float], percentile: float) -> tuple[float, float]:
    """A first token is slow for its (model, stream) at or above their tail percentile and above their
    median: among the slowest of its kind and slower than most of them (a group of one, or of equal times,
    has no request slow against the others). Infinity when there are no values."""
    return _rank_or_inf(sorted_values, percentile), _rank_or_inf(sorted_values, 50.0)


def nearest_rank(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ascending ``sorted_values``; None when empty."""
    n = len(sorted_values)
    if n == 0:
        return None
    # Exact arithmetic: in floats 0.95 * 20 is 19.000000000000004, whose ceiling is one rank too far.
    rank = math.ceil(Fraction(str(p)) * n / 100)
    return sorted_values[min(max(rank, 1), n) - 1]


def _stats(sorted_values: Sequence[float]) -> MetricStats:
    if not sorted_values:
        return MetricStats(0, None, None, None, None)
    return MetricStats(
        len(sorted_values),
        nearest_rank(sorted_values, 50),
        nearest_rank(sorted_values, 95),
        nearest_rank(sorted_values, 99),
        sorted_values[-1],
    )


_NUMBER = frozenset((int, float))  # exact types: JSON true/false must not count as 1 / 0 ms


def _label(v: object) -> str:
    if v is None or v == "":
        return NONE_LABEL
    return v if type(v) is str else str(v)


class _GroupColumns:
    __slots__ = ("requests", "errors", "duration", "ttft", "upstream", "overhead")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.duration = array("d")  # non-null values only
        self.ttft = array("d")
        self.upstream = array("d")
        self.overhead = array("d")

    def columns(self) -> tuple[array, array, array, array]:  # in METRICS order
        return self.duration, self.ttft, self.upstream, self.overhead


# The fields the report reads after the grouping field, fetched in one C call per record (itemgetter).
_READ = (
    "response_code",
    "duration_ms",
    "ttft_ms",
    "upstream_service_time_ms",
    "gateway_overhead_ms",
    "stream",
    "model",
    "response_flags",
    "timeout_flag",
    "retry_count",
    "hedge_count",
    "upstream_reused_connection",
    "upstream_connect_ms",
    "pool_wait_ms",
)


class _Columns:
    """What the report needs from the records and nothing more: per group the metric values, and per record
    the duration, the first-token time and the causes that can be read off the record alone."""

    __slots__ = (
        "group_field",
        "groups",
        "duration",
        "first_token",
        "ft_key",
        "ft_keys",
        "ft_values",
        "causes",
    )

    def __init__(self, group_field: str) -> None:
        self.group_field = group_field
        self.groups: dict[str, _GroupColumns] = {}
        self.duration = array("d")  # per record; NaN when unknown
        self.first_token = array("d")  # per record: ttft_ms (stream) or upstream_service_time_ms; NaN unknown
        self.ft_key = array("I")  # per record: index of its (model, stream) in ft_keys
        self.ft_keys: dict[tuple[str, bool], int] = {}
        self.ft_values: list[array] = []  # per (model, stream): the non-null first-token times
        self.causes = array("B")  # per record: bits of the causes that need no other record

    def add_all(self, records: Iterable[dict[str, Any]]) -> int:
        """Reduce every record to its numbers; returns the count. One flat loop over locals, because this
        runs once per log line: a million lines must take seconds, not minutes."""
        fields = (self.group_field, *_READ)
        pick = itemgetter(*fields)
        groups, ft_keys, ft_values = self.groups, self.ft_keys, self.ft_values
        put_duration, put_ft, put_ft_key, put_causes = (
            self.duration.append,
            self.first_token.append,
            self.ft_key.append,
            self.causes.append,
        )
        number, nan, share = _NUMBER, _NAN, _SHARE_OF_DURATION
        no_route = ResponseFlag.NO_ROUTE.value
        by_model, by_path = self.group_field == "model", self.group_field == "path"
        timeout_codes = _TIMEOUT_FLAGS
        b_timeout, b_retry, b_hedge = _BIT[Cause.TIMEOUT], _BIT[Cause.RETRY], _BIT[Cause.HEDGE]
        b_cold, b_queue, b_overhead = (
            _BIT[Cause.COLD_CONNECTION],
            _BIT[Cause.QUEUEING],
            _BIT[Cause.GATEWAY_OVERHEAD],
        )
        count = 0
        for rec in records:
            count += 1
            try:
                values = pick(rec)
            except KeyError:  # a record from an older or foreign writer: missing fields are unknown
                values = tuple(rec.get(f) for f in fields)
            (
                key,
                code,
                dur,
                ttft,
                ust,
                ovh,
                stream,
                model,
                flags,
                tflag,
                retries,
                hedges,
                reused,
                connect,
                pool,
            ) = values

            if code == 404 and type(flags) is str and no_route in flags.split(","):
                if type(model) is str and model:
                    model = UNKNOWN_MODEL_LABEL
                    if by_model:
                        key = model
                elif by_path:
                    key = UNKNOWN_PATH_LABEL
            if type(key) is not str or not key:
                key = _label(key)
            g = groups.get(key)
            if g is None:
                g = groups[key] = _GroupColumns()
            g.requests += 1
            if type(code) is int and code >= 400:
                g.errors += 1

            if type(dur) in number:
                g.duration.append(dur)
                put_duration(dur)
            else:
                dur = None
                put_duration(nan)
            if type(ttft) in number:
                g.ttft.append(ttft)
            else:
                ttft = None
            if type(ust) in number:
                g.upstream.append(ust)
            else:
                ust = None
            if type(ovh) in number:
                g.overhead.append(ovh)
            else:
                ovh = None

            # A non-stream response's first token arrives with the whole body: its upstream time is its TTFT.
            stream = stream is True
            ft = ttft if stream else ust
            fk = (model if type(model) is str and model else _label(model), stream)
            idx = ft_keys.get(fk)
            if idx is None:
                idx = ft_keys[fk] = len(ft_values)
                ft_values.append(array("d"))
            put_ft_key(idx)
            if ft is None:
                put_ft(nan)
            else:
                put_ft(ft)
                ft_values[idx].append(ft)

            bits = 0
            if tflag or (
                type(flags) is str and "T" in flags and not timeout_codes.isdisjoint(flags.split(","))
            ):
                bits = b_timeout
            if type(retries) in number and retries > 0:
                bits |= b_retry
            if type(hedges) in number and hedges > 0:
                bits |= b_hedge
            if reused is False and type(connect) in number and connect > 0:
                bits |= b_cold
            if dur is not None and dur > 0:
                limit = share * dur
                if type(pool) in number and pool > limit:
                    bits |= b_queue
                if ovh is not None and ovh > limit:
                    bits |= b_overhead
            put_causes(bits)
        return count


# ---------------------------------------------------------------------------------------------- report


def build_report(
    records: Iterable[dict[str, Any]],
    *,
    group_by: str = "model",
    threshold_ms: float | None = None,
    percentile_of_tail: float = 95.0,
    skipped_lines: int = 0,
    top: int | None = TOP_GROUPS,
) -> Report:
    """One pass over ``records`` (any iterable: a list, or a RecordReader streaming a file). ``top``: the
    groups with the most requests are shown, the rest folded into one row (None: every group)."""
    gb = parse_choice(GroupBy, group_by, "group_by")
    if top is not None and top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if not 0 < percentile_of_tail <= 100:
        raise ValueError(f"percentile_of_tail must be in (0, 100], got {percentile_of_tail}")
    if threshold_ms is not None and not threshold_ms >= 0:
        raise ValueError(f"threshold_ms must be >= 0, got {threshold_ms}")

    cols = _Columns(GROUP_FIELD[gb])
    count = cols.add_all(records)

    groups = [
        GroupStats(
            key,
            g.requests,
            g.errors,
            {name: _stats(sorted(col)) for name, col in zip(METRICS, g.columns(), strict=True)},
        )
        for key, g in cols.groups.items()
    ]
    groups.sort(key=lambda s: (-s.requests, s.key))
    if top is not None and len(groups) > top:
        groups[top:] = [_folded(groups[top:], cols)]

    # All records, one metric at a time: a sorted million-float list costs ~32 MB, so hold one at once.
    overall_metrics = {}
    threshold = None if threshold_ms is None else float(threshold_ms)
    source = ThresholdSource.OPTION
    for i, name in enumerate(METRICS):
        merged = array("d")
        for g in cols.groups.values():
            merged.extend(g.columns()[i])
        values = sorted(merged)
        del merged
        overall_metrics[name] = _stats(values)
        if name == "duration_ms" and threshold_ms is None:
            threshold, source = nearest_rank(values, percentile_of_tail), ThresholdSource.PERCENTILE
        del values
    overall = GroupStats(ALL_LABEL, count, sum(g.errors for g in groups), overall_metrics)
    tail = _tail(cols, threshold, source, percentile_of_tail)
    return Report(gb, count, skipped_lines, tuple(groups), overall, tail)


def _folded(rest: list[GroupStats], cols: _Columns) -> GroupStats:
    """The groups beyond the top ones as one row, its percentiles over all their requests."""
    metrics = {}
    for i, name in enumerate(METRICS):
        merged = array("d")
        for g in rest:
            merged.extend(cols.groups[g.key].columns()[i])
        metrics[name] = _stats(sorted(merged))
    label = f"({len(rest):,} more)"
    return GroupStats(label, sum(g.requests for g in rest), sum(g.errors for g in rest), metrics)


def _tail(
    cols: _Columns, threshold: float | None, source: ThresholdSource, percentile: float
) -> TailBreakdown:
    primary = [0] * len(_CAUSES)
    involved = [0] * len(_CAUSES)
    n = 0
    if threshold is not None:
        # Per (model, stream): the first-token times that make a request's upstream slow for its kind.
        ft_limit = [_slow_first_token(sorted(v), percentile) for v in cols.ft_values]
        slow = _BIT[Cause.SLOW_UPSTREAM_TTFT]
        unexplained = _BIT[Cause.UNEXPLAINED]
        dur, ft, ft_key, local = cols.duration, cols.first_token, cols.ft_key, cols.causes
        for i in [i for i, d in enumerate(dur) if d >= threshold]:  # NaN never compares
            n += 1
            bits = local[i]
            at_least, above = ft_limit[ft_key[i]]
            if ft[i] >= at_least and ft[i] > above:
                bits |= slow
            if not bits:
                bits = unexplained
            primary[(bits & -bits).bit_length() - 1] += 1
            for j in range(len(_CAUSES)):
                if bits >> j & 1:
                    involved[j] += 1
    causes = tuple(CauseCount(c, primary[j], involved[j]) for j, c in enumerate(_CAUSES))
    return TailBreakdown(threshold, source, percentile, n, causes)


_Choice = TypeVar("_Choice", bound=StrEnum)


def parse_choice(enum: type[_Choice], value: str, what: str) -> _Choice:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise ValueError(f"unknown {what} {value!r} (choose from {choices})") from None
