"""OpenAI wire shapes, built as ready-to-send bytes.

Every content token names who produced it (`"{sim}#{serial}:{i} "`), so a test can tell which
simulator and which of its requests a piece of text came from.
"""

from __future__ import annotations

import base64
import functools
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
SIM_MODELS = ("sim-large", "sim-small", "sim-embed")


@dataclass(slots=True)
class Answer:
    """What one generation request will produce, fixed when it arrives."""

    sim: str
    serial: int
    model: str
    tokens: int
    finish_reason: str  # "stop", or "length" when max_tokens cut the answer short
    prompt_tokens: int
    include_usage: bool
    created: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    _json_head: bytes = field(default=b"", repr=False)

    def token(self, i: int) -> str:
        return f"{self.sim}#{self.serial}:{i} "

    def json_head(self) -> bytes:
        """`"sim#serial:` JSON-escaped: a token's JSON literal is this + b'%d "' % i (no encoder per token)."""
        if not self._json_head:
            self._json_head = orjson.dumps(f"{self.sim}#{self.serial}:")[:-1]
        return self._json_head

    def text(self) -> str:
        head = f"{self.sim}#{self.serial}:"
        return "".join([f"{head}{i} " for i in range(self.tokens)])


class Shape:
    """One endpoint's answer: a JSON body, or an SSE stream cut into opening/preface/tokens/closing."""

    def __init__(self, answer: Answer) -> None:
        self.a = answer

    def body(self) -> bytes:
        raise NotImplementedError

    def opening(self) -> bytes:
        """Events sent as soon as the request is accepted, before the first token (Responses API only)."""
        return b""

    def preface(self) -> bytes:
        """Events sent together with the first content token (e.g. the chat role chunk)."""
        return b""

    def tokens(self, start: int, stop: int) -> bytes:
        """The stream events of content tokens start..stop-1."""
        raise NotImplementedError

    def closing(self) -> bytes:
        raise NotImplementedError


def _chunk_prefix(fields: dict[str, Any]) -> bytes:
    # `{"id":...,"model":...}` -> `data: {"id":...,"model":...,"choices":[` : choices are appended per chunk
    return b"data: " + orjson.dumps(fields)[:-1] + b',"choices":['


class _ChunkedShape(Shape):
    """An answer streamed as ``data: {...,"choices":[...]}`` chunks (chat and legacy completions): the
    chunk prefix, the token and closing chunks, and the usage chunk when the client asked for it. A
    subclass names its id prefix, its chunk ``object`` and the choice of each chunk around its text."""

    ID_PREFIX = ""
    CHUNK_OBJECT = ""
    TOKEN_CHOICE = (b"", b"")  # a token chunk's choice: before the JSON string's text, after the text
    CLOSING_CHOICE = b""  # the last chunk's choice, up to the finish reason's value

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer)
        self.id = f"{self.ID_PREFIX}-{answer.sim}-{answer.serial}"
        self._pre_bytes = b""
        self._suf = b'],"usage":null}\n\n' if answer.include_usage else b"]}\n\n"

    @property
    def _pre(self) -> bytes:
        if not self._pre_bytes:  # built on first use: non-stream answers never need it
            a = self.a
            self._pre_bytes = _chunk_prefix(
                {
                    "id": self.id,
                    "object": self.CHUNK_OBJECT,
                    "created": a.created,
                    "model": a.model,
                    "system_fingerprint": "fp_sim",
                }
            )
        return self._pre_bytes

    def usage(self) -> dict[str, Any]:
        raise NotImplementedError

    def tokens(self, start: int, stop: int) -> bytes:
        before, after = self.TOKEN_CHOICE
        head = self._pre + before + self.a.json_head()
        tail = after + self._suf
        return b"".join([head + b"%d" % i + tail for i in range(start, stop)])

    def closing(self) -> bytes:
        a = self.a
        out = self._pre + self.CLOSING_CHOICE + a.finish_reason.encode() + b'"}' + self._suf
        if a.include_usage:
            out += self._pre + b'],"usage":' + orjson.dumps(self.usage()) + b"}\n\n"
        return out + DONE


