"""The router's side of tools, response_format and logprobs, in-process with scripted model output,
through the official openai client (ASGI transport). The real model does this in
tests/e2e/test_serve_agent_apis_e2e.py."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from deployments.config import RouterConfig
from deployments.events import TextDelta
from deployments.parsers.hermes import HermesParser
from deployments.router import RouterCore, create_app
from tests.fakes import USAGE, FakeClient, chunk

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HI = [{"role": "user", "content": "Weather in Paris?"}]


def sdk(*items) -> tuple[openai.AsyncOpenAI, FakeClient]:
    fake = FakeClient("m1", list(items))
    core = RouterCore(RouterConfig.model_validate({}), {"m1": fake})
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test")
    return openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=http, max_retries=0), fake


def pieces(text: str, size: int = 5) -> list[dict]:
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return [chunk(p, 1) for p in parts[:-1]] + [chunk(parts[-1], 1, "stop", USAGE)]


async def test_a_required_call_is_forced_by_a_grammar_and_returned_as_tool_calls():
    client, fake = sdk(*pieces(CALL_TEXT))
    r = await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER], tool_choice="required")
    sampling, prompt = fake.payloads[0]["sampling"], fake.payloads[0]["prompt"]
    forced = {"tools": [{"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}], "parallel": True}
    assert sampling["guided"] == {"tool_calls": forced} and prompt["tools"] == [
        WEATHER
    ]  # the replica builds the grammar
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def cut_off(text: str, size: int = 5) -> list[dict]:
    """`text` streamed in pieces, ended by max_tokens."""
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return [chunk(p, 1) for p in parts[:-1]] + [chunk(parts[-1], 1, "length", USAGE)]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_forced_call_cut_off_by_max_tokens_is_dropped_not_shown_as_content(stream):
    text = CALL_TEXT + "\n" + CALL_TEXT[:30]  # a second call, cut off mid-arguments
    client, _ = sdk(*cut_off(text))
    r = await client.chat.completions.create(
        model="m1", messages=HI, tools=[WEATHER], tool_choice="required", stream=stream
    )
    if not stream:
        choice = r.choices[0]
        assert choice.finish_reason == "length" and choice.message.content is None
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        return
    content, names, finish = "", [], None
    async for c in r:
        content += c.choices[0].delta.content or ""
        names += [tc.function.name for tc in c.choices[0].delta.tool_calls or [] if tc.function.name]
        finish = c.choices[0].finish_reason or finish
    assert (content, names, finish) == ("", ["get_weather"], "length")


async def test_an_unforced_unclosed_call_stays_content():
    client, _ = sdk(*cut_off("Sure. " + CALL_TEXT[:30]))
    r = await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER])
    assert r.choices[0].message.content == "Sure. " + CALL_TEXT[:30] and not r.choices[0].message.tool_calls


async def test_streamed_tool_calls_assemble_to_the_non_streamed_call():
    text = "Let me check.\n" + CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Rome")
    client, _ = sdk(*pieces(text, 4))
    whole = (await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER])).choices[0]
    client, _ = sdk(*pieces(text, 4))
    stream = await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER], stream=True)
    content, calls, finish = "", {}, None
    async for c in stream:
        delta = c.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert content.strip() == whole.message.content.strip() == "Let me check."
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]
    assert [json.loads(calls[i]["arguments"])["city"] for i in sorted(calls)] == ["Paris", "Rome"]


async def test_auto_without_a_call_is_plain_content_and_none_leaves_the_tools_out():
    client, fake = sdk(*pieces("It is sunny <b>today</b>."))
    r = await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny <b>today</b>." and not r.choices[0].message.tool_calls
    assert "guided" not in fake.payloads[0]["sampling"]  # auto: the model decides, nothing is forced
    client, fake = sdk(*pieces("Sunny."))
    await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER], tool_choice="none")
    assert "tools" not in fake.payloads[0]["prompt"]


async def test_a_tool_round_trip_sends_the_calls_and_results_in_the_history():
    client, fake = sdk(*pieces("It is 21 C in Paris."))
    history = HI + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    r = await client.chat.completions.create(model="m1", messages=history, tools=[WEATHER])
    assert r.choices[0].message.content == "It is 21 C in Paris."
    sent = fake.payloads[0]["prompt"]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather" and sent[2]["tool_call_id"] == "call_1"


async def test_response_format_becomes_a_guided_spec():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client, fake = sdk(*pieces('{"a": 1}'))
    await client.chat.completions.create(
        model="m1",
        messages=HI,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}},
    )
    assert fake.payloads[0]["sampling"]["guided"] == {"json_schema": schema}
    client, fake = sdk(*pieces("{}"))
    await client.completions.create(model="m1", prompt="JSON:", extra_body={"response_format": {"type": "json_object"}})
    assert fake.payloads[0]["sampling"]["guided"] == {"json_object": True}


def entry(token: str, lp: float) -> dict:
    return {"id": 1, "token": token, "logprob": lp, "top": [[1, token, lp], [2, "x", lp - 1.0]]}


async def test_logprobs_in_the_chat_and_completions_shapes():
    items = [
        {**chunk("Hi", 1), "logprobs": [entry("Hi", -0.1)]},
        {**chunk(" there", 1, "stop", USAGE), "logprobs": [entry(" there", -0.5)]},
    ]
    client, fake = sdk(*items)
    r = await client.chat.completions.create(model="m1", messages=HI, logprobs=True, top_logprobs=2)
    assert fake.payloads[0]["sampling"]["logprobs"] is True and fake.payloads[0]["sampling"]["top_logprobs"] == 2
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hi", " there"] and content[1].logprob == -0.5
    assert [t.token for t in content[0].top_logprobs] == ["Hi", "x"] and content[0].bytes == list(b"Hi")
    client, _ = sdk(*items)
    r = await client.completions.create(model="m1", prompt="Say hi", logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["Hi", " there"] and lp.token_logprobs == [-0.1, -0.5] and lp.text_offset == [0, 2]
    assert lp.top_logprobs[0] == {"Hi": -0.1, "x": -1.1}
    client, _ = sdk(*items)
    stream = await client.chat.completions.create(model="m1", messages=HI, logprobs=True, stream=True)
    streamed = [
        t.token async for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert streamed == ["Hi", " there"]


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
async def test_bad_tool_and_format_fields_are_400s_naming_the_field(fields, param):
    client, fake = sdk(*pieces("x"))
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m1", messages=HI, **fields)
    assert err.value.body["param"] == param, err.value.body
    assert not fake.payloads  # nothing reached the model


def test_the_parser_keeps_text_that_only_looks_like_a_call():
    p = HermesParser(("f",))
    events = [e for t in ["a <tool", "_call>not json</tool_call> b <to"] for e in p.feed(t)] + p.finish()
    assert all(isinstance(e, TextDelta) for e in events)
    shown = "".join(e.text for e in events)
    assert shown == "a <tool_call>not json</tool_call> b <to" and not p.calls


FAMILY_CALLS = {  # two calls in each family's syntax, as the replica would stream them
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "get_weather", "parameters": {"city": "Rome"}}',
    "mistral": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
    "qwen3_coder": "".join(
        f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{c}\n</parameter>\n</function>\n</tool_call>\n"
        for c in ("Paris", "Rome")
    ),
    "pythonic": '[get_weather(city="Paris"), get_weather(city="Rome")]',
    "deepseek_v3": "<｜tool▁calls▁begin｜>"
    + "".join(
        f'<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{{"city": "{c}"}}<｜tool▁call▁end｜>' for c in ("Paris", "Rome")
    )
    + "<｜tool▁calls▁end｜>",
    "harmony": "<|channel|>analysis<|message|>Two cities.<|end|>"
    + "".join(
        f'<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{{"city": "{c}"}}<|call|>'
        for c in ("Paris", "Rome")
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CALLS))
async def test_each_familys_calls_stream_to_the_same_calls_as_the_whole_response(family):
    """The replica names the format on its first chunk; the SDK's accumulated stream gives the
    non-streamed calls."""

    def items():
        out = pieces(FAMILY_CALLS[family], 3)
        out[0] = {**out[0], "format": {"tools": family, "reasoning": "harmony" if family == "harmony" else None}}
        return out

    client, _ = sdk(*items())
    whole = (await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER])).choices[0]
    client, _ = sdk(*items())
    stream = await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER], stream=True)
    calls, content = {}, ""
    async for c in stream:
        content += c.choices[0].delta.content or ""
        for tc in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
    assert content == "" and whole.message.content is None and whole.finish_reason == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]
    assert [json.loads(calls[i]["arguments"]) for i in sorted(calls)] == [{"city": "Paris"}, {"city": "Rome"}]
