"""Reasoning on the OpenAI chat route, driven by the official `openai` SDK over an in-process ASGI
transport with a scripted replica (tests/fakes.py): `reasoning_content` apart from `content`, with
tools in the same request, streamed and not; `chat_template_kwargs` and `reasoning_effort` sent
on to the model (which maps them onto its template, tests/engine/test_chat_format.py)."""

from __future__ import annotations

import httpx
import openai
import pytest

from deployments.config import RouterConfig
from deployments.router import RouterCore, create_app
from tests.fakes import USAGE, FakeClient, chunk

THINKS = {"tools": "hermes", "reasoning": "think", "in_reasoning": False}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# Reasoning that mentions a call (never made), then the real call, split at every 7 characters.
OUTPUT = (
    '<think>\nI could write <tool_call>{"name": "get_weather", "arguments": {}}</tool_call> '
    'but first check.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
HI = [{"role": "user", "content": "Weather in Paris?"}]


def sdk(text: str = OUTPUT, size: int = 7) -> tuple[openai.AsyncOpenAI, FakeClient]:
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    items = [{**chunk(parts[0]), "format": THINKS}] + [chunk(p) for p in parts[1:]] + [chunk("", 1, "stop", USAGE)]
    fake = FakeClient("m1", items)
    core = RouterCore(RouterConfig.model_validate({}), {"m1": fake})
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test")
    return openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=http, max_retries=0), fake


REASONING = 'I could write <tool_call>{"name": "get_weather", "arguments": {}}</tool_call> but first check.'


async def test_reasoning_is_apart_from_content_and_a_call_inside_it_is_not_made_with_tools_in_the_request():
    client, _ = sdk()
    r = await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER])
    message = r.choices[0].message
    assert message.reasoning_content == REASONING
    assert not message.content
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert r.choices[0].finish_reason == "tool_calls"


async def test_streamed_reasoning_deltas_join_to_the_same_reasoning_and_the_call_to_the_same_call():
    client, _ = sdk()
    stream = await client.chat.completions.create(model="m1", messages=HI, tools=[WEATHER], stream=True)
    reasoning, content, args, names = "", "", "", []
    async for c in stream:
        delta = c.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for call in delta.tool_calls or ():
            names += [call.function.name] if call.function.name else []
            args += call.function.arguments or ""
    assert reasoning == REASONING and not content.strip()
    assert names == ["get_weather"] and args == '{"city": "Paris"}'


async def test_a_thinking_answer_without_tools_has_clean_content():
    client, _ = sdk("<think>Simple sum.</think>\n\nIt is 4.", size=3)
    message = (await client.chat.completions.create(model="m1", messages=HI)).choices[0].message
    assert (message.reasoning_content, message.content) == ("Simple sum.", "It is 4.")


async def test_chat_template_kwargs_and_reasoning_effort_reach_the_model_s_prompt():
    client, fake = sdk()
    await client.chat.completions.create(
        model="m1",
        messages=HI,
        reasoning_effort="low",
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    prompt = fake.payloads[0]["prompt"]
    assert prompt["reasoning_effort"] == "low" and prompt["chat_template_kwargs"] == {"enable_thinking": True}


async def test_an_unknown_reasoning_effort_is_a_400_naming_it():
    client, _ = sdk()
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m1", messages=HI, reasoning_effort="max")
    assert err.value.body["param"] == "reasoning_effort"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m1", messages=HI, extra_body={"chat_template_kwargs": [1]})
    assert err.value.body["param"] == "chat_template_kwargs"
