"""What a generation request asks for, read from its JSON body and validated like OpenAI does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.sim.content import ContentAsk, read_content
from gateway.sim.stats import Endpoint
from gateway.sim.validation import BadRequest, check_chat, check_responses

__all__ = ["Ask", "BadRequest", "read_ask"]

MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_DIM = 8192
_TOKEN_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


@dataclass(slots=True)
class Ask:
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # the body's cap on generated tokens, if any
    schema_key: bytes | None  # canonical JSON of a json_schema response format's schema
    inputs: list[Any]  # embeddings only
    dimensions: int | None  # embeddings only
    as_base64: bool  # embeddings only
    prompt_tokens: int
    content: ContentAsk | None = None  # chat / Responses: what to answer with; None = the plain token text


def read_ask(endpoint: Endpoint, raw: bytes) -> Ask:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"We could not parse the JSON body of your request ({exc}).", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", None, "invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model", "missing_required_parameter")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest(
            f"Invalid type for 'stream': expected a boolean, but got {type(stream).__name__}.",
            "stream",
            "invalid_type",
        )
    content = None
    if endpoint is Endpoint.CHAT:
        check_chat(body)
        content = read_content(body, responses=False)
    elif endpoint is Endpoint.RESPONSES:
        check_responses(body)
        content = read_content(body, responses=True)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    cap = None
    for key in _TOKEN_CAPS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            cap = value
            break
    inputs: list[Any] = []
    dimensions = None
    prompt_tokens = max(1, len(raw) // 4)
    if endpoint is Endpoint.EMBEDDINGS:
        stream = False
        inputs = _embedding_inputs(body.get("input"))
        dims = body.get("dimensions")
        if dims is not None:
            if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= MAX_EMBEDDING_DIM:
                raise BadRequest(
                    f"'dimensions' must be an integer between 1 and {MAX_EMBEDDING_DIM}.",
                    "dimensions",
                    "invalid_value",
                )
            dimensions = dims
        prompt_tokens = sum(max(1, len(x) // 4 if isinstance(x, str) else len(x)) for x in inputs)
    return Ask(
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=cap,
        schema_key=_schema_key(endpoint, body),
        inputs=inputs,
        dimensions=dimensions,
        as_base64=body.get("encoding_format") == "base64",
        prompt_tokens=prompt_tokens,
        content=content,
    )


def _embedding_inputs(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [value]  # one input given as token ids
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise BadRequest(
                f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items.", "input", "invalid_value"
            )
        if all(isinstance(x, (str, list)) and x for x in value):
            return value
    raise BadRequest(
        "'input' must be a non-empty string, array of strings or array of token arrays.",
        "input",
        "invalid_value",
    )


def _schema_key(endpoint: Endpoint, body: dict[str, Any]) -> bytes | None:
    """Chat/completions: response_format.json_schema.schema; Responses API: text.format.schema."""
    schema = None
    if endpoint is Endpoint.RESPONSES:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema = fmt.get("schema")
    else:
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is None:
        return None
    return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
