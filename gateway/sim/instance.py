"""A minimal JSON value that validates against a JSON Schema: what the simulator answers when asked for
structured output (response_format json_schema, a tool's parameters, a schema quoted in the prompt).

Minimal means: only required properties, the fewest array items allowed, the first enum value, the first
branch of anyOf/oneOf, numbers at their lower bound. Strings say who produced them (`label`), so a test
can tell which simulator answered. Any input is accepted: a schema this does not understand yields the
most plausible value (never an exception), since a provider's answer is never a crash.
"""

from __future__ import annotations

import math
import re
import re._parser as _parser  # the stdlib's own regex parser: a shortest string for a pattern
from typing import Any

MAX_DEPTH = 24
MAX_ITEMS = 16  # minItems above this is clamped: the answer stays small

_FORMATS = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "sim@example.com",
    "idn-email": "sim@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "/",
    "iri-reference": "/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "json-pointer": "",
    "relative-json-pointer": "0",
    "regex": ".*",
    "uri-template": "/",
}
_PATTERN_CANDIDATES = ("a", "A", "0", "sim", "a1", "aa", "00", "abc", "2025-01-01", "sim@example.com", "")


def instance_of(schema: Any, label: str = "sim") -> Any:
    """A minimal value valid against ``schema`` (a JSON Schema as parsed JSON)."""
    return _Builder(schema if isinstance(schema, dict) else {}, label).build(schema, 0)


