"""What OpenAI refuses with a 400 before generating anything, with its messages, params and codes.

Only checks a client can trip over and would want to see answered as OpenAI does (missing `messages`,
`temperature` out of range, a `tool_choice` naming no tool ...). Unknown fields pass, as they pass through
gateways. An empty `messages` array passes too: OpenAI refuses it, but load tests and fault tests send it
as the cheapest valid-looking request.
"""

from __future__ import annotations

from typing import Any

_RANGES = (  # (field, low, high)
    ("temperature", 0.0, 2.0),
    ("top_p", 0.0, 1.0),
    ("presence_penalty", -2.0, 2.0),
    ("frequency_penalty", -2.0, 2.0),
)
_INT_RANGES = (("n", 1, 128), ("top_logprobs", 0, 20))
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
TOOL_CHOICES = ("none", "auto", "required")
FORMATS = ("text", "json_object", "json_schema")
MAX_STOPS = 4


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(
            f"Invalid type for '{name}': expected a decimal, but got {_kind(value)} instead.",
            name,
            "invalid_type",
        )
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(
            f"Invalid type for '{name}': expected an integer, but got {_kind(value)} instead.",
            name,
            "invalid_type",
        )
    return value


def check_sampling(body: dict[str, Any]) -> None:
    """Fields shared by chat completions and the Responses API."""
    for name, low, high in _RANGES:
        value = _number(body, name)
        if value is not None and value < low:
            raise BadRequest(
                f"Invalid '{name}': decimal below minimum value. Expected a value >= {low:g}, but got "
                f"{value:g} instead.",
                name,
                "decimal_below_min_value",
            )
        if value is not None and value > high:
            raise BadRequest(
                f"Invalid '{name}': decimal above maximum value. Expected a value <= {high:g}, but got "
                f"{value:g} instead.",
                name,
                "decimal_above_max_value",
            )
    for name in _TOKEN_FIELDS:
        value = _integer(body, name)
        if value is not None and value < 1:
            raise BadRequest(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got "
                f"{value} instead.",
                name,
                "integer_below_min_value",
            )


_ROLES = frozenset({"system", "assistant", "user", "function", "tool", "developer"})


def check_chat(body: dict[str, Any]) -> None:
    if "messages" not in body:
        raise BadRequest("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest(
            f"Invalid type for 'messages': expected an array of objects, but got {_kind(messages)} instead.",
            "messages",
            "invalid_type",
        )
    for i, m in enumerate(messages):
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:  # (a list or an object is not hashable)
            raise BadRequest(
                f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', 'function', "
                "'tool', and 'developer'.",
                f"messages[{i}].role",
                "invalid_value",
            )
    check_sampling(body)
    for name, low, high in _INT_RANGES:
        value = _integer(body, name)
        if value is not None and not low <= value <= high:
            raise BadRequest(
                f"Invalid '{name}': integer out of range. Expected a value between {low} and {high}, "
                f"but got {value} instead.",
                name,
                "integer_out_of_range",
            )
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest(
            f"Invalid type for 'logprobs': expected a boolean, but got {_kind(logprobs)} instead.",
            "logprobs",
            "invalid_type",
        )
    if body.get("top_logprobs") is not None and logprobs is not True:
        raise BadRequest(
            "Invalid value for 'logprobs': must be true when 'top_logprobs' is set.",
            "logprobs",
            "invalid_value",
        )
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest(
                "Invalid type for 'stop': expected a string or an array of strings.", "stop", "invalid_type"
            )
        if len(stop) > MAX_STOPS:
            raise BadRequest(
                f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOPS}, "
                f"but got an array with length {len(stop)} instead.",
                "stop",
                "array_above_max_length",
            )
    names = check_tools(body.get("tools"), nested=True)
    check_tool_choice(body.get("tool_choice"), names, nested=True)
    check_response_format(body.get("response_format"), messages)


def check_responses(body: dict[str, Any]) -> None:
    if "input" not in body and "previous_response_id" not in body and "prompt" not in body:
        raise BadRequest("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    check_sampling(body)
    names = check_tools(body.get("tools"), nested=False)
    check_tool_choice(body.get("tool_choice"), names, nested=False)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind not in FORMATS:
            raise BadRequest(
                f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and 'json_schema'.",
                "text.format.type",
                "invalid_value",
            )
        if kind == "json_schema" and not isinstance(fmt.get("name"), str):
            raise BadRequest(
                "Missing required parameter: 'text.format.name'.",
                "text.format.name",
                "missing_required_parameter",
            )
        if kind == "json_schema" and not isinstance(fmt.get("schema"), dict):
            raise BadRequest(
                "Missing required parameter: 'text.format.schema'.",
                "text.format.schema",
                "missing_required_parameter",
            )


def check_tools(tools: Any, *, nested: bool) -> list[str]:
    """The function tools' names. Chat nests them (`{type, function: {name}}`); the Responses API does not."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest(
            f"Invalid type for 'tools': expected an array of objects, but got {_kind(tools)} instead.",
            "tools",
            "invalid_type",
        )
    names = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(
                f"Invalid type for 'tools[{i}]': expected an object, but got {_kind(tool)} instead.",
                f"tools[{i}]",
                "invalid_type",
            )
        if tool.get("type") != "function":
            if nested:
                raise BadRequest(
                    f"Invalid value for 'tools[{i}].type': expected 'function'.",
                    f"tools[{i}].type",
                    "invalid_value",
                )
            continue  # the Responses API's built-in tools (web_search ...): never called here
        spec = tool.get("function") if nested else tool
        where = f"tools[{i}].function" if nested else f"tools[{i}]"
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest(
                f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter"
            )
        names.append(name)
    return names


def check_tool_choice(choice: Any, names: list[str], *, nested: bool) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise BadRequest(
                f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', and 'required'.",
                "tool_choice",
                "invalid_value",
            )
        if choice == "required" and not names:
            raise BadRequest(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
                None,
            )
        return
    if not isinstance(choice, dict):
        raise BadRequest(
            f"Invalid type for 'tool_choice': expected a string or an object, but got {_kind(choice)} "
            "instead.",
            "tool_choice",
            "invalid_type",
        )
    if choice.get("type") != "function":
        return  # allowed_tools, built-in tools, custom tools: left to the model
    spec = choice.get("function") if nested else choice
    name = spec.get("name") if isinstance(spec, dict) else None
    if name not in names:
        raise BadRequest(
            f"Invalid value for 'tool_choice': function '{name}' is not among the 'tools'.",
            "tool_choice",
            "invalid_value",
        )


def check_response_format(fmt: Any, messages: list[Any]) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise BadRequest(
            f"Invalid type for 'response_format': expected an object, but got {_kind(fmt)} instead.",
            "response_format",
            "invalid_type",
        )
    kind = fmt.get("type")
    if kind not in FORMATS:
        raise BadRequest(
            f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and 'json_schema'.",
            "response_format.type",
            "invalid_value",
        )
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest(
                "Missing required parameter: 'response_format.json_schema'.",
                "response_format.json_schema",
                "missing_required_parameter",
            )
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise BadRequest(
                "Missing required parameter: 'response_format.json_schema.name'.",
                "response_format.json_schema.name",
                "missing_required_parameter",
            )
    elif kind == "json_object" and not any("json" in text.lower() for text in message_texts(messages)):
        raise BadRequest(
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
            "'json_object'.",
            "messages",
            None,
        )


def message_texts(messages: list[Any]) -> list[str]:
    """The text of every message (string content or text parts), in order."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out
