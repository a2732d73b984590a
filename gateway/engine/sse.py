"""Server-sent events, read just enough: find the first usable token, and sniff token usage.

Before an attempt is committed the gateway parses its events to know when the first *usable* token
arrived (content, a tool call, a refusal, reasoning; not the empty role chunk). After commit it
never parses: bytes are relayed as they arrive, and only what follows the last mention of usage is
kept and scanned (``UsageTail``).
"""

from __future__ import annotations

import re
from typing import Final

import orjson

# Module constants read per event or chunk are Final: compiled (mypyc), a Final is a C constant, any other
# module name a dict lookup at each use.
_USABLE_DELTA_KEYS: Final = (
    "content",
    "tool_calls",
    "function_call",
    "refusal",
    "reasoning_content",
    "reasoning",
)


# What an event before the first token is: nothing to commit on yet, the stream's end (commit, no token:
# ttft_ms stays empty), the first token, or an error (the attempt failed: retried or hedged like a 5xx).
NOT_YET: Final = 0
END: Final = 1
TOKEN: Final = 2
ERROR: Final = 3
_RESPONSES_ENDS: Final = ("response.completed", "response.incomplete")
_RESPONSES_ERRORS: Final = ("response.failed", "error")


def _event_kind(data: bytes) -> int:
    if data == b"[DONE]":
        return END
    try:
        ev = orjson.loads(data)
    except orjson.JSONDecodeError:
        return TOKEN  # not ours to judge: relay it
    if not isinstance(ev, dict):
        return TOKEN
    if "error" in ev:
        return ERROR
    typ = ev.get("type")
    if isinstance(typ, str):  # Responses API events
        if typ.endswith(".delta"):
            return TOKEN
        return END if typ in _RESPONSES_ENDS else ERROR if typ in _RESPONSES_ERRORS else NOT_YET
    choices = ev.get("choices")
    if not choices:
        return NOT_YET  # usage-only or keep-alive chunk before content
    c = choices[0] if isinstance(choices, list) else None
    if not isinstance(c, dict):
        return TOKEN  # not a chunk's shape: not ours to judge either
    delta = c.get("delta")
    if delta is None:  # legacy completions carry text
        token = bool(c.get("text"))
    elif isinstance(delta, dict):
        # compiled (the shipped build), any() over a generator is a loop; any(map(...)) calls through Python
        token = any(delta.get(key) for key in _USABLE_DELTA_KEYS)
    else:
        return TOKEN
    return TOKEN if token else END if c.get("finish_reason") else NOT_YET


# Bytes before the first usable token are held until commit (they may still be dropped for a retry or
# a hedge). A provider streaming this much without one is committed anyway: from then on its bytes are
# relayed under backpressure instead of held (a role chunk and a few keep-alives are ~200 bytes).
PRE_TOKEN_MAX: Final = 1024 * 1024

# One-byte membership tests take the byte's value: ``b"\n" in chunk`` first tries its operand as an int
# and pays for the TypeError (~1.7k instructions on CPython 3.11), ``_LF in chunk`` is a memchr.
_LF: Final = ord("\n")
_CR: Final = ord("\r")
_QUOTE: Final = ord('"')


class FirstTokenScanner:
    """Fed raw upstream chunks; says when the first usable event has been seen (or ``PRE_TOKEN_MAX``).

    Bytes of an unfinished line wait as a list and are joined once its newline arrives: a long line
    fed in many small chunks costs its length, not its length squared."""

    __slots__ = ("_parts", "_seen", "token_seen", "error")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._seen = 0
        self.token_seen = False  # a usable event was found (not only PRE_TOKEN_MAX bytes without one)
        self.error: bytes | None = None  # the data of an error event that came before any token

    def feed(self, chunk: bytes) -> bool:
        self._seen += len(chunk)
        if self._seen > PRE_TOKEN_MAX:
            return True
        if _CR in chunk:  # CRLF and CR end lines too (the SSE spec): read them as LF
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = self._parts
        if _LF not in chunk:
            parts.append(chunk)
            return False
        if parts:
            parts.append(chunk)
            buf = b"".join(parts)
            self._parts = []
        else:
            buf = chunk
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 1
            if line.startswith(b"data:") and (kind := _event_kind(data := line[5:].strip())):
                self.token_seen = kind == TOKEN
                if kind == ERROR:
                    self.error = data[:500]
                return True
        if start < len(buf):
            self._parts = [buf[start:]]
        return False


_PROMPT_TOKENS: Final = re.compile(rb'"(?:prompt|input)_tokens":[ \t]*(\d+)')
_COMPLETION_TOKENS: Final = re.compile(rb'"(?:completion|output)_tokens":[ \t]*(\d+)')


def usage_of(data: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from a body or SSE chunk that carries usage; Responses API names too."""
    u = data.rfind(b'"usage"')
    if u < 0:
        return None, None
    p = _PROMPT_TOKENS.search(data, u)
    c = _COMPLETION_TOKENS.search(data, u)
    return (int(p.group(1)) if p else None), (int(c.group(1)) if c else None)


_USAGE: Final = b'"usage"'
_USAGE_MAX: Final = 4096  # a usage object with every detail field is ~400 bytes
_KEY_PART: Final = len(_USAGE) - 1  # the most of the key that can end a chunk without being in it whole


class UsageTail:
    """The relayed stream from its last ``"usage"`` on (a few KiB at most), fed chunk by chunk.

    A usage object split across chunks (or its key split between two) is still read whole, without
    buffering the stream: only bytes from the last mention of usage are kept."""

    __slots__ = ("_tail", "_edge")

    def __init__(self) -> None:
        self._tail: bytes | None = None
        self._edge = b""  # the previous chunk's last bytes: the key may start there

    def feed(self, chunk: bytes) -> None:
        i = chunk.rfind(_USAGE)
        if i >= 0:
            self._tail = chunk[i : i + _USAGE_MAX]
        else:
            edge = self._edge
            # The key can only start in the previous bytes if they hold its opening quote (rarely so).
            j = (edge + chunk[:_KEY_PART]).find(_USAGE) if _QUOTE in edge else -1
            tail = self._tail
            if j >= 0:  # the key starts in ``edge`` (a key starting in ``chunk`` would be found whole there)
                self._tail = edge[j:] + chunk[:_USAGE_MAX]
            elif tail is not None and len(tail) < _USAGE_MAX:
                self._tail = tail + chunk[: _USAGE_MAX - len(tail)]
        self._edge = chunk[-_KEY_PART:] if len(chunk) >= _KEY_PART else (self._edge + chunk)[-_KEY_PART:]

    def usage(self) -> tuple[int | None, int | None]:
        return usage_of(self._tail) if self._tail is not None else (None, None)


def error_event(message: str, typ: str, code: str, at_event_end: bool = True) -> bytes:
    """A final SSE event telling a client why a started stream ended early (never a silent cut).

    ``at_event_end`` False: what was sent before ends inside an event, which a blank line closes first, so
    the error is an event of its own."""
    body = orjson.dumps({"error": {"message": message, "type": typ, "param": None, "code": code}})
    return (b"data: " if at_event_end else b"\n\ndata: ") + body + b"\n\n"
