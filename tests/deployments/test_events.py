"""The router's event stream: replica chunks in, typed event batches out (text, logprobs, tool
calls through the parser, finish, usage, errors)."""

from __future__ import annotations

import pytest

from deployments import events
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
from deployments.tool_parser import ToolCallParser
from tests.fakes import USAGE, chunk

CALL = '<tool_call>\n{"name": "f", "arguments": {"city": "Zürich"}}\n</tool_call>'


async def items(*chunks, error: ApiError | None = None):
    for c in chunks:
        yield c
    if error is not None:
        raise error


async def batches(*chunks, parser=None, error=None) -> list[list]:
    return [b async for b in events.stream(items(*chunks, error=error), parser)]


def ids_masked(batch: list) -> list:
    return [ToolCallStart(e.index, "ID", e.name) if isinstance(e, ToolCallStart) else e for e in batch]


async def test_plain_text_streams_one_batch_per_chunk_then_the_finish_and_usage():
    lp = [{"id": 1, "token": "a", "logprob": -1.0, "top": []}]
    out = await batches({**chunk("a"), "logprobs": lp}, chunk(""), chunk("b", 1, "length", USAGE))
    assert out == [
        [TextDelta("a"), Logprobs(lp)],
        [],
        [TextDelta("b")],
        [Finish("length")],
        [Usage(USAGE)],
    ]


async def test_tool_calls_are_parsed_out_of_the_text_with_their_arguments_as_produced():
    text = "Sure. " + CALL + CALL
    out = await batches(
        chunk(text[:10]), chunk(text[10:70]), chunk(text[70:], 1, "stop", USAGE), parser=ToolCallParser()
    )
    flat = [e for b in out for e in ids_masked(b)]
    arguments = '{"city": "Zürich"}'
    assert flat == [
        TextDelta("Sure. "),
        ToolCallStart(0, "ID", "f"),
        ToolCallArgsDelta(0, arguments),
        ToolCallEnd(0, {"city": "Zürich"}),
        ToolCallStart(1, "ID", "f"),
        ToolCallArgsDelta(1, arguments),
        ToolCallEnd(1, {"city": "Zürich"}),
        Finish("tool_calls"),  # "stop" after calls
        Usage(USAGE),
    ]
    starts = [e for e in flat if isinstance(e, ToolCallStart)]
    real = [e for b in out for e in b if isinstance(e, ToolCallStart)]
    assert len(starts) == 2 and real[0].id != real[1].id and real[0].id.startswith("call_")


async def test_held_back_text_comes_out_at_the_end_before_the_finish():
    out = await batches(chunk("a <tool"), chunk("_c", 1, "stop", USAGE), parser=ToolCallParser())
    assert out == [[TextDelta("a ")], [], [TextDelta("<tool_c"), Finish("stop")], [Usage(USAGE)]]


async def test_an_error_is_the_last_batch_and_a_stream_without_finish_still_ends_with_usage():
    err = ApiError(500, "engine died", type="server_error")
    assert await batches(chunk("a"), error=err) == [[TextDelta("a")], [Error(err)]]
    assert await batches(chunk("a")) == [[TextDelta("a")], [Usage(None)]]


async def test_a_whole_response_is_one_batch_parsed_at_once():
    whole = await events.collect(items(chunk("Hi "), chunk(CALL, 1, "stop", USAGE)), ToolCallParser())
    assert ids_masked(whole) == [
        TextDelta("Hi "),
        Logprobs([]),
        ToolCallStart(0, "ID", "f"),
        ToolCallArgsDelta(0, '{"city": "Zürich"}'),
        ToolCallEnd(0, {"city": "Zürich"}),
        Finish("tool_calls"),
        Usage(USAGE),
    ]
    plain = await events.collect(items(chunk("a"), chunk("", 1, "length", USAGE)))
    assert plain == [TextDelta("a"), Logprobs([]), Finish("length"), Usage(USAGE)]


async def test_a_whole_response_raises_the_error_or_502_without_output():
    with pytest.raises(ApiError) as empty:
        await events.collect(items())
    assert empty.value.status_code == 502
    with pytest.raises(ApiError, match="engine died"):
        await events.collect(items(chunk("a"), error=ApiError(500, "engine died")))


def test_a_call_whose_arguments_are_not_an_object_keeps_them_as_written():
    content, calls = ToolCallParser().feed('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>')
    assert content == "" and calls[0].arguments == [1, 2] and calls[0].arguments_json == "[1, 2]"
    (_, args, end) = events.call_events(calls[0], 3)
    assert args == ToolCallArgsDelta(3, "[1, 2]") and end == ToolCallEnd(3, [1, 2])
