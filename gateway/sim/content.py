"""What the simulator says: plain tokens, a JSON instance of the asked schema, or tool calls.

`read_content` reads what a chat or Responses request asks to be answered with (None: the plain token
text, the fast path). `script` turns that into the exact pieces each choice will send, one piece per
token, so the latency model (first token, then one token per inter-token delay) holds for every kind
of answer. Structured answers are cut into as many pieces as the profile has tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

from gateway.sim.instance import instance_of
from gateway.sim.validation import message_texts

MAX_PARALLEL_CALLS = 4
MAX_SCAN_CHARS = 256 * 1024  # prompt text searched for a quoted JSON schema
MAX_SCAN_OBJECTS = 256
_SCHEMA_WORDS = ("properties", "$defs", "definitions", "anyOf", "items")


class Mode(Enum):
    TEXT = "text"
    JSON = "json"
    TOOLS = "tools"


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    parameters: Any


@dataclass(slots=True)
class ContentAsk:
    mode: Mode = Mode.TEXT
    schema: Any = None  # Mode.JSON: the schema to instantiate (None: any JSON object)
    calls: tuple[Tool, ...] = ()  # Mode.TOOLS: the tools to call, in order
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(slots=True)
class Part:
    """One output of a choice: text, or one tool call whose pieces are its arguments."""

    pieces: list[str]
    tool: str | None = None
    call_id: str = ""
    cut: bool = False  # max_tokens ran out inside this part


@dataclass(slots=True)
class Choice:
    index: int
    parts: list[Part] = field(default_factory=list)
    finish_reason: str = "stop"

    @property
    def tokens(self) -> int:
        return sum(len(p.pieces) for p in self.parts)

    def text(self) -> str | None:
        texts = [p for p in self.parts if p.tool is None]
        return "".join(texts[0].pieces) if texts else None

    def steps(self) -> list[tuple[Part, int]]:
        """(part, piece index) for each token, in the order they are sent."""
        return [(p, i) for p in self.parts for i in range(len(p.pieces))]


def read_content(body: dict[str, Any], *, responses: bool) -> ContentAsk | None:
    """What a (validated) chat or Responses request asks for; None for the plain default."""
    ask = ContentAsk()
    if not responses:
        n = body.get("n")
        ask.n = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        stop = body.get("stop")
        ask.stop = (stop,) if isinstance(stop, str) and stop else tuple(s for s in stop or () if s)
        ask.logprobs = body.get("logprobs") is True
        top = body.get("top_logprobs")
        ask.top_logprobs = top if isinstance(top, int) and not isinstance(top, bool) else 0
    calls = _tool_calls(body, responses)
    if calls:
        ask.mode, ask.calls = Mode.TOOLS, calls
    else:
        fmt = _format(body, responses)
        if fmt is not None:
            ask.mode, ask.schema = Mode.JSON, fmt
    plain = ask.mode is Mode.TEXT and ask.n == 1 and not ask.stop and not ask.logprobs
    return None if plain else ask


def _tools(body: dict[str, Any], responses: bool) -> list[Tool]:
    tools = body.get("tools")
    out = []
    for t in tools if isinstance(tools, list) else ():
        if isinstance(t, dict) and t.get("type") == "function":
            spec = t if responses else t.get("function")
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                out.append(Tool(spec["name"], spec.get("parameters", {"type": "object"})))
    return out


def _tool_calls(body: dict[str, Any], responses: bool) -> tuple[Tool, ...]:
    """Which tools the model calls: a forced one; all (parallel) or the first for "required"; for "auto",
    the same unless the conversation ends with a tool's result, which the model then answers in text."""
    tools = _tools(body, responses)
    if not tools:
        return ()
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return ()
    if isinstance(choice, dict) and choice.get("type") == "function":
        spec = choice if responses else choice.get("function")
        name = spec.get("name") if isinstance(spec, dict) else None
        return tuple(t for t in tools if t.name == name)[:1]
    if choice != "required" and _answers_a_tool_result(body, responses):
        return ()
    if body.get("parallel_tool_calls", True) is False:
        return (tools[0],)
    return tuple(tools[:MAX_PARALLEL_CALLS])


def _answers_a_tool_result(body: dict[str, Any], responses: bool) -> bool:
    if responses:
        items = body.get("input")
        last = items[-1] if isinstance(items, list) and items else None
        return isinstance(last, dict) and last.get("type") == "function_call_output"
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    return isinstance(last, dict) and last.get("role") in ("tool", "function")


