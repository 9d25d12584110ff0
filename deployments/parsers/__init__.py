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

from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.chat_format import OutputFormat

from ..events import Event, TextDelta
from .deepseek_v3 import DeepSeekV3Parser
from .harmony import HarmonyParser
from .hermes import HermesParser
from .llama3_json import Llama3JsonParser
from .mistral import MistralParser
from .pythonic import PythonicParser
from .qwen3_coder import Qwen3CoderParser
from .reasoning import TagReasoning


@dataclass(frozen=True)
class Parsing:
    """What one request asks of the parser: `tools` the names it may call (None: no tool
    calls are parsed), `forced` a grammar made the output nothing but calls, `schemas` each
    tool's parameters schema by name (formats whose arguments are not JSON read their types
    from it: qwen3_coder)."""

    tools: tuple[str, ...] | None = None
    forced: bool = False
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)


class ToolParser(Protocol):
    calls: int  # calls started so far

    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


class ReasoningParser(Protocol):
    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


TOOL_PARSERS: dict[str, type] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "qwen3_coder": Qwen3CoderParser,
    "pythonic": PythonicParser,
    "deepseek_v3": DeepSeekV3Parser,
    "harmony": HarmonyParser,
}
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
    if "harmony" in (fmt.tools, fmt.reasoning):  # one format for both: its parser alone
        return OutputParser(None, HarmonyParser(parsing.tools or (), parsing.forced, fmt.in_reasoning))
    reasoning = REASONING_PARSERS[fmt.reasoning](fmt.reasoning, fmt.in_reasoning) if fmt.reasoning else None
    tools = make_tool_parser(fmt.tools, parsing) if parsing.tools is not None else None
    if reasoning is None and tools is None:
        return None
    return OutputParser(reasoning, tools)


def make_tool_parser(tool_format: str, parsing: Parsing) -> ToolParser:
    """The tool-call parser of a format for one request's tools."""
    if tool_format == "qwen3_coder":
        return Qwen3CoderParser(parsing.tools, parsing.forced, parsing.schemas)
    return TOOL_PARSERS[tool_format](parsing.tools, parsing.forced)