class ChatShape(_ChunkedShape):
    ID_PREFIX = "chatcmpl"
    CHUNK_OBJECT = "chat.completion.chunk"
    TOKEN_CHOICE = (b'{"index":0,"delta":{"content":', b' "},"logprobs":null,"finish_reason":null}')
    CLOSING_CHOICE = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"'

    def usage(self) -> dict[str, Any]:
        a = self.a
        return {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.tokens,
            "total_tokens": a.prompt_tokens + a.tokens,
            "prompt_tokens_details": {"cached_tokens": a.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def body(self) -> bytes:
        a = self.a
        return orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": a.created,
                "model": a.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": a.text(),
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": a.finish_reason,
                    }
                ],
                "usage": self.usage(),
                "service_tier": "default",
                "system_fingerprint": "fp_sim",
            }
        )

    def preface(self) -> bytes:
        return (
            self._pre + b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
            b'"logprobs":null,"finish_reason":null}' + self._suf
        )


class CompletionShape(_ChunkedShape):
    ID_PREFIX = "cmpl"
    CHUNK_OBJECT = "text_completion"
    TOKEN_CHOICE = (b'{"text":', b' ","index":0,"logprobs":null,"finish_reason":null}')
    CLOSING_CHOICE = b'{"text":"","index":0,"logprobs":null,"finish_reason":"'

    def usage(self) -> dict[str, Any]:
        a = self.a
        return {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.tokens,
            "total_tokens": a.prompt_tokens + a.tokens,
        }

    def body(self) -> bytes:
        a = self.a
        return orjson.dumps(
            {
                "id": self.id,
                "object": "text_completion",
                "created": a.created,
                "model": a.model,
                "system_fingerprint": "fp_sim",
                "choices": [
                    {"text": a.text(), "index": 0, "logprobs": None, "finish_reason": a.finish_reason}
                ],
                "usage": self.usage(),
            }
        )


