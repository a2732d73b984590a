"""Envoy-style access log: one record per request, in the kernel's hands as the request ends.

A record is written when its request ends, in the event-loop step that sent the response's last bytes,
so a worker that is killed (OOM, SIGKILL) loses at most the lines of responses that ended in the
microseconds before it, never a batch. The line is written on the event loop: to a regular file that is
one ``write`` to the page cache (nginx writes its access log the same way); stdout, when it is a pipe
or a terminal, is reopened non-blocking, so a stalled reader never blocks the loop. What cannot be
written at once (the pipe is full) goes to a writer thread, which waits until it can; lines that
follow wait behind it, in order. Handing every line to a thread instead cost ~60 µs of CPU per line
in thread wake-ups (docs/operations.md has the measurement). More than ``queue_size`` lines waiting:
the line is dropped and counted (``llmgw_accesslog_dropped_total``), never silently lost.
"""

from __future__ import annotations

import os
import queue
import select
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

import orjson

# Field order of the JSON record; also the documented schema (docs/operations.md).
FIELDS = (
    "start_time",
    "request_id",
    "traceparent",
    "method",
    "path",
    "model",
    "stream",
    "response_code",
    "response_flags",
    "duration_ms",
    "request_duration_ms",
    "response_duration_ms",
    "response_tx_duration_ms",
    "ttft_ms",
    "upstream_service_time_ms",
    "gateway_overhead_ms",
    "pipeline_wait_ms",
    "upstream_host",
    "upstream_cluster",
    "upstream_region",
    "upstream_model",
    "upstream_connect_ms",
    "upstream_reused_connection",
    "pool_wait_ms",
    "attempts",
    "retry_count",
    "hedge_count",
    "hedge_winner",
    "hedge_delay_ms",
    "hedge_loser",
    "backoff_ms",
    "timeout_flag",
    "retry_verdict",
    "route_reason",
    "affinity_key",
    "fallback_from",
    "fallback_reason",
    "error_type",
    "bytes_received",
    "bytes_sent",
    "prompt_tokens",
    "completion_tokens",
    "user_agent",
    "downstream_remote_address",
    "api_key_id",
)


# How long a finished request's line may wait before it is written: not at all (tests pace on this).
FLUSH_INTERVAL_S = 0.0


def format_text(rec: dict[str, Any]) -> bytes:
    """Envoy's default format, then the gateway's own timing fields as key=value. Every value is escaped
    (control characters, quotes, backslashes, as Envoy does): a ``%0A`` in a path or a quote in a
    user-agent cannot start a forged line or shift the fields after it."""
    q = _escaped
    line = (
        f'[{rec["start_time"]}] "{q(rec["method"])} {q(rec["path"])} HTTP/1.1" {rec["response_code"]} '
        f"{q(rec['response_flags'])} {rec['bytes_received']} {rec['bytes_sent']} {q(_int(rec['duration_ms']))} "
        f'{q(_int(rec["upstream_service_time_ms"]))} "{q(rec["downstream_remote_address"])}" '
        f'"{q(rec["user_agent"])}" "{q(rec["request_id"])}" "{q(rec["model"])}" "{q(rec["upstream_host"])}" '
        f"ttft_ms={q(rec['ttft_ms'])} overhead_ms={q(rec['gateway_overhead_ms'])} "
        f"cluster={q(rec['upstream_cluster'])} attempts={q(rec['attempts'])} hedges={q(rec['hedge_count'])} "
        f"route={q(rec['route_reason'])} traceparent={q(rec['traceparent'])}\n"
    )
    return line.encode()


# What JSON string escaping leaves alone but splits or garbles a line: DEL, C1 controls (NEL among
# them) and the Unicode line and paragraph separators.
_MORE_BREAKS = {c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), 0x2028, 0x2029)}


def _escaped(v: object) -> str:
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
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._max_pending = queue_size
        # Lines handed to the writer thread, and lines it finished: each counter has one writer thread,
        # so no lock; the loop writes directly only when the two agree (nothing of its own is pending).
        self._handed = 0
        self._written = 0
        self._own_fd = False  # opened here (closed by close())
        self._on_drop = on_drop
        self._path = path
        self._fd: int | None = None
        self._writer: threading.Thread | None = None

    def start(self) -> None:
        if self._path in ("-", "stdout"):
            self._fd = sys.stdout.fileno()
        else:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._own_fd = True
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):  # a pipe or a terminal: make writes non-blocking
            try:  # on a description of our own: O_NONBLOCK on a shared one would reach other processes
                fd = os.open(f"/proc/self/fd/{self._fd}", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # a socket, or no /proc: blocking writes, from the writer thread only
                self._handed = -1  # never equal to _written: every line goes to the thread
            else:
                if self._own_fd:
                    os.close(self._fd)
                self._fd, self._own_fd = fd, True
        self._writer = threading.Thread(target=self._run, name="accesslog", daemon=True)
        self._writer.start()

    def write(self, rec: dict[str, Any]) -> None:
        """Called on the event loop as a request ends: the line goes to the file now, or to the writer."""
        line = self._format(rec)
        if self._handed == self._written:
            try:
                n = os.write(self._fd, line)  # type: ignore[arg-type]
            except BlockingIOError:  # the pipe is full: the writer waits for its reader
                n = 0
            except OSError:  # disk full, say: counted like any lost line
                self._on_drop()
                return
            if n == len(line):
                return
            line = line[n:]  # a short write (a full pipe, a signal): the writer finishes it
        if self._handed - self._written >= self._max_pending:
            self._on_drop()
            return
        self._handed += 1
        self._queue.put(line)

    def close(self, timeout: float = 2.0) -> None:
        if self._writer is None:
            return
        self._queue.put(None)
        self._writer.join(timeout)
        if self._fd is not None and self._own_fd:
            os.close(self._fd)
        self._writer = None

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 512:  # whatever else is waiting goes out in the same write
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    q.put(None)
                    break
                batch.append(nxt)
            data = b"".join(batch)
            try:
                while data:
                    try:
                        n = os.write(self._fd, data)  # type: ignore[arg-type]
                    except BlockingIOError:
                        select.select([], [self._fd], [], 1.0)  # type: ignore[type-var]  # set while running
                        continue
                    data = data[n:]
            except OSError:
                for _ in range(data.count(b"\n")):
                    self._on_drop()
            self._written += len(batch)
