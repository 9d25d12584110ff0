"""End to end, the Responses API on a real `serve run serve_config.yaml` with the small SmolLM2
model (greedy, few tokens), through the official `openai` SDK and the OpenAI Agents SDK: create,
stream, parse, a function-call round trip, `previous_response_id` served from the paged cache,
GET and DELETE, and bad requests refused with nothing queued. Runs on the shared `serve run`
(tests/e2e/conftest.default_server). Two router replicas sharing the store:
test_responses_replicas_e2e.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from .serving import BASE

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
HELLO = "Say hello in one short sentence."
BLOCK = 32  # the engine's default KV block size (tokens)
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather of a city.",
    "parameters": WEATHER_SCHEMA,
    "strict": True,
}


@pytest.fixture(scope="module")
def server(default_server):
    return default_server.get()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_create_answers_and_max_output_tokens_leaves_it_incomplete(oai):
    r = oai.responses.create(model=MODEL, input=HELLO, max_output_tokens=24, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL and r.output_text.strip()
    assert [i.type for i in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.usage.input_tokens > 10 and 1 <= r.usage.output_tokens <= 24
    assert r.usage.output_tokens_details.reasoning_tokens == 0  # SmolLM2 does not think
    short = oai.responses.create(model=MODEL, input=HELLO, max_output_tokens=2, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 2 and r.output_text.startswith(short.output_text)


def test_stream_ends_with_the_response_create_gives(oai):
    args = dict(model=MODEL, input=HELLO, max_output_tokens=48, temperature=0)
    whole = oai.responses.create(**args)
    assert whole.status == "completed", whole  # the SDK's accumulator needs response.completed
    with oai.responses.stream(**args) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.status == whole.status
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert [i.model_dump(exclude={"id"}) for i in final.output] == [
        {**i.model_dump(exclude={"id"}), "content": [{**c.model_dump(), "parsed": None} for c in i.content]}
        for i in whole.output
    ]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert kinds.count("response.output_text.delta") >= 2


def test_parse_fills_a_pydantic_model(oai):
    class Capital(BaseModel):
        city: str = Field(max_length=20)
        country: str = Field(max_length=20)

    r = oai.responses.parse(
        model=MODEL, input="What is the capital of France?", text_format=Capital, max_output_tokens=60, temperature=0
    )
    assert r.status == "completed" and isinstance(r.output_parsed, Capital), r.output_text
    assert r.output_parsed.city and r.output_parsed.country


def test_a_function_call_round_trip_continues_from_the_cache(oai):
    first = oai.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=64,
        temperature=0,
    )
    calls = [i for i in first.output if i.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1, first.output
    assert calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_SCHEMA)
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"}
    answer = oai.responses.create(
        model=MODEL, previous_response_id=first.id, input=[result], tools=[WEATHER], max_output_tokens=24, temperature=0
    )
    assert [i.type for i in answer.output] == ["message"] and answer.output_text.strip()
    # the continuation's prompt starts with the first turn's prompt and call: served by the cache
    held = (first.usage.input_tokens + first.usage.output_tokens - 1) // BLOCK * BLOCK
    assert answer.usage.input_tokens_details.cached_tokens >= held > 0, (first.usage, answer.usage)


def test_previous_response_id_continues_the_conversation_from_the_cache(oai):
    first = oai.responses.create(
        model=MODEL, input="What is the capital of France? Answer in a few words.", max_output_tokens=12, temperature=0
    )
    second = oai.responses.create(
        model=MODEL, previous_response_id=first.id, input="And of Germany?", max_output_tokens=12, temperature=0
    )
    assert second.previous_response_id == first.id and second.output_text.strip()
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    held = (first.usage.input_tokens + first.usage.output_tokens - 1) // BLOCK * BLOCK
    assert second.usage.input_tokens_details.cached_tokens >= held > 0, (first.usage, second.usage)


def test_get_and_delete(oai):
    made = oai.responses.create(model=MODEL, input=HELLO, max_output_tokens=4, temperature=0, metadata={"run": "e2e"})
    got = oai.responses.retrieve(made.id)
    assert got.model_dump() == made.model_dump() and got.metadata == {"run": "e2e"}
    deleted = httpx.delete(f"{BASE}/v1/responses/{made.id}", timeout=30)
    assert deleted.json() == {"id": made.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError) as info:
        oai.responses.create(model=MODEL, previous_response_id=made.id, input="more")
    assert info.value.body["param"] == "previous_response_id"


def _engine():
    stats = httpx.get(f"{BASE}/v1/models/{MODEL}/cache", timeout=30).json()
    return stats["engine"], stats["cache"]


BAD = [
    ({"input": "hi", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"input": "hi", "tools": [{"type": "web_search"}, {"type": "code_interpreter"}]}, 400, "tools.0.type"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input.0.call_id"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400, "input.0.call_id"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        "input.0.content.0.image_url",
    ),
    ({"input": "hi", "temperature": 5.0}, 400, "temperature"),
]


def test_bad_requests_are_4xx_in_openai_s_shape_and_queue_nothing(server):
    before, _ = _engine()
    for fields, status, param in BAD:
        r = httpx.post(f"{BASE}/v1/responses", json={"model": MODEL, **fields}, timeout=30)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["message"] and error["type"], error
    after, cache = _engine()
    # temperature is the engine's own check: the one request that reached the model, refused at submit
    assert after["requests"] <= before["requests"] + 1 and after["running"] == 0 and after["waiting"] == 0
    assert cache["blocks_used"] == 0, cache


def _agent_answers(model_kind: str) -> str:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        return f"18 degrees and sunny in {city}"

    client = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)
    kind = OpenAIResponsesModel if model_kind == "responses" else OpenAIChatCompletionsModel
    agent = Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        tools=[get_weather],
        model=kind(model=MODEL, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64),
        tool_use_behavior="stop_on_first_tool",  # the tool's answer is the agent's: deterministic
    )
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    return result.final_output


@pytest.mark.parametrize("model_kind", ["responses", "chat_completions"])
def test_an_openai_agents_sdk_agent_calls_its_function_tool(server, model_kind):
    assert _agent_answers(model_kind).startswith("18 degrees and sunny in ")
