"""The Anthropic Messages adapter without a model: translation both ways, the stream's events, and
the routes driven by the official `anthropic` SDK over an in-process ASGI transport with scripted
model clients (tests/fakes.py's FakeClient). The real model: tests/test_serve_agent_apis_e2e.py.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import httpx2
import pytest

from deployments.anthropic.protocol import (
    CountTokensRequest,
    MessageEvents,
    MessagesRequest,
    error_body,
    parse,
    stream_events,
    to_message,
    to_openai,
)
from deployments.config import RouterConfig
from deployments.openai.protocol import ApiError
from deployments.router import RouterCore, create_app
from engine.request import PromptInput
from tests.fakes import USAGE, FakeClient, chunk

HI = [{"role": "user", "content": "hi"}]


def request(**body) -> MessagesRequest:
    return parse(json.dumps({"model": "m1", "max_tokens": 8, "messages": HI, **body}).encode(), MessagesRequest)


def refused(body: dict, cls=MessagesRequest) -> ApiError:
    with pytest.raises(ApiError) as info:
        to_openai(parse(json.dumps(body).encode(), cls))
    assert info.value.status_code == 400
    return info.value


class CountingClient(FakeClient):
    """A FakeClient whose replica also counts tokens: one per character of the messages' text."""

    async def count_tokens(self, prompt, timeout_s, load=False):
        self.payloads.append(prompt)
        return sum(len(m["content"]) for m in prompt.messages)


def make_core(router=None, **clients) -> RouterCore:
    return RouterCore(RouterConfig.model_validate(router or {}), clients or {"m1": CountingClient("m1")})


def sdk(core: RouterCore, api_key: str = "k") -> anthropic.AsyncAnthropic:
    transport = httpx2.ASGITransport(app=create_app(core))
    return anthropic.AsyncAnthropic(
        api_key=api_key,
        base_url="http://test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://test"),
    )


