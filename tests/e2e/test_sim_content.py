"""What the simulator answers: tool calls, JSON instances, n, stop, token caps, logprobs, and OpenAI's 400s,
read with the real openai SDK over real sockets."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from gateway.sim.profile import SimProfile
from gateway.sim.runner import SimThread

MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


class Step(BaseModel):
    explanation: str
    output: int


class Plan(BaseModel):
    steps: list[Step]
    final: Step | None


@pytest.fixture(scope="module")
def sim():
    profile = SimProfile()
    profile.update({"ttft_ms": 0, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 6, "tail_p": 0})
    thread = SimThread([("sim-c", "us-east", profile)])
    port = thread.start()["sim-c"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    yield client
    client.close()
    thread.stop()


def test_tools_called_as_tool_choice_says(sim):
    r = sim.chat.completions.create(model="m", messages=MSG, tools=[WEATHER, CLOCK])
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]  # parallel by default
    args = json.loads(calls[0].function.arguments)
    assert args["unit"] == "c" and args["city"].startswith("sim-c#")  # first enum value; strings name the sim
    one = sim.chat.completions.create(
        model="m", messages=MSG, tools=[WEATHER, CLOCK], parallel_tool_calls=False
    )
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    forced = sim.chat.completions.create(
        model="m",
        messages=MSG,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert [c.function.name for c in forced.choices[0].message.tool_calls] == ["get_time"]
    none = sim.chat.completions.create(model="m", messages=MSG, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content.startswith("sim-c#")
    # an agent loop ends: after the tool's result, "auto" answers in text
    call = calls[0]
    after = sim.chat.completions.create(
        model="m",
        tools=[WEATHER],
        messages=[
            *MSG,
            {"role": "assistant", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert after.choices[0].finish_reason == "stop" and after.choices[0].message.content.startswith("sim-c#")


def test_tool_calls_stream_as_deltas_that_add_up(sim):
    chunks = list(
        sim.chat.completions.create(
            model="m",
            messages=MSG,
            tools=[WEATHER, CLOCK],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 6  # as many pieces as the profile has tokens
    args: dict[int, str] = {}
    for d in deltas:
        args[d.index] = args.get(d.index, "") + d.function.arguments
    assert [d.function.name for d in deltas if d.id] == ["get_weather", "get_time"]
    assert json.loads(args[0])["unit"] == "c" and json.loads(args[1])["tz"].startswith("sim-c#")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == 6


def test_json_schema_answers_a_valid_instance_and_parse_works(sim):
    parsed = sim.chat.completions.parse(model="m", messages=MSG, response_format=Plan)
    plan = parsed.choices[0].message.parsed
    assert isinstance(plan, Plan) and plan.steps == [] and plan.final.explanation.startswith("sim-c#")
    with sim.chat.completions.stream(model="m", messages=MSG, response_format=Plan) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Plan)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5}}, "required": ["n"]}
    r = sim.chat.completions.create(
        model="m",
        messages=MSG,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    assert json.loads(r.choices[0].message.content) == {"n": 5}


def test_json_object_follows_a_schema_quoted_in_the_messages(sim):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    }
    messages = [
        {"role": "system", "content": f"Answer in JSON matching this schema:\n{json.dumps(schema)}"},
        *MSG,
    ]
    r = sim.chat.completions.create(model="m", messages=messages, response_format={"type": "json_object"})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    plain = sim.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(plain.choices[0].message.content)["text"].startswith("sim-c#")
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        sim.chat.completions.create(model="m", messages=MSG, response_format={"type": "json_object"})


def test_n_stop_token_caps_and_logprobs(sim):
    r = sim.chat.completions.create(model="m", messages=MSG, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) == 3
    assert r.usage.completion_tokens == 18
    r = sim.chat.completions.create(model="m", messages=MSG, stop=[":3 ", "never"])
    text = r.choices[0].message.content
    assert (
        text.endswith(":2 sim-c#" + text.split("#")[1].split(":")[0]) and r.choices[0].finish_reason == "stop"
    )
    r = sim.chat.completions.create(
        model="m",
        messages=MSG,
        max_completion_tokens=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": Plan.model_json_schema()},
        },
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)  # cut short, like a real model
    r = sim.chat.completions.create(model="m", messages=MSG, logprobs=True, top_logprobs=3, max_tokens=2)
    lp = r.choices[0].logprobs.content
    assert [t.token for t in lp] == [r.choices[0].message.content[: len(lp[0].token)], lp[1].token]
    assert all(len(t.top_logprobs) == 3 and t.logprob < 0 for t in lp)
    streamed = [
        c
        for c in sim.chat.completions.create(model="m", messages=MSG, n=2, logprobs=True, stream=True)
        if c.choices and c.choices[0].delta.content
    ]
    assert {c.choices[0].index for c in streamed} == {0, 1} and all(
        c.choices[0].logprobs.content for c in streamed
    )


def test_responses_api_tools_and_text_format(sim):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    r = sim.responses.create(model="m", input="weather?", tools=[tool])
    call = r.output[0]
    assert (
        call.type == "function_call"
        and call.name == "get_weather"
        and json.loads(call.arguments)["unit"] == "c"
    )
    events = list(sim.responses.create(model="m", input="weather?", tools=[tool], stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = sim.responses.create(
        model="m",
        tools=[tool],
        input=[
            {"role": "user", "content": "weather?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert done.output_text.startswith("sim-c#")
    parsed = sim.responses.parse(model="m", input="plan", text_format=Plan)
    assert isinstance(parsed.output_parsed, Plan)
    with sim.responses.stream(model="m", input="plan", text_format=Plan) as stream:
        assert isinstance(stream.get_final_response().output_parsed, Plan)


def test_embeddings_dimensions_and_base64(sim):
    r = sim.embeddings.create(model="e", input=["a", "b"], dimensions=5)
    assert [len(d.embedding) for d in r.data] == [5, 5]
    floats = (
        sim.embeddings.create(model="e", input="a", dimensions=3, encoding_format="float").data[0].embedding
    )
    assert len(floats) == 3 and abs(sum(x * x for x in floats) - 1) < 1e-3
    assert sim.embeddings.create(model="e", input="a", dimensions=3).data[0].embedding == pytest.approx(
        floats
    )


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "m"}, "messages", "missing_required_parameter"),
        ({"model": "m", "messages": MSG, "temperature": 2.5}, "temperature", "decimal_above_max_value"),
        ({"model": "m", "messages": MSG, "temperature": -1}, "temperature", "decimal_below_min_value"),
        ({"model": "m", "messages": MSG, "top_p": "x"}, "top_p", "invalid_type"),
        ({"model": "m", "messages": MSG, "n": 0}, "n", "integer_out_of_range"),
        ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        (
            {"model": "m", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "array_above_max_length",
        ),
        ({"model": "m", "messages": MSG, "tool_choice": "required"}, "tool_choice", None),
        (
            {
                "model": "m",
                "messages": MSG,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            "invalid_value",
        ),
        (
            {
                "model": "m",
                "messages": MSG,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
            },
            "response_format.json_schema.name",
            "missing_required_parameter",
        ),
        ({"model": "m", "messages": MSG, "top_logprobs": 2}, "logprobs", "invalid_value"),
        (
            {"model": "m", "messages": [*MSG, {"role": "robot", "content": "x"}]},
            f"messages[{len(MSG)}].role",
            "invalid_value",
        ),
        (
            {"model": "m", "messages": [{"role": ["user"], "content": "x"}]},
            "messages[0].role",
            "invalid_value",
        ),
    ],
)
def test_what_openai_refuses_is_refused_alike(sim, body: dict[str, Any], param: str, code: str | None):
    r = httpx.post(str(sim.base_url) + "chat/completions", json=body, timeout=5)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error") and err[
        "message"
    ]


def test_stats_say_which_kind_of_answer_was_given(sim):
    stats_url = str(sim.base_url).removesuffix("/v1/") + "/sim/stats"
    before = len(httpx.get(stats_url, timeout=5).json()["recent"])
    sim.chat.completions.create(model="m", messages=MSG)
    sim.chat.completions.create(model="m", messages=MSG, tools=[WEATHER])
    sim.chat.completions.parse(model="m", messages=MSG, response_format=Plan)
    sim.chat.completions.create(model="m", messages=MSG, n=2)
    recent = httpx.get(stats_url, timeout=5).json()["recent"][before:]
    assert [r["content"] for r in recent] == [None, "tools", "json", "text"]
