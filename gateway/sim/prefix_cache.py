"""The simulated provider's prompt-prefix cache (vLLM / SGLang automatic prefix caching, OpenAI prompt caching).

A prompt is cut into blocks of ``BLOCK_TOKENS`` tokens (4 bytes of prompt text a token, the simulator's
usual estimate); each block is named by a hash chained over every block before it, so a block is only
reused behind the same prefix. The cache is an LRU of those blocks holding ``capacity_tokens``; a request
is charged prefill for the tokens past its longest cached prefix, and leaves all its blocks cached.

Prompt text: chat ``messages`` (tools first, when given), Responses API ``instructions`` then ``input``, or
the legacy ``prompt``, each message serialized alone so a later turn's text starts with the earlier turn's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

BLOCK_TOKENS = 16
BYTES_PER_TOKEN = 4
_BLOCK_BYTES = BLOCK_TOKENS * BYTES_PER_TOKEN


def prompt_text(body: dict[str, Any]) -> bytes:
    """The prompt as the provider would prefill it: the leading content first, in a turn-stable form."""
    parts: list[bytes] = []
    tools = body.get("tools")
    if tools:
        parts.append(orjson.dumps(tools))
    messages = body.get("messages")
    if isinstance(messages, list):
        parts.extend(orjson.dumps(m) for m in messages)
    else:
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            parts.append(instructions.encode())
        inp = body.get("input")
        if isinstance(inp, str):
            parts.append(inp.encode())
        elif isinstance(inp, list):
            parts.extend(orjson.dumps(m) for m in inp)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            parts.append(prompt.encode())
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            parts.append(prompt[0].encode())
    return b"".join(parts)


class PrefixCache:
    """An LRU of prompt-prefix blocks, sized in tokens; one per simulated deployment."""

    __slots__ = ("_blocks",)

    def __init__(self) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup_and_fill(self, text: bytes, capacity_tokens: int) -> int:
        """Tokens of ``text`` already cached as a prefix; then caches all of it (LRU, ``capacity_tokens``)."""
        capacity = capacity_tokens // BLOCK_TOKENS
        blocks = self._blocks
        if capacity <= 0:
            blocks.clear()
            return 0
        h = 0
        hit = 0
        matching = True
        for start in range(0, len(text) - _BLOCK_BYTES + 1, _BLOCK_BYTES):  # whole blocks only, as vLLM does
            h = hash((h, text[start : start + _BLOCK_BYTES]))
            if matching and h in blocks:
                blocks.move_to_end(h)
                hit += 1
                continue
            matching = False
            blocks[h] = None
        while len(blocks) > capacity:
            blocks.popitem(last=False)
        return hit * BLOCK_TOKENS
