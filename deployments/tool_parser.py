"""Tool calls parsed out of a model's output, for every API.

The model calls tools as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes tags,
engine/tool_prompt.py), prompted to or forced by a grammar. The parser splits streamed output
into content and calls: text that may be the start of a `<tool_call>` tag is held back until it
is known, a call is reported once its closing tag arrives, and what does not parse as a call
stays content, unchanged. A call's arguments are kept as the parsed JSON value and as the JSON
text OpenAI clients receive (serialized once, here).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from engine.tool_prompt import CALL_CLOSE, CALL_OPEN


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ParsedCall:
    """One complete tool call: `arguments` as the model wrote it (any JSON value), `arguments_json`
    the same as JSON text."""

    id: str
    name: str
    arguments: Any
    arguments_json: str


class ToolCallParser:
    """Splits streamed output into content and tool calls.

    `forced`: a grammar made the output nothing but calls, so an unclosed call at the end is a
    call cut off by max_tokens, not content: it is dropped (the finish reason says "length")."""

    def __init__(self, forced: bool = False):
        self._buffer = ""
        self.forced = forced
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """New content that is safe to show, and the calls completed by this text."""
        self._buffer += text
        content, done = "", []
        while True:
            buf = self._buffer
            start = buf.find(CALL_OPEN)
            if start < 0:
                keep = _partial_tag(buf)
                content, self._buffer = content + buf[: len(buf) - keep], buf[len(buf) - keep :]
                break
            end = buf.find(CALL_CLOSE, start)
            if end < 0:
                content, self._buffer = content + buf[:start], buf[start:]
                break
            call = _call(buf[start + len(CALL_OPEN) : end])
            if call is None:  # not a call after all: the text stays content
                content += buf[: end + len(CALL_CLOSE)]
            else:
                content += buf[:start]
                done.append(call)
                self.calls.append(call)
            self._buffer = buf[end + len(CALL_CLOSE) :]
        if self.calls and not content.strip():
            content = ""  # the newlines between calls
        return content, done

    def finish(self) -> str:
        """The rest, at the end of the output (an unclosed call stays content unless forced)."""
        rest, self._buffer = self._buffer, ""
        if self.forced and rest.lstrip().startswith(CALL_OPEN):
            return ""
        return rest.strip() if self.calls else rest


def _call(body: str) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ParsedCall(new_call_id(), value["name"], arguments, json.dumps(arguments, ensure_ascii=False))


def _partial_tag(text: str) -> int:
    """How many trailing characters of `text` could begin CALL_OPEN."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
