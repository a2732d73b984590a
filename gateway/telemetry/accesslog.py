"""Envoy-style access log: one record per request, written off the event loop.

Records go into a bounded queue; a writer thread batches them to the file or stdout. The event loop
never blocks on I/O; when the queue is full the line is dropped and counted
(``llmgw_accesslog_dropped_total``), never silently lost.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

import orjson

# Field order of the JSON record; also the documented schema (docs/operations.md).
FIELDS = (
    "start_time", "request_id", "traceparent", "method", "path", "model", "stream", "response_code",
    "response_flags", "duration_ms", "request_duration_ms", "response_duration_ms", "response_tx_duration_ms",
    "ttft_ms", "upstream_service_time_ms", "gateway_overhead_ms", "upstream_host", "upstream_cluster",
    "upstream_region", "upstream_model", "upstream_connect_ms", "upstream_reused_connection", "pool_wait_ms",
    "attempts", "retry_count", "hedge_count", "hedge_winner", "hedge_delay_ms", "hedge_loser", "backoff_ms",
    "timeout_flag", "route_reason", "affinity_key", "fallback_from", "fallback_reason", "error_type", "bytes_received",
    "bytes_sent", "prompt_tokens", "completion_tokens", "user_agent", "downstream_remote_address", "api_key_id",
)


FLUSH_INTERVAL_S = 0.02


def format_text(rec: dict[str, Any]) -> bytes:
    """Envoy's default format, then the gateway's own timing fields as key=value. Every value is escaped
    (control characters, quotes, backslashes, as Envoy does): a ``%0A`` in a path or a quote in a
    user-agent cannot start a forged line or shift the fields after it."""
    q = _escaped
    line = (
        f'[{rec["start_time"]}] "{q(rec["method"])} {q(rec["path"])} HTTP/1.1" {rec["response_code"]} '
        f'{q(rec["response_flags"])} {rec["bytes_received"]} {rec["bytes_sent"]} {q(_int(rec["duration_ms"]))} '
        f'{q(_int(rec["upstream_service_time_ms"]))} "{q(rec["downstream_remote_address"])}" '
        f'"{q(rec["user_agent"])}" "{q(rec["request_id"])}" "{q(rec["model"])}" "{q(rec["upstream_host"])}" '
        f'ttft_ms={q(rec["ttft_ms"])} overhead_ms={q(rec["gateway_overhead_ms"])} '
        f'cluster={q(rec["upstream_cluster"])} attempts={q(rec["attempts"])} hedges={q(rec["hedge_count"])} '
        f'route={q(rec["route_reason"])} traceparent={q(rec["traceparent"])}\n'
    )
    return line.encode()


# What JSON string escaping leaves alone but splits or garbles a line: DEL, C1 controls (NEL among
# them) and the Unicode line and paragraph separators.
_MORE_BREAKS = {c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), 0x2028, 0x2029)}


def _escaped(v: Any) -> str:
    s = "-" if v is None else str(v)
    if s.isprintable() and '"' not in s and "\\" not in s:  # the common case: nothing to escape
        return s
    return orjson.dumps(s)[1:-1].decode().translate(_MORE_BREAKS)


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def format_json(rec: dict[str, Any]) -> bytes:
    return orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)


class AccessLog:
    def __init__(self, path: str, fmt: str, queue_size: int, on_drop: Callable[[], None]) -> None:
        self._format = format_json if fmt == "json" else format_text
        # Batches of lines; with at most queue_size lines pending on the loop, memory stays bounded.
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max(4, queue_size // 64))
        self._pending: list[bytes] = []
        self._max_pending = queue_size
        self._flush_scheduled = False
        self._on_drop = on_drop
        self._path = path
        self._fd: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._path in ("-", "stdout"):
            self._fd = sys.stdout.fileno()
        else:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._thread = threading.Thread(target=self._run, name="accesslog", daemon=True)
        self._thread.start()

    def write(self, rec: dict[str, Any]) -> None:
        """Called on the event loop: format and buffer; a batch is handed to the writer every few ms.

        Handing over one line per request would wake the writer thread (a lock and a condition) on
        every request; batching makes that once per flush interval."""
        if len(self._pending) >= self._max_pending:
            self._on_drop()
            return
        self._pending.append(self._format(rec))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self._flush)
            except RuntimeError:  # no loop (tools, tests): hand over at once
                self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            self._queue.put_nowait(b"".join(batch))
        except queue.Full:
            for _ in batch:
                self._on_drop()

    def close(self, timeout: float = 2.0) -> None:
        self._flush()
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._fd is not None and self._path not in ("-", "stdout"):
            os.close(self._fd)
        self._thread = None

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            batch = [] if item is None else [item]
            stop = item is None
            while not stop and len(batch) < 512:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                data = b"".join(batch)
                try:
                    while data:
                        n = os.write(self._fd, data)
                        data = data[n:]
                except OSError:
                    for _ in range(data.count(b"\n")):
                        self._on_drop()
            if stop:
                return