class ResponsesShape(Shape):
    """The Responses API: `object: "response"`, and typed `event:`/`data:` stream events."""

    def __init__(self, answer: Answer, max_output_tokens: int | None = None) -> None:
        super().__init__(answer)
        a = answer
        self.id = f"resp_{a.sim}_{a.serial}"
        self.item_id = f"msg_{a.sim}_{a.serial}"
        self.max_output_tokens = max_output_tokens
        self._item_id_json = orjson.dumps(self.item_id)

    def _event(self, kind: str, seq: int, data: dict[str, Any]) -> bytes:
        return (
            b"event: "
            + kind.encode()
            + b"\ndata: "
            + orjson.dumps({"type": kind, "sequence_number": seq, **data})
            + b"\n\n"
        )

    def _message(self, done: bool) -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": self.a.text(), "annotations": [], "logprobs": []}]
            if done
            else []
        )
        return {
            "id": self.item_id,
            "type": "message",
            "status": "completed" if done else "in_progress",
            "role": "assistant",
            "content": content,
        }

    def response(self, done: bool) -> dict[str, Any]:
        a = self.a
        incomplete = done and a.finish_reason == "length"
        status = ("incomplete" if incomplete else "completed") if done else "in_progress"
        usage = None
        if done:
            usage = {
                "input_tokens": a.prompt_tokens,
                "input_tokens_details": {"cached_tokens": a.cached_tokens},
                "output_tokens": a.tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": a.prompt_tokens + a.tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": a.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": None,
            "max_output_tokens": self.max_output_tokens,
            "model": a.model,
            "output": [self._message(True)] if done else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    def body(self) -> bytes:
        return orjson.dumps(self.response(True))

    def opening(self) -> bytes:
        pending = self.response(False)
        return self._event("response.created", 0, {"response": pending}) + self._event(
            "response.in_progress", 1, {"response": pending}
        )

    def preface(self) -> bytes:
        return self._event(
            "response.output_item.added", 2, {"output_index": 0, "item": self._message(False)}
        ) + self._event(
            "response.content_part.added",
            3,
            {
                "item_id": self.item_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            },
        )

    def tokens(self, start: int, stop: int) -> bytes:
        head = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'
        mid = (
            b',"item_id":'
            + self._item_id_json
            + b',"output_index":0,"content_index":0,"delta":'
            + self.a.json_head()
        )
        tail = b' ","logprobs":[]}\n\n'
        return b"".join([head + b"%d" % (4 + i) + mid + b"%d" % i + tail for i in range(start, stop)])

    def closing(self) -> bytes:
        seq = 4 + self.a.tokens
        text = self.a.text()
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return (
            self._event("response.output_text.done", seq, {**where, "text": text, "logprobs": []})
            + self._event("response.content_part.done", seq + 1, {**where, "part": part})
            + self._event(
                "response.output_item.done", seq + 2, {"output_index": 0, "item": self._message(True)}
            )
            + self._event("response.completed", seq + 3, {"response": self.response(True)})
        )


def embedding_vector(text: Any, dim: int) -> list[float]:
    """A deterministic unit vector per input, so equal inputs embed equally."""
    return list(_unit_vector(zlib.crc32(orjson.dumps(text)) % 10007, dim))


@functools.lru_cache(maxsize=4096)
def _unit_vector(seed: int, dim: int) -> tuple[float, ...]:
    raw = [math.sin(seed + 1.7 * (j + 1)) for j in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return tuple(round(x / norm, 6) for x in raw)


class EmbeddingsShape(Shape):
    """An embeddings list (never streamed); `base64` packs little-endian float32 like OpenAI."""

    def __init__(self, answer: Answer, inputs: list[Any], dim: int, as_base64: bool) -> None:
        super().__init__(answer)
        self.inputs = inputs
        self.dim = dim
        self.as_base64 = as_base64

    def body(self) -> bytes:
        data = []
        for i, text in enumerate(self.inputs):
            vec: Any = embedding_vector(text, self.dim)
            if self.as_base64:
                vec = base64.b64encode(struct.pack(f"<{self.dim}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        usage = {"prompt_tokens": self.a.prompt_tokens, "total_tokens": self.a.prompt_tokens}
        return orjson.dumps({"object": "list", "data": data, "model": self.a.model, "usage": usage})


def models_body(names: list[str]) -> bytes:
    return orjson.dumps({"object": "list", "data": [model_entry(n) for n in names]})


def model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": "llmgw-sim"}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


# What OpenAI answers for each status, so clients' error handling sees familiar bodies.
_INJECTED = {
    400: ("Simulated bad request.", "invalid_request_error", None),
    401: ("Incorrect API key provided (simulated).", "invalid_request_error", "invalid_api_key"),
    403: ("Simulated permission denied.", "invalid_request_error", None),
    404: (
        "Simulated: the model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    408: ("Simulated request timeout.", "timeout", None),
    409: ("Simulated conflict.", "invalid_request_error", None),
    422: ("Simulated unprocessable request.", "invalid_request_error", None),
    429: (
        "Rate limit reached for requests (simulated). Please try again later.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: ("The server had an error while processing your request (simulated).", "server_error", None),
    502: ("Bad gateway (simulated).", "server_error", None),
    503: ("The server is overloaded or not ready yet (simulated).", "server_error", None),
    504: ("Gateway timeout (simulated).", "server_error", None),
}


def injected_error_body(status: int) -> bytes:
    default = ("Simulated error.", "invalid_request_error" if status < 500 else "server_error", None)
    message, type_, code = _INJECTED.get(status, default)
    return error_body(message, type_, code)
