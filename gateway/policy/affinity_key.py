"""A request's affinity key: which requests share a cacheable prompt prefix (routing.affinity).

``key`` mode reads only what the client states: the ``x-llmgw-affinity`` header or the body's
``prompt_cache_key`` (OpenAI's own prompt-cache routing hint, forwarded to the provider as is). ``prefix``
mode takes that too when given, and otherwise derives the key from the content every turn of a
conversation repeats: the leading system/developer messages and the first user turn (Chat Completions;
Responses API ``instructions`` and leading ``input`` items; with ``previous_response_id``, whose ``input``
is only the new turn, the instructions alone), or the legacy ``prompt``. Later turns only
append, so every turn of a conversation gets the same key, and a different system prompt a different one.

The key is a 64-bit hash: it places the request on the ring and is logged (hex) as ``affinity_key``; the
content itself is never kept or logged. Each piece of content counts by its first ``PIECE_CHARS``
characters and its length, so the work per request stays bounded however long the system prompt is.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.policy.affinity import AffinityMode, hash64

AFFINITY_HEADER = "x-llmgw-affinity"
PIECE_CHARS = 2048
_LEADING_ROLES = frozenset({"system", "developer"})


def affinity_key(mode: AffinityMode, body: dict[str, Any], header: str | None) -> int | None:
    """The request's key, or None (unkeyed: routed as usual)."""
    if header:
        return hash64(b"k\0" + header.encode())
    explicit = body.get("prompt_cache_key")
    if type(explicit) is str and explicit:
        return hash64(b"k\0" + explicit.encode())
    if mode is not AffinityMode.PREFIX:
        return None
    parts: list[bytes] = []
    messages = body.get("messages")
    if type(messages) is list:
        _leading(messages, parts)
    else:
        instructions = body.get("instructions")
        if type(instructions) is str:
            parts.append(_piece("instructions", instructions))
        # With previous_response_id the provider holds the conversation and ``input`` is only the new turn,
        # different every time: the instructions alone are what the turns share.
        inp = body.get("input") if body.get("previous_response_id") is None else None
        if type(inp) is str:
            parts.append(_piece("user", inp))
        elif type(inp) is list:
            _leading(inp, parts)
        if not parts:
            prompt = body.get("prompt")
            if type(prompt) is list and prompt:
                prompt = prompt[0]
            if type(prompt) is str and prompt:
                parts.append(_piece("prompt", prompt))
    if not parts:
        return None
    return hash64(b"p\0" + b"".join(parts))


def _leading(items: list[Any], parts: list[bytes]) -> None:
    """System/developer items, then the first other item (the first user turn), then stop."""
    for item in items:
        if type(item) is not dict:
            parts.append(_piece("user", item))
            return
        role = item.get("role")
        parts.append(_piece(role if type(role) is str else "", item.get("content")))
        if role not in _LEADING_ROLES:
            return


def _piece(role: str, content: Any) -> bytes:
    if type(content) is not str:
        content = orjson.dumps(content).decode()  # content parts (text, images) as their JSON
    return b"%s\0%d\0%s\0" % (role.encode(), len(content), content[:PIECE_CHARS].encode())
