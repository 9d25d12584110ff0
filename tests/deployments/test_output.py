"""The router's event stream (deployments.output): replica chunks in, typed event batches out (text,
logprobs, reasoning and tool calls through the parser the first chunk's format names, finish,
usage, errors)."""

from __future__ import annotations

import pytest

from deployments import output
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
from deployments.parsers import Parsing
from tests.fakes import USAGE, chunk

CALL = '<tool_call>\n{"name": "f", "arguments": {"city": "Zürich"}}\n</tool_call>'


async def items(*chunks, error: ApiError | None = None):
    for c in chunks:
        yield c
    if error is not None:
        raise error


TOOLS = Parsing(tools=("f",))


async def batches(*chunks, parsing=None, error=None) -> list[list]:
    return [b async for b in output.stream(items(*chunks, error=error), parsing)]


def joined(flat: list) -> list:
    """Adjacent argument deltas of one call as one (how they were split depends on the chunks)."""
    out = []
    for e in flat:
        if out and isinstance(e, ToolCallArgsDelta) and isinstance(out[-1], ToolCallArgsDelta):
            out[-1] = ToolCallArgsDelta(e.index, out[-1].text + e.text)
        else:
            out.append(e)
    return out


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
    pieces = [chunk(text[i : i + 7]) for i in range(0, len(text), 7)]
    out = await batches(*pieces, chunk("", 1, "stop", USAGE), parsing=TOOLS)
    assert sum(isinstance(e, ToolCallArgsDelta) for b in out for e in b) > 2  # streamed in pieces
    flat = joined([e for b in out for e in ids_masked(b)])
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
    out = await batches(chunk("a <tool"), chunk("_c", 1, "stop", USAGE), parsing=TOOLS)
    assert out == [[TextDelta("a ")], [], [TextDelta("<tool_c"), Finish("stop")], [Usage(USAGE)]]


async def test_an_error_is_the_last_batch_and_a_stream_without_finish_still_ends_with_usage():
    err = ApiError(500, "engine died", type="server_error")
    assert await batches(chunk("a"), error=err) == [[TextDelta("a")], [Error(err)]]
    assert await batches(chunk("a")) == [[TextDelta("a")], [Usage(None)]]


async def test_a_whole_response_is_one_batch_parsed_at_once():
    whole = await output.collect(items(chunk("Hi "), chunk(CALL, 1, "stop", USAGE)), TOOLS)
    assert ids_masked(whole) == [
        TextDelta("Hi "),
        ToolCallStart(0, "ID", "f"),
        ToolCallArgsDelta(0, '{"city": "Zürich"}'),
        ToolCallEnd(0, {"city": "Zürich"}),
        Logprobs([]),
        Finish("tool_calls"),
        Usage(USAGE),
    ]
    plain = await output.collect(items(chunk("a"), chunk("", 1, "length", USAGE)))
    assert plain == [TextDelta("a"), Logprobs([]), Finish("length"), Usage(USAGE)]


async def test_a_whole_response_raises_the_error_or_502_without_output():
    with pytest.raises(ApiError) as empty:
        await output.collect(items())
    assert empty.value.status_code == 502
    with pytest.raises(ApiError, match="engine died"):
        await output.collect(items(chunk("a"), error=ApiError(500, "engine died")))


async def test_the_first_chunk_s_format_splits_reasoning_from_content_and_calls_inside_it_are_not_made():
    fmt = {"tools": "hermes", "reasoning": "think", "in_reasoning": False}
    text = "<think>maybe " + CALL + "</think>\n\nAnswer. " + CALL
    first = {**chunk(text[:20]), "format": fmt}
    out = await batches(first, chunk(text[20:], 1, "stop", USAGE), parsing=TOOLS)
    flat = joined([e for b in out for e in ids_masked(b)])
    thought = "".join(e.text for e in flat if isinstance(e, ReasoningDelta))
    assert thought == "maybe " + CALL
    assert [e for e in flat if not isinstance(e, ReasoningDelta)] == [
        TextDelta("Answer. "),
        ToolCallStart(0, "ID", "f"),
        ToolCallArgsDelta(0, '{"city": "Zürich"}'),
        ToolCallEnd(0, {"city": "Zürich"}),
        Finish("tool_calls"),
        Usage(USAGE),
    ]


async def test_a_prompt_that_opened_the_reasoning_block_makes_the_output_start_inside_it():
    fmt = {"tools": "hermes", "reasoning": "think", "in_reasoning": True}
    whole = await output.collect(
        items({**chunk("hmm</think>Yes."), "format": fmt}, chunk("", 1, "stop", USAGE)), Parsing()
    )
    assert whole[:2] == [ReasoningDelta("hmm"), TextDelta("Yes.")]
    as_text = await output.collect(
        items({**chunk("hmm</think>Yes."), "format": fmt}, chunk("", 1, "stop", USAGE)), None
    )
    assert as_text[0] == TextDelta("hmm</think>Yes.")  # no parsing asked for (completions): all content


async def test_the_stop_string_that_ended_the_output_is_on_the_finish_streamed_or_whole():
    last = {**chunk("", 1, "stop", USAGE), "stop_sequence": "END"}
    out = await batches(chunk("a"), last)
    assert Finish("stop", "END") in [e for b in out for e in b]
    whole = await output.collect(items(chunk("a"), last))
    assert Finish("stop", "END") in whole