def raw(core: RouterCore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test")


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


def test_tool_use_and_tool_result_become_tool_calls_and_tool_messages():
    tools = [
        {
            "name": "get_weather",
            "description": "Weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        {"name": "now", "input_schema": {"type": "object"}},
    ]
    req = request(
        tools=tools,
        messages=[
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
        ],
    )
    out = to_openai(req)
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
        ({**BASE, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking", "not supported"),
        ({**BASE, "metadata": {"user_id": "u", "session": "s"}}, "metadata.session", "unknown field"),
        ({**BASE, "max_tokens": None}, "max_tokens", "valid integer"),
        ({"model": "m1", "messages": HI}, "max_tokens", "Field required"),
        ({**BASE, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({**BASE, "messages": []}, "messages", "at least 1"),
        ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role", "'user' or 'assistant'"),
        (
            {**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content",
            "'image' content blocks are not supported",
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


# --- OpenAI → Anthropic ----------------------------------------------------------------------


def completion(message: dict, finish: str = "stop", usage: dict = USAGE) -> dict:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1,
        "model": "m1",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": usage,
    }


def test_text_response_with_usage_and_cache_reads():
    msg = to_message(completion({"content": "Hello!"}), "msg_abc")
    assert msg == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "m1",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 2,
            "output_tokens": 3,
            "cache_read_input_tokens": 1,
            "cache_creation_input_tokens": 0,
        },
    }


@pytest.mark.parametrize(
    "finish,reason",
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")],
)
def test_stop_reasons(finish, reason):
    assert to_message(completion({"content": "x"}, finish), "msg_1")["stop_reason"] == reason


WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def test_tool_calls_become_tool_use_blocks_with_parsed_input():
    calls = [WEATHER_CALL, {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}}]
    msg = to_message(completion({"content": None, "tool_calls": calls}, "tool_calls"), "msg_1")
    assert msg["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
    ]
    assert msg["stop_reason"] == "tool_use"
    forced = to_message(completion({"content": None, "tool_calls": calls}, "stop"), "msg_1")  # a named tool_choice
    assert forced["stop_reason"] == "tool_use"
    bad = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]
    with pytest.raises(ApiError) as info:
        to_message(completion({"content": None, "tool_calls": bad}, "tool_calls"), "msg_1")
    assert info.value.status_code == 502


# --- the stream's events -----------------------------------------------------------------------


def oai_chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "model": "m1",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": None,
    }


def usage_chunk(usage: dict | None = USAGE) -> dict:
    return {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "model": "m1", "choices": [], "usage": usage}


def events_of(chunks: list[dict]) -> list[tuple[str, dict]]:
    events = MessageEvents("msg_abc", "m1", 3)
    out = events.start()
    for c in chunks:
        out += events.feed(c)
    for name, data in out:
        assert data["type"] == name
    return out


def test_text_stream_event_sequence():
    out = events_of(
        [
            oai_chunk({"role": "assistant", "content": ""}),
            oai_chunk({"content": "Hel"}),
            oai_chunk({"content": "lo"}),
            oai_chunk({}, "length"),
            usage_chunk(),
        ]
    )
    assert [n for n, _ in out] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = out[0][1]["message"]
    assert start["id"] == "msg_abc" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 3, "output_tokens": 0}
    assert out[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert out[3][1] == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}
    assert out[5][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert out[5][1]["usage"] == {
        "input_tokens": 2,
        "output_tokens": 3,
        "cache_read_input_tokens": 1,
        "cache_creation_input_tokens": 0,
    }


def tool_delta(index: int, id: str | None = None, name: str | None = None, args: str = "") -> dict:
    item = {"index": index, "function": {"arguments": args}}
    if id:
        item.update(id=id, type="function")
        item["function"]["name"] = name
    return {"tool_calls": [item]}


def test_tool_call_stream_event_sequence():
    out = events_of(
        [
            oai_chunk({"role": "assistant", "content": "Let me check."}),
            oai_chunk(tool_delta(0, "call_1", "get_weather")),
            oai_chunk(tool_delta(0, args='{"city": ')),
            oai_chunk(tool_delta(0, args='"Paris"}')),
            oai_chunk(tool_delta(1, "call_2", "now", "{}")),
            oai_chunk({}, "tool_calls"),
            usage_chunk(),
        ]
    )
    names = [n for n, _ in out]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert out[4][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
    }
    partial = [d["delta"]["partial_json"] for n, d in out if n == "content_block_delta" and d["index"] == 1]
    assert json.loads("".join(partial)) == {"city": "Paris"}
    assert out[8][1]["index"] == 2 and out[8][1]["content_block"]["id"] == "call_2"
    assert out[9][1]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    assert out[11][1]["delta"]["stop_reason"] == "tool_use"
    forced = events_of([oai_chunk(tool_delta(0, "call_1", "f", "{}")), oai_chunk({}, "stop"), usage_chunk()])
    assert forced[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_closing_the_sse_body_closes_the_chunks():
    """A client that goes away closes the body; the chunks' own close is what cancels the model call."""
    closed = []

    async def chunks():
        try:
            yield oai_chunk({"content": "a"})
            yield oai_chunk({"content": "b"})
        finally:
            closed.append(True)

    body = stream_events(chunks(), MessageEvents("msg_1", "m1", 3))
    assert (await body.__anext__()).startswith(b"event: message_start\n")
    await body.__anext__()
    await body.aclose()
    assert closed == [True]


def test_an_error_mid_stream_is_an_error_event():
    engine_error = {"error": {"message": "engine died", "type": "server_error", "param": None, "code": None}}
    out = events_of([oai_chunk({"content": "a"}), engine_error])
    assert [n for n, _ in out] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert out[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "engine died"}}


@pytest.mark.parametrize(
    "status,openai_type,expected",
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (404, "invalid_request_error", "not_found_error"),
        (413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_error"),
        (409, "invalid_request_error", "invalid_request_error"),
        (500, "server_error", "api_error"),
        (502, "server_error", "api_error"),
        (503, "server_error", "overloaded_error"),
        (504, "timeout_error", "timeout_error"),
        (None, "overloaded_error", "overloaded_error"),
        (None, "timeout_error", "timeout_error"),
        (None, "server_error", "api_error"),
    ],
)
def test_error_types(status, openai_type, expected):
    body = {"error": {"message": "m", "type": openai_type, "param": None, "code": None}}
    assert error_body(body, status) == {"type": "error", "error": {"type": expected, "message": "m"}}


# --- the routes, through the official SDK ------------------------------------------------------


async def test_sdk_create_and_stream_a_text_answer():
    core = make_core()
    client = sdk(core)
    msg = await client.messages.create(
        model="m1", max_tokens=4, system="Be brief.", messages=HI, stop_sequences=["END"], extra_body={"temperature": 0}
    )
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == "m1"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello!"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (2, 1, 3)
    payload = core.models["m1"].payloads[0]
    assert payload["request_id"] == "chatcmpl-" + msg.id.removeprefix("msg_")
    assert payload["prompt"] == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    }
    assert payload["sampling"] == {"max_tokens": 4, "temperature": 0.0, "stop": ["END"]}

    async with client.messages.stream(model="m1", max_tokens=4, messages=HI) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text == "Hello!"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3 and final.usage.input_tokens == 2

    raw_events = [e async for e in await client.messages.create(model="m1", max_tokens=4, messages=HI, stream=True)]
    assert [e.type for e in raw_events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert raw_events[0].message.usage.input_tokens == 3  # the whole prompt, before the cache read is known


async def test_the_sse_framing_names_each_event():
    async with raw(make_core()) as client:
        r = await client.post("/v1/messages", json={**BASE, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f]
    assert frames[0].startswith("event: message_start\ndata: {")
    assert frames[-1] == 'event: message_stop\ndata: {"type":"message_stop"}'
    for frame in frames:
        name, data = frame.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


class ScriptedCore(RouterCore):
    """A router whose chat path answers with scripted OpenAI bodies (tool calls, before the engine has them)."""

    def __init__(self, completion: dict, chunks: list[dict]):
        super().__init__(RouterConfig.model_validate({}), {"m1": CountingClient("m1")})
        self.completion, self.scripted = completion, chunks
        self.requests = []

    async def start(self, req, kind, start):
        self.requests.append(req)
        return await super().start(req, kind, start)

    async def collect(self, call, builder):
        await call.close()
        return self.completion

    async def chunks(self, call, builder, include_usage):
        await call.close()
        for c in self.scripted:
            yield c


async def test_sdk_reads_tool_use_blocks_created_and_streamed():
    calls = [WEATHER_CALL]
    core = ScriptedCore(
        completion({"content": None, "tool_calls": calls}, "tool_calls"),
        [
            oai_chunk({"role": "assistant", "content": ""}),
            oai_chunk(tool_delta(0, "call_1", "get_weather")),
            oai_chunk(tool_delta(0, args='{"city"')),
            oai_chunk(tool_delta(0, args=': "Paris"}')),
            oai_chunk({}, "tool_calls"),
            usage_chunk(),
        ],
    )
    client = sdk(core)
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    msg = await client.messages.create(
        model="m1", max_tokens=16, messages=HI, tools=tools, tool_choice={"type": "tool", "name": "get_weather"}
    )
    assert core.requests[0].tool_choice.model_dump() == {"type": "function", "function": {"name": "get_weather"}}
    assert core.requests[0].plan.grammar is not None  # the named call is forced
    assert msg.stop_reason == "tool_use" and msg.content[0].type == "tool_use"
    use = msg.content[0]
    assert (use.id, use.name, use.input) == ("call_1", "get_weather", {"city": "Paris"})
    async with client.messages.stream(model="m1", max_tokens=16, messages=HI, tools=tools) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and len(final.content) == 1
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris"}


async def test_sdk_raises_its_typed_errors():
    overloaded = {
        "error": {"message": "queue full", "type": "overloaded_error", "param": None, "code": "overloaded"},
        "status_code": 503,
        "retry_after_s": 2.0,
    }
    invalid = {
        "error": {
            "message": "temperature: too hot",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        },
        "status_code": 400,
        "retry_after_s": None,
    }
    client = sdk(
        make_core(m1=CountingClient("m1"), busy=FakeClient("busy", [overloaded]), hot=FakeClient("hot", [invalid]))
    )
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="m1", max_tokens=4, messages=HI, extra_body={"bogus": 1})
    assert bad.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bogus: unknown field"},
    }
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="nope", max_tokens=4, messages=HI)
    assert missing.value.body["error"]["type"] == "not_found_error" and "m1" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.ServiceUnavailableError) as busy:
        await client.messages.create(model="busy", max_tokens=4, messages=HI)
    assert busy.value.body["error"] == {"type": "overloaded_error", "message": "queue full"}
    assert busy.value.response.headers["retry-after"] == "2"
    with pytest.raises(anthropic.BadRequestError, match="temperature: too hot"):
        await client.messages.create(model="hot", max_tokens=4, messages=HI, stream=True)