_ANY_OBJECT = object()  # json_object without a schema anywhere: any JSON object will do


def _format(body: dict[str, Any], responses: bool) -> Any:
    """The schema a JSON answer must follow, _ANY_OBJECT for plain json_object, None for text."""
    if responses:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    else:
        fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_schema":
        spec = fmt if responses else fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else _ANY_OBJECT
    if kind == "json_object":
        if isinstance(fmt.get("schema"), dict):  # instructor's JSON_SCHEMA mode (Together/Anyscale style)
            return fmt["schema"]
        source = body.get("input") if responses else body.get("messages")
        if isinstance(source, str):
            source = [{"content": source}]
        instructions = body.get("instructions") if responses else None
        texts = ([instructions] if isinstance(instructions, str) else []) + message_texts(
            source if isinstance(source, list) else []
        )
        found = schema_in_text(texts)
        return found if found is not None else _ANY_OBJECT
    return None


def schema_in_text(texts: list[str]) -> dict[str, Any] | None:
    """The last JSON Schema quoted in the prompt (LangChain's format instructions quote an example schema
    first, then the real one; instructor quotes one), or None."""
    decoder = json.JSONDecoder()
    found = None
    budget = MAX_SCAN_OBJECTS
    for text in texts:
        text = text[:MAX_SCAN_CHARS]
        i = text.find("{")
        while i != -1 and budget > 0:
            budget -= 1
            try:
                value, end = decoder.raw_decode(text, i)
            except (ValueError, RecursionError):
                i = text.find("{", i + 1)
                continue
            if isinstance(value, dict) and any(w in value for w in _SCHEMA_WORDS):
                found = value
            i = text.find("{", end)
    return found


# -- the script: exact pieces per choice ---------------------------------------------------------------------
def script(ask: ContentAsk, sim: str, serial: int, tokens: int, cap: int | None) -> list[Choice]:
    """Each choice's parts, cut to `cap` tokens (finish_reason "length") and at the first stop sequence."""
    choices = []
    for k in range(ask.n):
        label = f"{sim}#{serial}" if k == 0 else f"{sim}#{serial}/{k}"
        choice = Choice(k)
        if ask.mode is Mode.TOOLS:
            share = max(1, tokens // len(ask.calls))
            for j, tool in enumerate(ask.calls):
                args = orjson.dumps(instance_of(tool.parameters, label)).decode()
                choice.parts.append(Part(split(args, share), tool.name, f"call_{sim}_{serial}_{k}_{j}"))
            choice.finish_reason = "tool_calls"
        elif ask.mode is Mode.JSON:
            value = {"text": label} if ask.schema is _ANY_OBJECT else instance_of(ask.schema, label)
            choice.parts.append(Part(split(orjson.dumps(value).decode(), tokens)))
        else:
            choice.parts.append(Part([f"{label}:{i} " for i in range(tokens)]))
        if ask.stop:
            _apply_stop(choice, ask.stop)
        if cap is not None:
            _apply_cap(choice, cap)
        choices.append(choice)
    return choices


def split(text: str, pieces: int) -> list[str]:
    """`text` in `pieces` nearly equal consecutive pieces (fewer when the text is shorter)."""
    pieces = max(1, min(pieces, len(text)))
    size, extra = divmod(len(text), pieces)
    out, at = [], 0
    for i in range(pieces):
        step = size + (1 if i < extra else 0)
        out.append(text[at : at + step])
        at += step
    return out


def _apply_stop(choice: Choice, stops: tuple[str, ...]) -> None:
    for part in choice.parts:
        if part.tool is not None:
            continue
        text = "".join(part.pieces)
        at = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
        if at == -1:
            continue
        kept, used = [], 0
        for piece in part.pieces:
            if used + len(piece) >= at:
                if at > used:
                    kept.append(piece[: at - used])
                break
            kept.append(piece)
            used += len(piece)
        part.pieces = kept
        choice.finish_reason = "stop"


def _apply_cap(choice: Choice, cap: int) -> None:
    left = cap
    for i, part in enumerate(choice.parts):
        if len(part.pieces) > left:
            part.pieces = part.pieces[:left]
            part.cut = True
            del choice.parts[i + 1 if part.pieces else i :]
            choice.finish_reason = "length"
            return
        left -= len(part.pieces)
