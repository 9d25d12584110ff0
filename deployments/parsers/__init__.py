"""Output parsers: a model's text split into answer, reasoning and tool calls, as events.

The replica says how a request's output is written (`engine.chat_format.OutputFormat`, on its
first chunk); the API adapter says what the request asks for (`Parsing`); `make_parser` combines
the two. A parser turns text, fed as it streams, into `TextDelta`, `ReasoningDelta` and
`ToolCallStart` / `ToolCallArgsDelta` / `ToolCallEnd` events (deployments.events):
  - reasoning first: text inside the reasoning block never reaches the tool-call parser, so a
    call written while thinking is never made;
  - a call's arguments stream as the model writes them (their deltas join to the arguments'
    JSON text), and text that only looks like a call stays content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from engine.chat_format import OutputFormat

from ..events import Event, TextDelta
from .hermes import HermesParser
from .reasoning import TagReasoning


@dataclass(frozen=True)
class Parsing:
    """What one request asks of the parser: `tools` the names it may call (None: no tool
    calls are parsed), `forced` a grammar made the output nothing but calls."""

    tools: tuple[str, ...] | None = None
    forced: bool = False


class ToolParser(Protocol):
    calls: int  # calls started so far

    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


class ReasoningParser(Protocol):
    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


TOOL_PARSERS: dict[str, type] = {"hermes": HermesParser}
REASONING_PARSERS: dict[str, type] = {"think": TagReasoning, "mistral": TagReasoning}


class OutputParser:
    """Reasoning, then tool calls in what is left (either may be absent)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None):
        self.reasoning, self.tools = reasoning, tools

    @property
    def calls(self) -> int:
        return self.tools.calls if self.tools is not None else 0

    def feed(self, text: str) -> list[Event]:
        return self._calls(self.reasoning.feed(text) if self.reasoning is not None else [TextDelta(text)])

    def finish(self) -> list[Event]:
        out = self._calls(self.reasoning.finish()) if self.reasoning is not None else []
        return out + (self.tools.finish() if self.tools is not None else [])

    def _calls(self, events: list[Event]) -> list[Event]:
        if self.tools is None:
            return [e for e in events if not isinstance(e, TextDelta) or e.text]
        out: list[Event] = []
        for e in events:
            out += self.tools.feed(e.text) if isinstance(e, TextDelta) else [e]
        return out


def make_parser(fmt: OutputFormat, parsing: Parsing | None) -> OutputParser | None:
    """The parser of one request's output; None: the output is all content (no parsing asked
    for, or nothing to parse)."""
    if parsing is None:
        return None
    # a format whose reasoning its tool parser splits itself (GPT-OSS harmony) has no entry here
    kind = REASONING_PARSERS.get(fmt.reasoning or "")
    reasoning = kind(fmt.reasoning, fmt.in_reasoning) if kind is not None else None
    tools = TOOL_PARSERS[fmt.tools](parsing.tools, parsing.forced) if parsing.tools is not None else None
    if reasoning is None and tools is None:
        return None
    return OutputParser(reasoning, tools)
