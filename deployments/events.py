"""The router's one event stream: what a model replica sends back, typed, for every API.

A replica streams `hop.Chunk` items; deployments.output turns them, through the request's output
parser (deployments.parsers: reasoning, tool calls), into these events, which each API adapter
(OpenAI chat and completions, Responses, Anthropic Messages) renders in its own shape; no adapter
reads a chunk dict or another API's shapes.

A streamed response is a sequence of *batches* (lists of events), in this order:
  - one batch per replica chunk: its text as the parser split it, in output order (`TextDelta`,
    `ReasoningDelta`, and for each call `ToolCallStart`, `ToolCallArgsDelta`..., `ToolCallEnd`;
    text that may still become a tag is held back), then its `Logprobs`; a batch may be empty;
  - after the chunk that finished, one batch: the held-back rest, then `Finish`;
  - last, `[Usage]` once the output ended, or `[Error]` when it failed (nothing follows either).
A whole (non-streamed) response is one batch with the same events, then `Finish`, `Usage`.

A call's arguments arrive as the model writes them: the `ToolCallArgsDelta` texts of one call join
to its arguments' JSON text, `ToolCallEnd` carries the parsed value, so no adapter serializes or
parses them again. A finish reason of "stop" after tool calls is "tool_calls".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .http.errors import ApiError


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Reasoning text, apart from the answer."""

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
    stop_sequence: str | None = None  # the stop string that ended the output (reason "stop"), if one did


@dataclass(frozen=True)
class Usage:
    usage: dict[str, Any] | None  # OpenAI's usage object, as the engine reports it


@dataclass(frozen=True)
class Error:
    error: ApiError


Event = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | Logprobs | Finish | Usage | Error
