"""Reasoning end to end: `serve run tests/fixtures/agents.yaml`'s smollm2-thinking (SmolLM2 given a template that
opens <think> in the prompt and a cap that closes it) and the official `openai` and `anthropic`
clients: reasoning apart from clean content with tools in the same request, streamed and not;
reasoning_effort and chat_template_kwargs; Anthropic thinking blocks and stop_sequence."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from .serving import BASE

pytestmark = pytest.mark.slow

MODEL = "smollm2-thinking"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLAUDE_WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": WEATHER["function"]["parameters"],
}
TAGS = ("<think>", "</think>")


@pytest.fixture(scope="module")
def server(agents_server):
    return agents_server.get()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=240)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=BASE, api_key="unused", max_retries=0, timeout=240)


def test_reasoning_content_is_apart_from_clean_content_with_tools_streamed_or_not(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], max_tokens=60)
    message = r.choices[0].message
    reasoning = message.reasoning_content
    assert reasoning and message.content
    assert not any(t in message.content or t in reasoning for t in TAGS)

    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], max_tokens=60, stream=True)
    streamed_reasoning, streamed_content, pieces = "", "", 0
    for c in stream:
        delta = c.choices[0].delta
        piece = getattr(delta, "reasoning_content", None) or ""
        pieces += bool(piece)
        streamed_reasoning += piece
        streamed_content += delta.content or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    assert pieces > 1  # reasoning streams as it is written


def test_a_forced_call_after_an_opened_think_block_streams_its_arguments_in_pieces(client):
    """The grammar writes the call from the first token, so it is the answer, not reasoning; with
    no stream window the arguments arrive in several deltas, which the SDK's stream helper
    assembles into the non-streamed call."""
    args = dict(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48,
    )
    whole = client.chat.completions.create(**args).choices[0].message
    assert [c.function.name for c in whole.tool_calls] == ["get_weather"]
    assert not getattr(whole, "reasoning_content", None)  # the forced call is the answer
    assert isinstance(json.loads(whole.tool_calls[0].function.arguments)["city"], str)
    pieces = [
        tc.function.arguments
        for c in client.chat.completions.create(**args, stream=True)
        if c.choices
        for tc in c.choices[0].delta.tool_calls or []
        if tc.function.arguments
    ]
    assert len(pieces) >= 2 and "".join(pieces) == whole.tool_calls[0].function.arguments
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion().choices[0].message
    assert [(c.function.name, c.function.arguments) for c in final.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ]


def test_reasoning_effort_none_turns_thinking_off_and_unknown_template_kwargs_are_refused(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, reasoning_effort="none", max_tokens=30)
    assert r.choices[0].message.content and not getattr(r.choices[0].message, "reasoning_content", None)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=5, extra_body={"chat_template_kwargs": {"bogus": 1}}
        )
    assert err.value.body["param"] == "chat_template_kwargs.bogus"


def test_anthropic_thinking_blocks_come_first_created_or_streamed(claude):
    thinking = {"type": "enabled", "budget_tokens": 8}
    kwargs = dict(model=MODEL, max_tokens=60, messages=QUESTION, tools=[CLAUDE_WEATHER], thinking=thinking)
    msg = claude.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking and msg.content[1].text and msg.stop_reason == "end_turn"
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", msg.content[0].thinking),
        ("text", msg.content[1].text),
    ]


def test_anthropic_names_the_stop_sequence_that_ended_the_answer(claude):
    kwargs = dict(model=MODEL, max_tokens=60, messages=QUESTION, tools=[CLAUDE_WEATHER])
    answer = claude.messages.create(**kwargs).content[-1].text
    stop_at = answer.split()[-1]  # the answer's last word
    msg = claude.messages.create(**kwargs, stop_sequences=["zzz", stop_at])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop_at
    assert stop_at not in msg.content[-1].text
