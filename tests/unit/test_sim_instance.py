"""The simulator's schema-instance generator: every answer validates against the schema it was asked for."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, Literal

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from gateway.sim.content import schema_in_text, split
from gateway.sim.instance import instance_of


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(min_length=3, max_length=40)
    age: int = Field(ge=18, le=130)
    score: float = Field(gt=0.5, multiple_of=0.25)
    color: Color
    kind: Literal["employee", "contractor"]
    home: Address
    previous: list[Address] = Field(min_length=2)
    nickname: str | None
    born: dt.date
    seen: dt.datetime
    tags: set[str] = Field(min_length=2)
    manager: Person | None = None  # recursive through $ref


SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("pydantic model with $defs, $ref, anyOf, enums, recursion", Person.model_json_schema()),
    (
        "strict object",
        {
            "type": "object",
            "properties": {"intent": {"type": "string"}},
            "required": ["intent"],
            "additionalProperties": False,
        },
    ),
    ("type list with null", {"type": ["null", "integer"], "minimum": 7}),
    (
        "oneOf of objects",
        {
            "oneOf": [
                {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                {"type": "string"},
            ]
        },
    ),
    (
        "allOf merges required",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
            ]
        },
    ),
    (
        "definitions (draft 7)",
        {
            "definitions": {"n": {"type": "number", "exclusiveMaximum": -3}},
            "type": "object",
            "properties": {"x": {"$ref": "#/definitions/n"}},
            "required": ["x"],
        },
    ),
    (
        "tuple prefixItems",
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2},
    ),
    (
        "formats",
        {
            "type": "object",
            "required": ["e", "u", "id", "t"],
            "properties": {
                "e": {"type": "string", "format": "email"},
                "u": {"type": "string", "format": "uri"},
                "id": {"type": "string", "format": "uuid"},
                "t": {"type": "string", "format": "date-time"},
            },
        },
    ),
    (
        "unique array of enum-free strings",
        {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
    ),
    ("integer multipleOf and exclusive bounds", {"type": "integer", "exclusiveMinimum": 10, "multipleOf": 4}),
    ("minProperties", {"type": "object", "properties": {"a": {"type": "null"}}, "minProperties": 1}),
    ("implicit object", {"properties": {"q": {"type": "string", "minLength": 12}}, "required": ["q"]}),
    ("root recursion", {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": []}),
]


@pytest.mark.parametrize("schema", [s for _, s in SCHEMAS], ids=[n for n, _ in SCHEMAS])
def test_instance_validates_against_its_schema(schema):
    value = instance_of(schema, "sim-a#1")
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


def test_pydantic_accepts_the_instance_and_strings_name_the_simulator():
    person = Person.model_validate(instance_of(Person.model_json_schema(), "sim-a#7"))
    assert person.name == "sim-a#7" and person.age == 18 and person.score == 0.75
    assert person.color is Color.RED and person.kind == "employee" and person.home.zip.isdigit()
    assert len(person.previous) == 2 and len(person.tags) == 2 and person.manager is None


def test_openai_strict_schema_of_a_model_is_instantiated():
    from openai.lib._pydantic import to_strict_json_schema

    schema = to_strict_json_schema(Person)
    value = instance_of(schema, "x")
    jsonschema.validate(value, schema)
    assert (
        Person.model_validate(value).nickname is not None
    )  # strict: every property required, anyOf -> first


def test_unknown_or_broken_schemas_give_a_value_not_an_error():
    for schema in (
        None,
        3,
        "x",
        [],
        {"$ref": "#/nowhere"},
        {"$ref": "http://example.com/s"},
        {"type": "wat"},
        {"anyOf": []},
        {"pattern": "("},
        {"items": 5, "minItems": 10**9},
        {"enum": []},
    ):
        instance_of(schema)
    deep: dict[str, Any] = {"type": "object", "required": ["a"], "properties": {"a": {"$ref": "#"}}}
    assert isinstance(instance_of(deep), dict)  # a required cycle ends at the depth limit


def test_schema_quoted_in_a_prompt_is_found_last_one_wins():
    example = '{"properties": {"foo": {"type": "array"}}, "required": ["foo"]}'
    real = '{"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}'
    text = (
        f"Format instructions. For example {example} is well formatted. Here is the schema:\n```\n{real}\n```"
    )
    assert schema_in_text([text])["required"] == ["city"]
    assert schema_in_text(['no json here {not json} {"a": 1}']) is None


def test_split_keeps_the_text_and_the_piece_count():
    assert split("abcdefg", 3) == ["abc", "de", "fg"]
    assert split("ab", 5) == ["a", "b"] and split("", 4) == [""]


# JSON as the simulator receives it: orjson.loads gives integers only within [-2**63, 2**64 - 1] (larger
# ones become floats), and orjson.dumps takes no others.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["object", "array", "string", "integer", "#", "#/$defs/a", "^[a-z]{3}$"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "properties",
                    "required",
                    "items",
                    "$ref",
                    "$defs",
                    "anyOf",
                    "enum",
                    "minItems",
                    "minimum",
                    "pattern",
                    "allOf",
                    "a",
                    "minLength",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(schema=_json)
def test_any_json_as_a_schema_gives_a_json_value(schema):
    orjson.dumps(instance_of(schema))  # never raises, always serialisable
