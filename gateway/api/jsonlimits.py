"""What a JSON body would cost to parse, judged on its bytes before it is parsed.

orjson builds every value it reads: 2.4 million empty arrays (7.2 MB) take over half a second of the
event loop, and walking the result for its depth more again. So a body is measured first, at C speed
(``bytes.count``/``find``/``split``), and refused before parsing when it holds too many values or too
many arrays and objects. Once those are bounded, parsing is bounded, and so is the depth walk after it.

Counting brackets and commas in the raw bytes is an upper bound (string contents count too), and it
decides almost every request at once. Only a body over a bound is looked at closely: what lies
inside strings is subtracted (strings found quote by quote when there are few, else cut out by
splitting on quotes once escapes are dropped). The cost stays proportional to the body's size.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple


class JsonLimit(StrEnum):
    ELEMENTS = "json_elements"
    CONTAINERS = "json_containers"


# orjson reads integers into 64 bits, from -2**63 (19 digits) to 2**64 - 1 (20 digits): one of fewer
# digits always fits. Runs of digits are looked for with translate and find (C speed; a regex takes 30x).
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_NINETEEN_DIGITS = b"0" * 19
_INT64_MIN, _UINT64_END = -(2**63), 2**64
# an integer literal of 19 digits or more: not the fraction or exponent of a float, nor part of one
_LONG_INTEGER = re.compile(rb"(?<![\d.eE+-])-?\d{19,}(?![\d.eE])")
FEW_QUOTES = 4096  # up to this many quotes, strings are found one by one; beyond, by one split
_NOT_MARKS = bytes(c for c in range(256) if c not in b'"\\[]{},')


class JsonMarks(NamedTuple):
    """Counts of the bytes that may be JSON structure (string contents included)."""

    brackets: int  # [ and {
    commas: int
    quotes: int

    def add(self, other: JsonMarks) -> JsonMarks:
        return JsonMarks(
            self.brackets + other.brackets, self.commas + other.commas, self.quotes + other.quotes
        )


def count_marks(chunk: bytes) -> JsonMarks:
    return JsonMarks(chunk.count(b"[") + chunk.count(b"{"), chunk.count(b","), chunk.count(b'"'))


def json_over_limit(
    raw: bytes, max_elements: int, max_containers: int, marks: JsonMarks | None = None
) -> tuple[JsonLimit | None, int]:
    """The limit ``raw`` breaks (or None), and an upper bound of its arrays and objects (for the depth
    check after parsing). ``marks``: the body's marks if already counted (as its parts arrived).
    Invalid JSON may pass: the parser reports it."""
    if marks is None:
        containers = raw.count(b"[") + raw.count(b"{")
        commas = raw.count(b",")
    else:
        containers, commas = marks.brackets, marks.commas
    if containers <= max_containers and containers + commas < max_elements:
        return None, containers  # the upper bounds already fit: no closer look needed
    quotes = raw.count(b'"') if marks is None else marks.quotes
    if quotes // 2 > max_elements:  # every string is a value (and each string below costs Python work)
        return JsonLimit.ELEMENTS, containers
    if quotes <= FEW_QUOTES:  # a long prompt, or a flood of brackets: count inside strings in place
        for start, end in _string_spans(raw):
            containers -= raw.count(b"[", start, end) + raw.count(b"{", start, end)
            commas -= raw.count(b",", start, end)
    else:
        # Keep only the bytes that matter (a fast C pass that shrinks prose and code several times),
        # drop escaped backslashes, then escaped quotes: every remaining quote opens or closes a string.
        kept = raw.translate(None, _NOT_MARKS)
        if b"\\" in kept:
            kept = kept.replace(b"\\\\", b"").replace(b'\\"', b"")
        structure = b"".join(kept.split(b'"')[::2])
        containers = structure.count(b"[") + structure.count(b"{")
        commas = structure.count(b",")
    if containers > max_containers:
        return JsonLimit.CONTAINERS, containers
    # n commas separate n + (number of non-empty containers) values; counting them plus the containers
    # bounds the values from above by at most the container count.
    if commas + containers >= max_elements:
        return JsonLimit.ELEMENTS, containers
    return None, containers


def _string_spans(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of every string's contents, quotes excluded; an unclosed string runs to the end."""
    spans = []
    find = raw.find
    pos = 0
    while (start := find(b'"', pos)) >= 0:
        end = start
        while True:
            end = find(b'"', end + 1)
            if end < 0:
                spans.append((start + 1, len(raw)))
                return spans
            backslashes = 0
            while raw[end - 1 - backslashes] == 0x5C:  # an odd run of backslashes escapes the quote
                backslashes += 1
            if not backslashes % 2:
                break
        spans.append((start + 1, end))
        pos = end + 1
    return spans


def deeper_than(obj: object, limit: int) -> bool:
    """Whether parsed JSON nests deeper than ``limit`` levels; walks at most the containers it holds,
    which ``json_over_limit`` bounded before parsing."""
    depth = 0
    level = [obj]
    while level:
        depth += 1
        if depth > limit:
            return True
        nxt: list[object] = []
        for o in level:
            if isinstance(o, dict):
                nxt.extend(v for v in o.values() if isinstance(v, dict | list))
            elif isinstance(o, list):
                nxt.extend(v for v in o if isinstance(v, dict | list))
        level = nxt
    return False


def wide_integer(raw: bytes) -> str | None:
    """The first integer literal in ``raw`` beyond 64 bits, or None. orjson reads such a literal as a
    float, so writing the body again for the provider would change its value: it is refused instead.
    Only a body with a run of 19 digits or more (often inside a string) is looked at closely: its strings are cut
    out (escapes first, as above) and the integer literals left are read."""
    if raw.translate(_DIGITS_AS_ZEROS).find(_NINETEEN_DIGITS) < 0:
        return None
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in raw else raw
    structure = b" ".join(unescaped.split(b'"')[::2])
    for literal in _LONG_INTEGER.findall(structure):
        # JSON has no leading zeros: over 20 digits is out of range (and int() would refuse 4,300)
        if len(literal.lstrip(b"-")) > 20 or not _INT64_MIN <= int(literal) < _UINT64_END:
            return literal.decode()
    return None
