"""The Responses routes without a model, driven by the official `openai` SDK over an in-process
ASGI transport with scripted model clients (tests/fakes.py's FakeClient): create, stream (the
SDK's accumulator), parse, a function-call round trip, `previous_response_id` through a store two
routers share, GET and DELETE, and bad requests refused before anything is sent to the model. The
real model: tests/e2e/test_responses_e2e.py."""

from __future__ import annotations

import httpx2
import openai
import pytest
from pydantic import BaseModel

from deployments.config import RouterConfig
from deployments.responses.store import LogBackend, StoreClient
from deployments.router import RouterCore, create_app
from tests.fakes import OVERLOADED, USAGE, FakeClient, chunk

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def make_core(items=None, store: StoreClient | None = None) -> RouterCore:
    return RouterCore(RouterConfig(), {"m1": FakeClient("m1", items)}, store=store)


def sdk(core: RouterCore) -> openai.AsyncOpenAI:
    transport = httpx2.ASGITransport(app=create_app(core))
    return openai.AsyncOpenAI(
        api_key="k",
        base_url="http://test/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://test"),
    )


def sent(core: RouterCore) -> list[dict]:
    return core.models["m1"].payloads


def comparable(response) -> dict:
    """A response without what differs between two runs (ids, times) and the fields the SDK's
    stream accumulator adds (`parsed`, `parsed_arguments`)."""

    def strip(value):
        if isinstance(value, dict):
            drop = ("id", "call_id", "created_at", "completed_at", "parsed", "parsed_arguments")
            return {k: strip(v) for k, v in value.items() if k not in drop}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(response.model_dump())


async def test_create_and_stream_end_with_the_same_response():
    core = make_core()
    client = sdk(core)
    whole = await client.responses.create(model="m1", input="hi", instructions="Be brief.")
    assert whole.status == "completed" and whole.output_text == "Hello!" and whole.id.startswith("resp_")
    assert whole.usage.input_tokens == 3 and whole.usage.input_tokens_details.cached_tokens == 1
    assert whole.usage.output_tokens_details.reasoning_tokens == 0
    async with client.responses.stream(model="m1", input="hi", instructions="Be brief.") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert deltas == ["Hel", "lo", "!"]
    assert comparable(final) == comparable(whole)
    assert sent(core)[0]["prompt"]["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_a_function_call_round_trip_through_function_call_output():
    core = make_core([chunk(CALL[:25]), chunk(CALL[25:], 1, "stop", USAGE)])
    client = sdk(core)
    first = await client.responses.create(model="m1", input="Weather in Paris?", tools=[WEATHER])
    assert [i.type for i in first.output] == ["function_call"]
    call = first.output[0]
    assert (call.name, call.arguments, call.status) == ("get_weather", '{"city": "Paris"}', "completed")
    async with client.responses.stream(model="m1", input="Weather in Paris?", tools=[WEATHER]) as stream:
        streamed = await stream.get_final_response()
    assert comparable(streamed) == comparable(first)

    core.models["m1"].items = [chunk("Sunny.", 1, "stop", USAGE)]
    history = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True)]
    answer = await client.responses.create(
        model="m1",
        input=[*history, {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}],
        tools=[WEATHER],
    )
    assert answer.output_text == "Sunny."
    messages = sent(core)[-1]["prompt"]["messages"]
    assert messages[1]["tool_calls"][0]["id"] == call.call_id
    assert messages[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "18C, sunny"}


async def test_parse_reads_the_output_into_a_pydantic_model_under_its_schema():
    class Weather(BaseModel):
        city: str
        temp_c: int

    core = make_core([chunk('{"city": "Paris", '), chunk('"temp_c": 18}', 1, "stop", USAGE)])
    parsed = await sdk(core).responses.parse(model="m1", input="Weather?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", temp_c=18)
    guided = sent(core)[0]["sampling"]["guided"]["json_schema"]
    assert guided["properties"].keys() == {"city", "temp_c"} and guided["additionalProperties"] is False