async def test_an_engine_failure_mid_stream_raises_in_the_sdk():
    died = {
        "error": {"message": "engine died", "type": "server_error", "param": None, "code": None},
        "status_code": 503,
    }
    client = sdk(make_core(m1=FakeClient("m1", [chunk("Hel"), died])))
    seen = []
    with pytest.raises(anthropic.APIStatusError) as info:
        async for event in await client.messages.create(model="m1", max_tokens=4, messages=HI, stream=True):
            seen.append(event.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    # chunks() yields the OpenAI error body without its status: the type comes from the OpenAI type
    assert info.value.body == {"type": "error", "error": {"type": "api_error", "message": "engine died"}}


async def test_api_key_as_x_api_key_or_bearer_and_the_body_limit():
    core = make_core({"api_key": "secret-key-123", "max_request_body_bytes": 2048})
    with pytest.raises(anthropic.AuthenticationError) as denied:
        await sdk(core, api_key="wrong").messages.create(model="m1", max_tokens=4, messages=HI)
    assert denied.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in denied.value.body["error"]["message"]
    assert (await sdk(core, api_key="secret-key-123").messages.create(model="m1", max_tokens=4, messages=HI)).content
    async with raw(core) as client:
        keyed = await client.post("/v1/messages", json=BASE, headers={"x-api-key": "secret-key-123"})
        wrong = await client.post(
            "/v1/messages/count_tokens", json={"model": "m1", "messages": HI}, headers={"x-api-key": "secret-key-12"}
        )
        none = await client.post("/v1/messages", json=BASE)
        big = await client.post(
            "/v1/messages",
            headers={"x-api-key": "secret-key-123"},
            json={**BASE, "messages": [{"role": "user", "content": "x" * 5000}]},
        )
        junk = await client.post("/v1/messages", content=b"{not json", headers={"x-api-key": "secret-key-123"})
    assert keyed.status_code == 200 and keyed.json()["content"][0]["text"] == "Hello!"
    assert wrong.status_code == 401 and none.status_code == 401
    assert big.status_code == 413 and big.json() == {
        "type": "error",
        "error": {"type": "request_too_large", "message": "the request body is larger than 2048 bytes"},
    }
    assert junk.status_code == 400 and junk.json()["type"] == "error"
    assert "not valid JSON" in junk.json()["error"]["message"]


async def test_count_tokens_through_the_replica():
    core = make_core()
    client = sdk(core)
    counted = await client.messages.count_tokens(model="m1", system="ab", messages=HI)
    assert counted.input_tokens == 4  # CountingClient: one per character of "ab" and "hi"
    assert core.models["m1"].payloads == [
        PromptInput(messages=[{"role": "system", "content": "ab"}, {"role": "user", "content": "hi"}])
    ]
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.count_tokens(model="nope", messages=HI)
    with pytest.raises(anthropic.BadRequestError, match="thinking: not supported"):
        await client.messages.count_tokens(model="m1", messages=HI, thinking={"type": "enabled", "budget_tokens": 1024})


async def test_an_unexpected_failure_is_a_500_in_anthropics_shape():
    class Broken(CountingClient):
        async def count_tokens(self, prompt, timeout_s, load=False):
            raise RuntimeError("bug")

    with pytest.raises(anthropic.InternalServerError) as info:
        await sdk(make_core(m1=Broken("m1"))).messages.count_tokens(model="m1", messages=HI)
    assert info.value.status_code == 500
    assert info.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "internal error: RuntimeError"},
    }


async def test_metrics_count_messages_requests():
    core = make_core()
    client = sdk(core)
    await client.messages.create(model="m1", max_tokens=4, messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model="m1", max_tokens=4, messages=HI, extra_body={"bogus": 1})
    text = core.metrics.render().decode()
    assert 'orchard_requests_total{endpoint="messages",model="m1",status="200"} 1.0' in text
    assert 'orchard_requests_total{endpoint="messages",model="-",status="400"} 1.0' in text
    assert 'orchard_completion_tokens_total{model="m1"} 3.0' in text