class _Builder:
    def __init__(self, root: dict[str, Any], label: str) -> None:
        self.root = root
        self.label = label
        self.active: list[str] = []  # $refs being expanded: a branch back into one of them is a cycle

    def build(self, schema: Any, depth: int) -> Any:
        if schema is True or not isinstance(schema, dict):
            return None
        if depth > MAX_DEPTH:
            return None
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            if target is not None:
                siblings = {k: v for k, v in schema.items() if k != "$ref"}
                self.active.append(ref)
                try:
                    return self.build({**target, **siblings} if siblings else target, depth + 1)
                finally:
                    self.active.pop()
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                return self.build(_merge(rest, _first_useful(branches, self.active)), depth + 1)
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in all_of:
                if isinstance(part, dict):
                    if isinstance(part.get("$ref"), str):
                        part = self._resolve(part["$ref"]) or {}
                    merged = _merge(merged, part)
            return self.build(merged, depth + 1)
        kind = _type_of(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind == "integer":
            return int(self._number(schema, integer=True))
        if kind == "number":
            return self._number(schema, integer=False)
        if kind == "boolean":
            return False
        return None

    def _resolve(self, ref: str) -> dict[str, Any] | None:
        """Local references only (`#`, `#/$defs/X`, `#/definitions/X`, any JSON pointer into the root)."""
        if not ref.startswith("#"):
            return None
        node: Any = self.root
        for raw in ref[1:].split("/"):
            if not raw:
                continue
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node if isinstance(node, dict) else None

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        out: dict[str, Any] = {}
        for name in names:
            out[name] = self.build(props.get(name, {}), depth + 1)
        want = schema.get("minProperties")
        if isinstance(want, int) and len(out) < want:
            for name, sub in props.items():
                if len(out) >= want:
                    break
                out.setdefault(name, self.build(sub, depth + 1))
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        prefix = prefix if isinstance(prefix, list) else []
        want = schema.get("minItems")
        want = (
            min(want, MAX_ITEMS) if isinstance(want, int) and not isinstance(want, bool) and want > 0 else 0
        )
        out = [self.build(sub, depth + 1) for sub in prefix[: max(want, len(prefix))]]
        while len(out) < want:
            value = self.build(items if isinstance(items, dict) else {}, depth + 1)
            if schema.get("uniqueItems") is True and value in out:
                value = _vary(value, len(out))
            out.append(value)
        return out

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        value = _FORMATS.get(fmt, self.label) if isinstance(fmt, str) else self.label
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            value = _matching(pattern, value)
        low = schema.get("minLength")
        high = schema.get("maxLength")
        if isinstance(high, int) and not isinstance(high, bool) and high >= 0 and len(value) > high:
            value = value[:high]
        if isinstance(low, int) and not isinstance(low, bool) and len(value) < low:
            value = value + "x" * (min(low, 4096) - len(value))
        return value

    @staticmethod
    def _number(schema: dict[str, Any], integer: bool) -> float:
        def num(key: str) -> float | None:
            v = schema.get(key)
            return (
                float(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                else None
            )

        low, high = num("minimum"), num("maximum")
        xlow, xhigh = num("exclusiveMinimum"), num("exclusiveMaximum")
        step = num("multipleOf")
        value = 0.0
        if low is not None and value < low:
            value = low
        if xlow is not None and value <= xlow:
            value = (
                math.floor(xlow) + 1
                if integer
                else (math.floor(xlow / step) + 1) * step
                if step
                else xlow + 1
            )
        if high is not None and value > high:
            value = high
        if xhigh is not None and value >= xhigh:
            value = math.ceil(xhigh) - 1 if integer else xhigh - 1
        if step is not None and step > 0 and value / step != round(value / step):
            up = math.ceil(value / step) * step
            value = up if high is None or up <= high else math.floor(value / step) * step
        if integer and value != int(value):
            value = math.ceil(value) if high is None or math.ceil(value) <= high else math.floor(value)
        return int(value) if integer else float(value)


def _type_of(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in named if k != "null"), named[0] if named else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema or "minItems" in schema:
        return "array"
    if "pattern" in schema or "minLength" in schema or "format" in schema:
        return "string"
    if "minimum" in schema or "maximum" in schema or "multipleOf" in schema:
        return "number"
    return None


def _first_useful(branches: list[Any], active: list[str]) -> dict[str, Any]:
    """The first branch that is a real schema, preferring one that is not just `null` (Optional[X] -> X)
    unless it leads back into a $ref being expanded (a recursive Optional ends with null)."""
    dicts = [b for b in branches if isinstance(b, dict)]
    fresh = [b for b in dicts if b.get("$ref") not in active]
    for b in fresh:
        if b.get("type") != "null":
            return b
    return fresh[0] if fresh else dicts[0] if dicts else {}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """allOf as one schema: properties and required lists unite, other keys of `b` win."""
    out = {**a, **b}
    pa, pb = a.get("properties"), b.get("properties")
    if isinstance(pa, dict) and isinstance(pb, dict):
        out["properties"] = {**pa, **pb}
    ra, rb = a.get("required"), b.get("required")
    if isinstance(ra, list) and isinstance(rb, list):
        out["required"] = list(dict.fromkeys([*ra, *rb]))
    return out


def _vary(value: Any, i: int) -> Any:
    if isinstance(value, str):
        return f"{value}{i}"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + i
    return value


def _matching(pattern: str, preferred: str) -> str:
    """`preferred` when it matches (JSON Schema patterns are unanchored searches), else a shortest string
    built from the pattern itself, else a known candidate."""
    try:
        rx = re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return preferred
    if rx.search(preferred):
        return preferred
    try:
        built = _from_regex(_parser.parse(pattern), 0)
    except Exception:  # an exotic construct: fall back on the candidates
        built = None
    for candidate in (built, *_PATTERN_CANDIDATES):
        if candidate is not None and rx.search(candidate):
            return candidate
    return preferred


def _from_regex(items: Any, depth: int) -> str:
    """A shortest string for a parsed regex (sre's parse tree): each repeat at its minimum, first branches."""
    if depth > 50:
        raise ValueError("regex too deep")
    out = []
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append("a" if arg != ord("a") else "b")
        elif name == "ANY":
            out.append("a")
        elif name == "IN":
            out.append(_from_class(arg))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _high, sub = arg
            out.append(_from_regex(sub, depth + 1) * min(low, 1000))
        elif name == "SUBPATTERN":
            out.append(_from_regex(arg[-1], depth + 1))
        elif name == "ATOMIC_GROUP":
            out.append(_from_regex(arg, depth + 1))
        elif name == "BRANCH":
            out.append(_from_regex(arg[1][0], depth + 1))
        elif name == "CATEGORY":
            out.append(_CATEGORY.get(str(arg), "a"))
        elif name in ("AT", "ASSERT", "ASSERT_NOT", "GROUPREF", "GROUPREF_EXISTS"):
            continue
        else:
            raise ValueError(name)
    return "".join(out)


_CATEGORY = {
    "CATEGORY_DIGIT": "0",
    "CATEGORY_NOT_DIGIT": "a",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_SPACE": "a",
    "CATEGORY_WORD": "a",
    "CATEGORY_NOT_WORD": "-",
}


def _from_class(items: Any) -> str:
    negate = any(str(op) == "NEGATE" for op, _ in items)
    if negate:
        banned = set()
        for op, arg in items:
            if str(op) == "LITERAL":
                banned.add(chr(arg))
            elif str(op) == "RANGE":
                banned.update(chr(c) for c in range(arg[0], min(arg[1], 0x10FFFF) + 1) if c < 0x3000)
        return next(c for c in "a0A-_ xZ9" if c not in banned)
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            return chr(arg)
        if name == "RANGE":
            return chr(arg[0])
        if name == "CATEGORY":
            return _CATEGORY.get(str(arg), "a")
    return "a"