async def test_previous_response_id_continues_on_another_router_sharing_the_store():
    store = StoreClient(LogBackend(16, 1 << 20))  # two routers, one store: as two router replicas
    one, two = make_core(store=store), make_core([chunk("Paris.", 1, "stop", USAGE)], store=store)
    first = await sdk(one).responses.create(model="m1", input="Capital of France?", instructions="Be brief.")
    second = await sdk(two).responses.create(model="m1", input="Sure?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == "Paris."
    assert sent(two)[0]["prompt"]["messages"] == [  # the instructions were not carried over
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Sure?"},
    ]
    third = await sdk(one).responses.create(model="m1", input="And?", previous_response_id=second.id)
    assert [m["content"] for m in sent(one)[-1]["prompt"]["messages"]] == [
        "Capital of France?",
        "Hello!",
        "Sure?",
        "Paris.",
        "And?",
    ]
    assert (await sdk(two).responses.retrieve(third.id)).output_text == "Hello!"


async def test_get_and_delete_a_stored_response_and_404s_after():
    core = make_core()
    client = sdk(core)
    made = await client.responses.create(model="m1", input="hi", metadata={"run": "7"})
    got = await client.responses.retrieve(made.id)
    assert got.model_dump() == made.model_dump() and got.metadata == {"run": "7"}
    raw = await client.responses.with_raw_response.delete(made.id)  # the SDK's delete() returns None
    assert raw.http_response.json() == {"id": made.id, "object": "response.deleted", "deleted": True}
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as info:
            await call(made.id)
        assert info.value.body["code"] == "response_not_found" and made.id in info.value.body["message"]
    unstored = await client.responses.create(model="m1", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)


async def test_bad_requests_are_refused_in_openai_s_shape_before_the_model_is_called():
    core = make_core()
    client = sdk(core)
    bad = [
        ({"input": "hi", "previous_response_id": "resp_nope"}, openai.NotFoundError, "previous_response_id"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, openai.BadRequestError, "tools.0.type"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]},
            openai.BadRequestError,
            "input.0.call_id",
        ),
        ({"input": [{"type": "message", "role": "user"}]}, openai.BadRequestError, "input.0.content"),
    ]
    for fields, error, param in bad:
        with pytest.raises(error) as info:
            await client.responses.create(model="m1", **fields)
        assert info.value.body["param"] == param, info.value.body
    assert sent(core) == [] and core.models["m1"].cancelled == 0  # nothing was sent to the model
    with pytest.raises(openai.NotFoundError, match="not hosted"):
        await client.responses.create(model="nope", input="hi")


async def test_a_call_that_fails_mid_stream_ends_with_response_failed_and_is_kept_as_failed():
    core = make_core([chunk("Hel"), OVERLOADED])
    client = sdk(core)
    async with client.responses.stream(model="m1", input="hi") as stream:
        events = [e async for e in stream]
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.message == "queue full" and failed.output_text == "Hel"
    assert (await client.responses.retrieve(failed.id)).status == "failed"


async def test_reasoning_is_a_reasoning_item_streamed_and_whole_and_is_not_rendered_back():
    think = {"tools": "hermes", "reasoning": "think", "in_reasoning": False}
    core = make_core([{**chunk("<think>Paris is"), "format": think}, chunk(" it.</think>Paris.", 1, "stop", USAGE)])
    client = sdk(core)
    whole = await client.responses.create(model="m1", input="Capital of France?")
    assert [i.type for i in whole.output] == ["reasoning", "message"] and whole.output_text == "Paris."
    assert whole.output[0].content[0].text == "Paris is it."
    async with client.responses.stream(model="m1", input="Capital of France?") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.reasoning_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "Paris is it." and comparable(final) == comparable(whole)
    await client.responses.create(model="m1", input="Sure?", previous_response_id=whole.id)
    assert [m["content"] for m in sent(core)[-1]["prompt"]["messages"]] == ["Capital of France?", "Paris.", "Sure?"]


async def test_reasoning_effort_goes_to_the_model_as_chat_s_reasoning_effort():
    core = make_core([chunk("Paris.", 1, "stop", USAGE)])
    await sdk(core).responses.create(model="m1", input="Capital of France?", reasoning={"effort": "none"})
    assert sent(core)[-1]["prompt"]["reasoning_effort"] == "none"


async def test_an_evicted_response_is_a_404_like_one_never_stored():
    core = RouterCore(RouterConfig(response_store={"max_responses": 1}), {"m1": FakeClient("m1")})
    client = sdk(core)
    old = await client.responses.create(model="m1", input="one")
    new = await client.responses.create(model="m1", input="two")
    assert (await client.responses.retrieve(new.id)).id == new.id
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="m1", input="more", previous_response_id=old.id)
    assert "evicted" in info.value.body["message"] and len(sent(core)) == 2
