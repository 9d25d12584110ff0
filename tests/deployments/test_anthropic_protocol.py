"""The Anthropic Messages requests without a model: parsing (every problem a 400 naming its field)
and the translation into the chat request the prompt is built from."""

from __future__ import annotations

import json

import pytest

from deployments.anthropic.protocol import CountTokensRequest, MessagesRequest, parse, to_openai
from deployments.http.errors import ApiError

HI = [{"role": "user", "content": "hi"}]


def request(**body) -> MessagesRequest:
    return parse(json.dumps({"model": "m1", "max_tokens": 8, "messages": HI, **body}).encode(), MessagesRequest)


def refused(body: dict, cls=MessagesRequest) -> ApiError:
    with pytest.raises(ApiError) as info:
        to_openai(parse(json.dumps(body).encode(), cls))
    assert info.value.status_code == 400
    return info.value


# --- Anthropic → OpenAI ----------------------------------------------------------------------


def test_text_request_with_system_turns_and_sampling():
    req = request(
        system="Be brief.",
        stop_sequences=["\n\n"],
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-1"},
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "how "}, {"type": "text", "text": "are you"}]},
        ],
    )
    assert to_openai(req) == {
        "model": "m1",
        "max_tokens": 8,
        "stop": ["\n\n"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": [{"type": "text", "text": "how "}, {"type": "text", "text": "are you"}]},
        ],
    }


def test_system_blocks_cache_control_and_stream_options():
    req = request(
        system=[{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
        stream=True,
        cache_control={"type": "ephemeral", "ttl": "1h"},
    )
    out = to_openai(req)
    assert out["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
    }
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}


TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {"name": "now", "input_schema": {"type": "object"}},
]
TOOL_ROUND = [
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "clock broken", "is_error": True},
            {"type": "text", "text": "Thanks"},
        ],
    },
]


def test_tool_use_and_tool_result_become_tool_calls_and_tool_messages():
    tools = TOOLS
    out = to_openai(request(tools=tools, messages=TOOL_ROUND))
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": tools[0]["input_schema"],
            },
        },
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}},
    ]
    assert "tool_choice" not in out and "parallel_tool_calls" not in out
    assert out["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Checking."}],
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "toolu_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ],
    }
    assert out["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: clock broken"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]


def test_response_blocks_sent_back_by_the_sdk_are_accepted():
    """The SDK sends a response's text blocks back with "citations": null."""
    out = to_openai(
        request(
            messages=[*HI, {"role": "assistant", "content": [{"type": "text", "text": "a", "citations": None}]}, *HI]
        )
    )
    assert out["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "a"}]}


def test_tool_only_turns_have_no_empty_messages():
    out = to_openai(
        request(
            messages=[
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1]}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
            ]
        )
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"a": [1]}'}}],
    }
    assert out["messages"][2:] == [{"role": "tool", "tool_call_id": "t", "content": ""}]


TOOL = [{"name": "f", "input_schema": {"type": "object"}}]


@pytest.mark.parametrize(
    "choice,expected",
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
        ({"type": "any", "disable_parallel_tool_use": True}, {"tool_choice": "required", "parallel_tool_calls": False}),
        ({"type": "auto", "disable_parallel_tool_use": False}, {"tool_choice": "auto"}),
    ],
)
def test_tool_choice_mapping(choice, expected):
    out = to_openai(request(tools=TOOL, tool_choice=choice))
    assert {k: out[k] for k in ("tool_choice", "parallel_tool_calls") if k in out} == expected


@pytest.mark.parametrize(
    "choice,needle",
    [
        ({"type": "tool"}, "tool_choice.name: required"),
        ({"type": "tool", "name": "g"}, "tool_choice.name: no tool named 'g'"),
        ({"type": "auto", "name": "f"}, "tool_choice.name: only for"),
        ({"type": "sometimes"}, "tool_choice.type"),
    ],
)
def test_bad_tool_choice_names_the_field(choice, needle):
    err = refused({"model": "m1", "max_tokens": 8, "messages": HI, "tools": TOOL, "tool_choice": choice})
    assert needle in err.body["error"]["message"] and err.body["error"]["param"].startswith("tool_choice")


BASE = {"model": "m1", "max_tokens": 8, "messages": HI}


@pytest.mark.parametrize(
    "body,param,needle",
    [
        ({**BASE, "bogus": 1}, "bogus", "unknown field"),
        ({**BASE, "thinking": {"type": "enabled", "budget_tokens": 8}}, "thinking.budget_tokens", "less than max"),
        ({**BASE, "thinking": {"type": "enabled"}}, "thinking", "budget_tokens: required"),
        ({**BASE, "thinking": {"type": "adaptive"}}, "thinking.type", "'enabled' or 'disabled'"),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]},
            "messages.0.content.0",
            "thinking blocks belong in assistant turns",
        ),
        ({**BASE, "metadata": {"user_id": "u", "session": "s"}}, "metadata.session", "unknown field"),
        ({**BASE, "max_tokens": None}, "max_tokens", "valid integer"),
        ({"model": "m1", "messages": HI}, "max_tokens", "Field required"),
        ({**BASE, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({**BASE, "messages": []}, "messages", "at least 1"),
        ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role", "'user' or 'assistant'"),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
            "messages.0.content.0.source",
            "does not match any of the expected tags",
        ),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.0.content",
            "'document' content blocks are not supported",
        ),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}]},
            "messages.0.content",
            "block 1: unknown content block type 'video'",
        ),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "citations": [{}]}]}]},
            "messages.0.content.0.citations",
            "not supported",
        ),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}]},
            "messages.0.content.0.input",
            "Field required",
        ),
        (
            {
                **BASE,
                "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}],
            },
            "messages.0.content.0",
            "tool_use blocks belong in assistant turns",
        ),
        (
            {
                **BASE,
                "messages": [*HI, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}, *HI],
            },
            "messages.1.content.0",
            "tool_result blocks belong in user turns",
        ),
        (
            {
                **BASE,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}
                        ],
                    }
                ],
            },
            "messages.0.content.0.content",
            "'image' content blocks are not supported",
        ),
        ({**BASE, "messages": [*HI, {"role": "assistant", "content": "Sure, "}]}, "messages", "prefill"),
        ({**BASE, "system": [{"type": "image", "source": {}}]}, "system", "not supported"),
        ({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0", "server tools"),
        ({**BASE, "tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools.0.input_schema", '"object"'),
        ({**BASE, "tools": [{"name": "bad name", "input_schema": {"type": "object"}}]}, "tools.0.name", "pattern"),
        ({**BASE, "temperature": "hot"}, "temperature", "valid number"),
    ],
)
def test_unknown_and_unsupported_fields_are_400_naming_the_field(body, param, needle):
    err = refused(body)
    assert err.body["error"]["param"] == param
    assert err.body["error"]["message"].startswith(f"{param}: ") and needle in err.body["error"]["message"]


def test_count_tokens_body_is_the_conversation_only():
    out = to_openai(parse(json.dumps({"model": "m1", "messages": HI, "system": "s"}).encode(), CountTokensRequest))
    assert out == {
        "model": "m1",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "s"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
    }
    err = refused({"model": "m1", "messages": HI, "max_tokens": 3}, CountTokensRequest)
    assert err.body["error"]["param"] == "max_tokens"
