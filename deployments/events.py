"""The router's one event stream: what a model replica sends back, typed, for every API.

A replica streams `hop.Chunk` items (text, logprobs, on the last one the finish reason and usage)
and may end with an error. This module turns them, through the tool-call parser when the request
has tools, into events that each API adapter (OpenAI chat and completions, Anthropic Messages)
renders in its own shape; no adapter reads a chunk dict or another API's shapes.

A streamed response is a sequence of *batches* (lists of events), in this order:
  - one batch per replica chunk: its new content (`TextDelta`, absent while text is held back), its
    `Logprobs`, then each tool call it completed (`ToolCallStart`, `ToolCallArgsDelta`,
    `ToolCallEnd`); a batch may be empty;
  - after the chunk that finished, one batch: the held-back rest of the text, then `Finish`;
  - last, `[Usage]` once the output ended, or `[Error]` when it failed (nothing follows either).
A whole (non-streamed) response is one batch: `TextDelta` (the whole content, maybe empty), all
`Logprobs`, the calls, `Finish`, `Usage`.

A call's arguments arrive as the model produced them: `ToolCallArgsDelta` carries their JSON text,
`ToolCallEnd` the parsed value, so no adapter serializes or parses them again. A finish reason of
"stop" after tool calls is "tool_calls".
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from .hop import Chunk, merge_chunks
from .http.errors import ApiError
from .tool_parser import ParsedCall, ToolCallParser


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Reasoning text apart from the answer (for APIs that show it; no parser emits it yet)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int  # the call's position among the response's calls
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    text: str  # a piece of the arguments' JSON text


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    arguments: Any  # the whole arguments, parsed (the model may write any JSON value)


@dataclass(frozen=True)
class Logprobs:
    entries: list[dict[str, Any]]  # the engine's: {"id", "token", "logprob", "top": [[id, token, logprob]]}


@dataclass(frozen=True)
class Finish:
    reason: str | None  # stop, length, tool_calls, abort...; None: the stream ended without one


@dataclass(frozen=True)
class Usage:
    usage: dict[str, Any] | None  # OpenAI's usage object, as the engine reports it


@dataclass(frozen=True)
class Error:
    error: ApiError


Event = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | Logprobs | Finish | Usage | Error


def call_events(call: ParsedCall, index: int) -> list[Event]:
    """A complete call: its start, its arguments' JSON text in one delta, its end."""
    start = ToolCallStart(index, call.id, call.name)
    return [start, ToolCallArgsDelta(index, call.arguments_json), ToolCallEnd(index, call.arguments)]


def _finish_reason(reason: str | None, parser: ToolCallParser | None) -> str | None:
    return "tool_calls" if parser is not None and parser.calls and reason == "stop" else reason


class OutputEvents:
    """One response's chunks as event batches; `parser` None: all the text is content."""

    def __init__(self, parser: ToolCallParser | None = None):
        self.parser = parser

    def chunk(self, chunk: Chunk) -> list[Event]:
        text, calls = chunk["text"], []
        if self.parser is not None:
            text, calls = self.parser.feed(text)
        out: list[Event] = [TextDelta(text)] if text else []
        if chunk.get("logprobs"):
            out.append(Logprobs(chunk["logprobs"]))
        first = len(self.parser.calls) - len(calls) if self.parser is not None else 0
        for i, call in enumerate(calls):
            out += call_events(call, first + i)
        return out

    def end(self, reason: str | None) -> list[Event]:
        rest = self.parser.finish() if self.parser is not None else ""
        return ([TextDelta(rest)] if rest else []) + [Finish(_finish_reason(reason, self.parser))]


async def stream(chunks: AsyncIterable[Chunk], parser: ToolCallParser | None = None) -> AsyncIterator[list[Event]]:
    """A streamed response's batches; an ApiError from the chunks (the engine failed, the deadline
    passed) is the last batch, `[Error]`."""
    out, usage = OutputEvents(parser), None
    try:
        async for chunk in chunks:
            yield out.chunk(chunk)
            if chunk["finish_reason"] is not None:
                usage = chunk["usage"]
                yield out.end(chunk["finish_reason"])
        yield [Usage(usage)]
    except ApiError as exc:
        yield [Error(exc)]


async def collect(chunks: AsyncIterable[Chunk], parser: ToolCallParser | None = None) -> list[Event]:
    """A whole response as one batch; raises the ApiError that ends the chunks, and a 502 when
    there were none. The parser reads the whole text at once."""
    received = [chunk async for chunk in chunks]
    if not received:
        raise ApiError(502, "the model ended the stream without output", type="server_error")
    whole = merge_chunks(received)
    text, calls = whole["text"], []
    if parser is not None:
        text, calls = parser.feed(text)
        text += parser.finish()
    events: list[Event] = [TextDelta(text), Logprobs(whole.get("logprobs") or [])]
    for i, call in enumerate(calls):
        events += call_events(call, i)
    return events + [Finish(_finish_reason(whole["finish_reason"], parser)), Usage(whole["usage"])]
