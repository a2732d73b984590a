"""What a JSON body would cost to parse, judged on its bytes before it is parsed.

orjson builds every value it reads: 2.4 million empty arrays (7.2 MB) take over half a second of the
event loop, and walking the result for its depth more again. So a body is measured first, at C speed
(``bytes.count``/``split``/``translate``), and refused before parsing when it holds too many values,
too many arrays and objects, or nests too deep.

Counting brackets and commas in the raw bytes is an upper bound (string contents count too), and it
decides almost every request at once. Only a body over a bound is looked at closely: escapes dropped,
strings cut out by splitting on quotes, then only the structure is counted; the depth is the number
of passes that strip innermost ``[]``/``{}`` pairs (at most ``max_json_containers`` brackets by then).
"""

from __future__ import annotations

import re
from enum import StrEnum


class JsonLimit(StrEnum):
    ELEMENTS = "json_elements"
    CONTAINERS = "json_containers"
    DEPTH = "json_depth"


_BRACKETS_ONLY = bytes(c for c in range(256) if c not in b"[]{}")
# One scan removes only the pairs that were innermost before it (two replace() calls in a row would
# also remove a ``{}`` that the first one just made, and count ``{[]}`` as one level).
_INNERMOST = re.compile(rb"\[\]|\{\}")


def json_over_limit(raw: bytes, max_elements: int, max_containers: int, max_depth: int) -> JsonLimit | None:
    """The first limit ``raw`` breaks, or None. Invalid JSON may pass: the parser reports it."""
    containers = raw.count(b"[") + raw.count(b"{")
    if containers <= max_depth and containers <= max_containers and containers + raw.count(b",") < max_elements:
        return None  # the upper bounds already fit: no closer look needed
    quotes = raw.count(b'"')
    if quotes // 2 > max_elements:  # every string is a value (and each split part below costs an object)
        return JsonLimit.ELEMENTS
    # Drop escaped backslashes, then escaped quotes, so every remaining quote opens or closes a string.
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = b"".join(raw.split(b'"')[::2]) if quotes else raw
    containers = structure.count(b"[") + structure.count(b"{")
    if containers > max_containers:
        return JsonLimit.CONTAINERS
    # n commas separate n + (number of non-empty containers) values; counting them plus the containers
    # bounds the values from above by at most the container count.
    if structure.count(b",") + containers > max_elements:
        return JsonLimit.ELEMENTS
    if containers > max_depth:
        brackets = structure.translate(None, _BRACKETS_ONLY)
        for _ in range(max_depth):
            inner = _INNERMOST.sub(b"", brackets)
            if not inner or len(inner) == len(brackets):  # all matched, or not JSON (the parser says so)
                return None
            brackets = inner
        return JsonLimit.DEPTH
    return None
