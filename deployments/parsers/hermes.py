"""Hermes tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (NousResearch's
format, Qwen 2.5 / 3's templates; engine/tool_prompt.py prompts it for templates without tools).

A call's start is reported once its name is read, its arguments stream as the model writes them
and it ends at the closing tag. A call that does not read as `{"name": ..., "arguments": ...}` in
that order is decided at its closing tag: a call when its whole body parses, else content.
"""

from __future__ import annotations

import json
import re

from engine.tool_prompt import CALL_CLOSE, CALL_OPEN

from ..events import Event, TextDelta
from .calls import CallEvents, Gaps, parse_arguments, partial_tail
from .json_stream import JsonValueEnd

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class HermesParser:
    """`names`: the request's tool names (a call to another name is content); `forced`: a grammar
    made the output nothing but calls, so a call cut off at the end is dropped, not content."""

    def __init__(self, names: tuple[str, ...], forced: bool = False):
        self.names, self.forced = names, forced
        self.events = CallEvents()
        self.gaps = Gaps()
        self._buffer = ""
        self._state = "text"  # text | head (after the open tag) | args | tail (arguments done)
        self._args = ""
        self._scan: JsonValueEnd | None = None

    @property
    def calls(self) -> int:
        return self.events.count

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        out: list[Event] = []
        while True:
            step = self._STEPS[self._state](self)
            if step is None:
                return self.gaps.drop(out)
            out += step

    def finish(self) -> list[Event]:
        rest, self._buffer = self._buffer, ""
        if self._state == "args" or self._state == "tail":
            return self.events.end(parse_arguments(self._args))  # cut off inside a call
        if self._state == "head" and not self.forced:
            return [TextDelta(CALL_OPEN + rest)]
        if self._state == "text" and rest:
            return self.gaps.drop([TextDelta(rest)])
        return []

    def _text(self) -> list[Event] | None:
        buf = self._buffer
        start = buf.find(CALL_OPEN)
        cut = start if start >= 0 else len(buf) - partial_tail(buf, CALL_OPEN)
        if start < 0 and cut == 0:
            return None
        self._buffer = buf[cut + len(CALL_OPEN) :] if start >= 0 else buf[cut:]
        if start >= 0:
            self._state = "head"
        return [TextDelta(buf[:cut])] if cut else []

    def _head(self) -> list[Event] | None:
        match = _HEAD.match(self._buffer)
        if match is not None and match.end() < len(self._buffer):
            name = json.loads(f'"{match.group(1)}"')
            if name in self.names:
                self._buffer, self._state = self._buffer[match.end() :], "args"
                self._args, self._scan = "", JsonValueEnd()
                return self.events.start(name)
        end = self._buffer.find(CALL_CLOSE)
        if end < 0:
            return None
        body, self._buffer, self._state = self._buffer[:end], self._buffer[end + len(CALL_CLOSE) :], "text"
        return self._whole(body)

    def _args_(self) -> list[Event] | None:
        if not self._buffer:
            return None
        done = self._scan.feed(self._buffer)
        piece = self._buffer if done is None else self._buffer[:done]
        self._args += piece
        self._buffer = self._buffer[len(piece) :]
        if done is not None:
            self._state = "tail"
        return self.events.args(piece)

    def _tail(self) -> list[Event] | None:
        end = self._buffer.find(CALL_CLOSE)
        if end < 0:
            return None
        self._buffer, self._state = self._buffer[end + len(CALL_CLOSE) :], "text"
        return self.events.end(parse_arguments(self._args))

    def _whole(self, body: str) -> list[Event]:
        """A call read at its closing tag: a call when the body is one, else the text as it was."""
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return [TextDelta(CALL_OPEN + body + CALL_CLOSE)]
        return self.events.whole(value["name"], value.get("arguments", value.get("parameters", {})))

    _STEPS = {"text": _text, "head": _head, "args": _args_, "tail": _tail}
