"""Server-sent events, read just enough: find the first usable token, and sniff token usage.

Before an attempt is committed the gateway parses its events to know when the first *usable* token
arrived (content, a tool call, a refusal, reasoning; not the empty role chunk). After commit it
never parses: bytes are relayed as they arrive, and only a chunk that mentions usage is scanned.
"""

from __future__ import annotations

import re

import orjson

_USABLE_DELTA_KEYS = ("content", "tool_calls", "function_call", "refusal", "reasoning_content", "reasoning")


def _usable_event(data: bytes) -> bool:
    if data == b"[DONE]":
        return True
    try:
        ev = orjson.loads(data)
    except orjson.JSONDecodeError:
        return True  # not ours to judge: relay it
    if not isinstance(ev, dict):
        return True
    if "error" in ev:
        return True
    typ = ev.get("type")
    if isinstance(typ, str):  # Responses API events
        return typ.endswith(".delta") or typ in ("response.completed", "response.failed", "response.incomplete", "error")
    choices = ev.get("choices")
    if not choices:
        return False  # usage-only or keep-alive chunk before content
    c = choices[0]
    if c.get("finish_reason"):
        return True
    delta = c.get("delta")
    if delta is None:
        return bool(c.get("text"))  # legacy completions
    return any(delta.get(k) for k in _USABLE_DELTA_KEYS)


class FirstTokenScanner:
    """Fed raw upstream chunks; says when the first usable event has been seen."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> bool:
        buf = self._buf + chunk
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end].rstrip(b"\r")
            start = end + 1
            if line.startswith(b"data:") and _usable_event(line[5:].strip()):
                self._buf = b""
                return True
        self._buf = buf[start:]
        return False


_PROMPT_TOKENS = re.compile(rb'"(?:prompt|input)_tokens":[ \t]*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"(?:completion|output)_tokens":[ \t]*(\d+)')


def usage_of(data: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from a body or SSE chunk that carries usage; Responses API names too."""
    u = data.rfind(b'"usage"')
    if u < 0:
        return None, None
    p = _PROMPT_TOKENS.search(data, u)
    c = _COMPLETION_TOKENS.search(data, u)
    return (int(p.group(1)) if p else None), (int(c.group(1)) if c else None)


def error_event(message: str, typ: str, code: str, at_event_end: bool = True) -> bytes:
    """A final SSE event telling a client why a started stream ended early (never a silent cut).

    ``at_event_end`` False: what was sent before ends inside an event, which a blank line closes first, so
    the error is an event of its own."""
    body = orjson.dumps({"error": {"message": message, "type": typ, "param": None, "code": code}})
    return (b"data: " if at_event_end else b"\n\ndata: ") + body + b"\n\n"
