"""Responses and their stream events from the router's events (deployments.responses.builders):
the documented event sequence, numbered; the output items in the order the model wrote them; a
streamed response ends as the same response as a whole one."""

from __future__ import annotations

import json

from deployments.events import (
    Error,
    Finish,
    Logprobs,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from deployments.http.errors import ApiError
from deployments.responses.builders import ResponseEvents, usage
from deployments.responses.protocol import parse
from tests.fakes import USAGE

REQ = parse(json.dumps({"model": "m1", "input": "hi", "metadata": {"k": "v"}}).encode())
THINK_TEXT_CALL = [
    [ReasoningDelta("Let me"), ReasoningDelta(" think.")],
    [TextDelta("Checking.")],
    [ToolCallStart(0, "call_1", "get_weather"), ToolCallArgsDelta(0, '{"city"')],
    [ToolCallArgsDelta(0, ': "Paris"}'), ToolCallEnd(0, {"city": "Paris"}), Logprobs([])],
    [Finish("tool_calls")],
    [Usage(USAGE)],
]


def streamed(batches, req=REQ):
    events = ResponseEvents(req, "resp_1")
    out = events.start()
    for batch in batches:
        out += events.feed(batch)
    return out, events.final


def without_ids(value):
    """A response with its generated ids and times blanked (two runs differ only in those)."""
    if isinstance(value, dict):
        return {k: ("X" if k in ("id", "created_at", "completed_at") else without_ids(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def test_a_text_answer_streams_the_documented_sequence_numbered_from_zero():
    out, final = streamed([[TextDelta("Hel")], [TextDelta("lo")], [Finish("stop")], [Usage(USAGE)]])
    assert [e["type"] for e in out] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert out[0]["response"]["status"] == "in_progress" and out[0]["response"]["output"] == []
    assert out[2]["item"]["content"] == [] and out[3]["part"] == {
        "type": "output_text",
        "text": "",
        "annotations": [],
        "logprobs": [],
    }
    assert "".join(e["delta"] for e in out if e["type"].endswith(".delta")) == "Hello" == out[6]["text"]
    message = final["output"][0]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"][0]["text"] == "Hello" and out[8]["item"] == message
    assert {e["item_id"] for e in out[3:8]} == {message["id"]} and message["id"].startswith("msg_")
    assert final["status"] == "completed" and final["metadata"] == {"k": "v"} and final["completed_at"]
    assert out[-1]["response"] == final


def test_reasoning_text_and_calls_are_items_in_output_order():
    out, final = streamed(THINK_TEXT_CALL)
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    reasoning, _, call = final["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}] and reasoning["summary"] == []
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "get_weather", '{"city": "Paris"}')
    assert call["status"] == "completed" and call["id"].startswith("fc_")
    kinds = [e["type"] for e in out]
    assert kinds.count("response.reasoning_text.delta") == 2 and "response.reasoning_text.done" in kinds
    args = [e["delta"] for e in out if e["type"] == "response.function_call_arguments.delta"]
    assert args == ['{"city"', ': "Paris"}']
    done = next(e for e in out if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == '{"city": "Paris"}' and done["output_index"] == 2
    # every item is added before its events and done once, in order
    added = [e["output_index"] for e in out if e["type"] == "response.output_item.added"]
    finished = [e["output_index"] for e in out if e["type"] == "response.output_item.done"]
    assert added == finished == [0, 1, 2]


def test_a_whole_response_is_the_streamed_one():
    whole = ResponseEvents(REQ, "resp_1").whole([e for batch in THINK_TEXT_CALL for e in batch])
    _, final = streamed(THINK_TEXT_CALL)
    assert without_ids(whole) == without_ids(final)


def test_max_output_tokens_leaves_the_response_incomplete():
    out, final = streamed([[TextDelta("Once upon")], [Finish("length")], [Usage(USAGE)]])
    assert out[-1]["type"] == "response.incomplete"
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete" and final["completed_at"] is None
    cut = ResponseEvents(REQ, "r").whole(
        [
            ToolCallStart(0, "c", "f"),
            ToolCallArgsDelta(0, '{"a": '),
            ToolCallEnd(0, '{"a": '),
            Finish("length"),
            Usage(USAGE),
        ]
    )
    assert cut["output"][0]["status"] == "incomplete" and cut["output"][0]["arguments"] == '{"a": '


def test_a_failed_call_ends_with_error_then_response_failed():
    out, final = streamed([[TextDelta("a")], [Error(ApiError(504, "deadline passed", type="timeout_error"))]])
    assert [e["type"] for e in out[-2:]] == ["error", "response.failed"]
    assert out[-2]["message"] == "deadline passed" and out[-2]["code"] == "timeout_error"
    assert final["status"] == "failed" and final["error"] == {"code": "timeout_error", "message": "deadline passed"}


def test_an_empty_answer_is_one_empty_message():
    final = ResponseEvents(REQ, "r").whole([Finish("stop"), Usage(USAGE)])
    assert [(i["type"], i["content"][0]["text"]) for i in final["output"]] == [("message", "")]


def test_usage_counts_cached_input_and_reasoning_tokens():
    assert usage(USAGE) == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 1, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 6,
    }
    thought = {**USAGE, "completion_tokens_details": {"reasoning_tokens": 2}}
    assert usage(thought)["output_tokens_details"] == {"reasoning_tokens": 2}
