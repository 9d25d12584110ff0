"""The OpenAI response builders on their own: events in, chat / completions bodies and stream
chunks out (text, tool calls, logprobs, usage, errors)."""

from __future__ import annotations

import pytest

from deployments.events import (
    Error,
    Finish,
    Logprobs,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from deployments.http.errors import ApiError
from deployments.openai.builders import ResponseBuilder, chat_logprobs, tool_calls

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def entry(token: str, lp: float) -> dict:
    return {"id": 7, "token": token, "logprob": lp, "top": [[7, token, lp], [8, "x", lp - 1.0]]}


def call(index: int, call_id: str, name: str, arguments_json: str, arguments) -> list:
    return [
        ToolCallStart(index, call_id, name),
        ToolCallArgsDelta(index, arguments_json),
        ToolCallEnd(index, arguments),
    ]


def builder(kind="chat", **kw) -> ResponseBuilder:
    return ResponseBuilder(kind, "m1", "chatcmpl-1" if kind == "chat" else "cmpl-1", **kw)


def test_a_whole_chat_answer():
    body = builder().full([TextDelta("Hello"), Logprobs([]), Finish("stop"), Usage(USAGE)])
    assert body["id"] == "chatcmpl-1" and body["object"] == "chat.completion" and body["model"] == "m1"
    assert isinstance(body["created"], int) and body["system_fingerprint"] is None and body["usage"] == USAGE
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None, "finish_reason": "stop"}
    ]


def test_a_whole_chat_answer_with_tool_calls():
    events = [TextDelta(""), *call(0, "call_1", "f", '{"a": 1}', {"a": 1}), *call(1, "call_2", "g", "{}", {})]
    body = builder(tools=True).full(events + [Finish("tool_calls"), Usage(USAGE)])
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
    }
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    no_calls = [TextDelta(""), Finish("stop"), Usage(USAGE)]
    assert builder(tools=True).full(no_calls)["choices"][0]["message"]["content"] == ""
    assert builder(tools=True, forced_tools=True).full(no_calls)["choices"][0]["message"]["content"] is None


def test_a_whole_completion_with_logprobs_and_text_offsets():
    events = [TextDelta("Hi there"), Logprobs([entry("Hi", -0.1), entry(" there", -0.5)]), Finish("length")]
    body = builder("text", logprobs=True).full(events + [Usage(USAGE)])
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == "Hi there" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": ["Hi", " there"],
        "token_logprobs": [-0.1, -0.5],
        "top_logprobs": [{"Hi": -0.1, "x": -1.1}, {" there": -0.5, "x": -1.5}],
        "text_offset": [0, 2],
    }


def test_chat_logprobs_carry_bytes_and_the_top_alternatives():
    shaped = chat_logprobs([entry("é", -0.25)])
    assert shaped == {
        "content": [
            {
                "token": "é",
                "logprob": -0.25,
                "bytes": [0xC3, 0xA9],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9]},
                    {"token": "x", "logprob": -1.25, "bytes": [0x78]},
                ],
            }
        ],
        "refusal": None,
    }


def test_the_stream_opens_with_the_role_even_when_the_first_text_is_held_back():
    b = builder()
    first = b.chunks([])
    assert len(first) == 1 and first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[0]["object"] == "chat.completion.chunk" and "usage" not in first[0]
    assert b.chunks([]) == []  # later empty batches send nothing
    (text,) = b.chunks([TextDelta("Hi")])
    assert text["choices"][0]["delta"] == {"content": "Hi"} and text["choices"][0]["finish_reason"] is None


def test_a_streamed_call_is_one_item_with_its_index_and_whole_arguments():
    b = builder(tools=True)
    out = b.chunks([TextDelta("Sure."), *call(0, "call_1", "f", '{"a": 1}', {"a": 1})])
    assert [c["choices"][0]["delta"].get("content") for c in out] == ["Sure.", None]
    assert out[1]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    (finish,) = b.chunks([Finish("tool_calls")])
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}


def test_streamed_logprobs_ride_on_the_text_or_else_on_the_call():
    b = builder(tools=True, logprobs=True)
    b.chunks([])
    (text,) = b.chunks([TextDelta("a"), Logprobs([entry("a", -1.0)])])
    assert [c["token"] for c in text["choices"][0]["logprobs"]["content"]] == ["a"]
    (only,) = b.chunks([Logprobs([entry("<", -2.0)]), *call(0, "call_1", "f", "{}", {})])
    assert only["choices"][0]["delta"]["tool_calls"][0]["id"] == "call_1"
    assert only["choices"][0]["logprobs"]["content"][0]["token"] == "<"
    (bare,) = b.chunks([Logprobs([entry("", -3.0)])])  # logprobs alone: a chunk with no text
    assert bare["choices"][0]["delta"] == {"content": ""} and bare["choices"][0]["logprobs"] is not None


def test_the_end_of_a_stream_the_held_back_text_then_the_finish_and_usage_when_asked():
    b = builder("text", include_usage=True)
    b.chunks([TextDelta("a")])
    rest, finish = b.chunks([TextDelta(" b"), Finish("stop")])
    assert rest["choices"][0]["text"] == " b" and rest["usage"] is None
    assert finish["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    (usage,) = b.chunks([Usage(USAGE)])
    assert usage == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": b.created,
        "model": "m1",
        "choices": [],
        "usage": USAGE,
    }
    assert builder("text").chunks([Usage(USAGE)]) == []  # not asked for


def test_an_error_ends_the_stream_as_its_openai_body():
    err = ApiError(504, "too slow", type="timeout_error", code="timeout")
    assert builder().chunks([Error(err)]) == [
        {"error": {"message": "too slow", "type": "timeout_error", "param": None, "code": "timeout"}}
    ]


@pytest.mark.parametrize("pieces", [['{"a": ', "1}"], ['{"a": 1}']])
def test_tool_calls_join_their_argument_deltas(pieces):
    events = [ToolCallStart(0, "c", "f"), *(ToolCallArgsDelta(0, p) for p in pieces), ToolCallEnd(0, {"a": 1})]
    assert tool_calls(events) == [
        {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert tool_calls(events[:-1]) == []  # not ended yet
