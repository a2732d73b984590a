"""The clients people point at a gateway, unchanged, against the real gateway in front of the simulator:
openai Python (sync and async), the Node openai SDK, LangChain's ChatOpenAI, litellm as a client, instructor.

Versions are pinned in pyproject's `compat` extra and tests/node/package-lock.json (docs/clients.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from harness import Gateway, Sims, dep, free_port, model
from pydantic import BaseModel, Field

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
MSG = [{"role": "user", "content": "Tell me about a pet."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Pet(BaseModel):
    name: str = Field(description="the pet's name")
    kind: Literal["cat", "dog"]
    age: int = Field(ge=1)
    friends: list[str]


class Target:
    def __init__(self, gw: Gateway, sims: Sims) -> None:
        self.gw = gw
        self.sims = sims
        self.base_url = gw.url + "/v1"

    def sim_stats(self) -> dict[str, Any]:
        return self.sims.stats("sim-a")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    sims = Sims(
        {"sim-a": ("us-east", {"ttft_ms": 5, "ttft_dist": "fixed", "itl_ms": 1, "tokens": 6, "tail_p": 0})}
    )
    cfg = {
        "models": [
            model("chat", [dep("a", sims.base_url("sim-a"))], retry={"max_retries": 0}),
            model("embed", [dep("a-embed", sims.base_url("sim-a"), model="sim-embed")]),
            model(
                "retried",
                [dep("a-retried", sims.base_url("sim-a"))],
                retry={"max_retries": 2, "backoff_base_ms": 1, "backoff_max_ms": 2},
            ),
        ]
    }
    gw = Gateway(cfg, tmp_path_factory.mktemp("clients"), name="clients")
    yield Target(gw, sims)
    gw.stop()
    sims.stop()


def _pet_ok(pet: Any) -> None:
    assert isinstance(pet, Pet) and pet.kind == "cat" and pet.age == 1 and pet.name.startswith("sim-a#")


# -- openai Python, sync -------------------------------------------------------------------------------------
def test_openai_sync_chat_stream_tools_parse(target):
    client = openai.OpenAI(base_url=target.base_url, api_key="anything", max_retries=0)
    r = client.chat.completions.create(model="chat", messages=MSG, n=2)
    assert [c.message.content.startswith("sim-a#") for c in r.choices] == [True, True]
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="chat", messages=MSG, stream=True)
        if c.choices
    )
    assert text.startswith("sim-a#") and text.count(" ") == 6
    calls = (
        client.chat.completions.create(model="chat", messages=MSG, tools=[WEATHER], tool_choice="required")
        .choices[0]
        .message.tool_calls
    )
    assert calls[0].function.name == "get_weather" and "city" in json.loads(calls[0].function.arguments)
    with client.chat.completions.stream(
        model="chat", messages=MSG, tools=[WEATHER], tool_choice="required"
    ) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.name == "get_weather"
    _pet_ok(
        client.chat.completions.parse(model="chat", messages=MSG, response_format=Pet)
        .choices[0]
        .message.parsed
    )
    tool = openai.pydantic_function_tool(Pet)
    parsed = client.chat.completions.parse(model="chat", messages=MSG, tools=[tool], tool_choice="required")
    _pet_ok(parsed.choices[0].message.tool_calls[0].function.parsed_arguments)


def test_openai_sync_responses_and_embeddings(target):
    client = openai.OpenAI(base_url=target.base_url, api_key="anything", max_retries=0)
    assert client.responses.create(model="chat", input="hi").output_text.startswith("sim-a#")
    with client.responses.stream(model="chat", input="hi", text_format=Pet) as stream:
        _pet_ok(stream.get_final_response().output_parsed)
    _pet_ok(client.responses.parse(model="chat", input="a pet", text_format=Pet).output_parsed)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    call = client.responses.create(
        model="chat", input="weather?", tools=[tool], tool_choice="required"
    ).output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    emb = client.embeddings.create(model="embed", input=["a", "b"], dimensions=8)  # the SDK asks for base64
    assert [len(d.embedding) for d in emb.data] == [8, 8]


@pytest.mark.parametrize(
    ("kw", "headers", "error"),
    [
        ({"temperature": 3}, {}, openai.BadRequestError),
        ({"model": "no-such-model"}, {}, openai.NotFoundError),
        ({}, {"x-sim-error-rate": "1", "x-sim-error-status": "429"}, openai.RateLimitError),
        ({}, {"x-sim-error-rate": "1", "x-sim-error-status": "503"}, openai.InternalServerError),
        # a deadline the gateway enforces (x-gateway-timeout-ms, or the SDK's own x-stainless-timeout) ends as a 504
        ({}, {"x-sim-ttft-ms": "5000", "x-gateway-timeout-ms": "300"}, openai.InternalServerError),
    ],
)
def test_openai_errors_map_to_the_sdk_exception_classes(target, kw, headers, error):
    client = openai.OpenAI(base_url=target.base_url, api_key="anything", max_retries=0, timeout=20)
    with pytest.raises(error) as info:
        client.chat.completions.create(**{"model": "chat", "messages": MSG, **kw}, extra_headers=headers)
    if error is openai.BadRequestError:
        assert info.value.param == "temperature" and info.value.code == "decimal_above_max_value"
    if "x-sim-ttft-ms" in headers:
        assert info.value.status_code == 504 and info.value.code == "timeout"


@pytest.mark.parametrize(
    ("model_name", "upstream_calls"),
    [("retried", 3), ("chat", 2)],
    ids=["the gateway retried: the SDK does not", "the gateway did not retry: the SDK does"],
)
def test_retries_are_made_once_by_the_gateway_or_by_the_sdk_never_multiplied(
    target, model_name, upstream_calls
):
    """The SDK retries a 503 twice by default; a gateway that retried it twice already makes that 3 x 3 upstream
    calls unless its answer says x-should-retry: false. A model without gateway retries leaves them to the SDK."""
    client = openai.OpenAI(base_url=target.base_url, api_key="anything", max_retries=1, timeout=20)
    before = target.sims.stats("sim-a")["requests"]
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model=model_name,
            messages=MSG,
            extra_headers={"x-sim-error-rate": "1", "x-sim-error-status": "503"},
        )
    assert target.sims.stats("sim-a")["requests"] - before == upstream_calls
    assert info.value.response.headers.get("x-should-retry") == ("false" if model_name == "retried" else None)


def test_openai_connection_error_is_an_api_connection_error():
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


# -- openai Python, async ------------------------------------------------------------------------------------
def test_openai_async_chat_stream_tools_parse_responses_embeddings(target):
    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=target.base_url, api_key="anything", max_retries=0) as client:
            r, stream, parsed = await asyncio.gather(
                client.chat.completions.create(model="chat", messages=MSG),
                client.chat.completions.create(
                    model="chat", messages=MSG, stream=True, stream_options={"include_usage": True}
                ),
                client.chat.completions.parse(model="chat", messages=MSG, response_format=Pet),
            )
            assert r.choices[0].message.content.startswith("sim-a#")
            chunks = [c async for c in stream]
            assert chunks[-1].usage.completion_tokens == 6
            _pet_ok(parsed.choices[0].message.parsed)
            calls = (
                (await client.chat.completions.create(model="chat", messages=MSG, tools=[WEATHER]))
                .choices[0]
                .message.tool_calls
            )
            assert calls[0].function.name == "get_weather"
            _pet_ok((await client.responses.parse(model="chat", input="pet", text_format=Pet)).output_parsed)
            assert len((await client.embeddings.create(model="embed", input="x")).data[0].embedding) == 16
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="chat", messages=MSG, top_p=7)

    asyncio.run(main())


# -- the Node openai SDK -------------------------------------------------------------------------------------
def test_node_openai_sdk_stream_abort_and_errors(target):
    node = shutil.which("node")
    assert node is not None, "node is required (the Makefile installs tests/node with npm)"
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), "run `make node-deps` (npm ci in tests/node)"
    before = target.sim_stats()["cancelled"]["mid_stream"]
    out = subprocess.run(
        [node, str(NODE_DIR / "compat.mjs"), target.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["chat"].startswith("sim-a#") and len(seen["stream"]) == 6 and seen["stream_usage"] == 6
    assert seen["tool_call"][0][0] == "lookup" and seen["tool_call"][0][1]["q"].startswith("sim-a#")
    assert seen["aborted"] is True and seen["abort_seen"] == 3, seen
    assert seen["bad_request"] == {
        "class": "BadRequestError",
        "status": 400,
        "param": "temperature",
        "code": "decimal_above_max_value",
    }
    assert seen["not_found"]["class"] == "NotFoundError" and seen["not_found"]["status"] == 404
    assert seen["rate_limited"]["class"] == "RateLimitError"
    # the abort reached the provider: the gateway cancelled the upstream stream
    deadline = time.monotonic() + 10
    while target.sim_stats()["cancelled"]["mid_stream"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.sim_stats()["cancelled"]["mid_stream"] == before + 1


# -- LangChain -----------------------------------------------------------------------------------------------
def test_langchain_chat_openai_invoke_stream_tools_and_structured_output(target):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="chat", base_url=target.base_url, api_key="anything", max_retries=0)
    assert llm.invoke("hi").content.startswith("sim-a#")
    assert "".join(c.content for c in llm.stream("hi")).count("sim-a#") == 6
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("weather in Paris?")
    assert msg.tool_calls[0]["name"] == "get_weather" and msg.tool_calls[0]["args"]["city"].startswith(
        "sim-a#"
    )
    for method in ("function_calling", "json_schema"):
        _pet_ok(llm.with_structured_output(Pet, method=method).invoke("a pet"))
    prompt = f"Describe a pet. Answer in JSON that follows this schema: {json.dumps(Pet.model_json_schema())}"
    _pet_ok(llm.with_structured_output(Pet, method="json_mode").invoke(prompt))


# -- litellm as a client -------------------------------------------------------------------------------------
def test_litellm_as_a_client(target):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list
    import litellm

    kw = {"api_base": target.base_url, "api_key": "anything", "num_retries": 0}
    r = litellm.completion(model="openai/chat", messages=MSG, **kw)
    assert r.choices[0].message.content.startswith("sim-a#")
    parts = [
        c.choices[0].delta.content or ""
        for c in litellm.completion(model="openai/chat", messages=MSG, stream=True, **kw)
    ]
    assert "".join(parts).count("sim-a#") == 6
    calls = (
        litellm.completion(model="openai/chat", messages=MSG, tools=[WEATHER], tool_choice="required", **kw)
        .choices[0]
        .message.tool_calls
    )
    assert calls[0].function.name == "get_weather"
    _pet_ok(
        Pet.model_validate_json(
            litellm.completion(model="openai/chat", messages=MSG, response_format=Pet, **kw)
            .choices[0]
            .message.content
        )
    )
    assert len(litellm.embedding(model="openai/embed", input=["x"], **kw).data[0]["embedding"]) == 16
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(model="openai/chat", messages=MSG, temperature=9, **kw)


# -- instructor ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["TOOLS", "JSON", "JSON_SCHEMA"])
def test_instructor_modes(target, mode):
    import instructor

    client = instructor.from_openai(
        openai.OpenAI(base_url=target.base_url, api_key="anything", max_retries=0),
        mode=getattr(instructor.Mode, mode),
    )
    _pet_ok(client.chat.completions.create(model="chat", messages=MSG, response_model=Pet, max_retries=0))
