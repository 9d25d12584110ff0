"""Llama 3.x JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}`, optionally
after `<|python_tag|>`, several calls apart by `;` or newlines (Meta's JSON-based tool calling,
the Llama 3.1 / 3.2 / 3.3 templates' "Respond in the format {"name": function name,
"parameters": ...}").

An output is read as calls only when it begins with one (after whitespace or the tag): text that
merely contains JSON, or an object that is not a call of a tool the request offers, is content.
Each call streams as json_call.JsonCall reads it; text after the calls is content.
"""

from __future__ import annotations

from ..events import Event, TextDelta
from .calls import StepParser
from .json_call import JsonCall

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(StepParser):
    state = "start"  # start (before a call: deciding) | call | text (the rest is content)

    def __init__(self, names: tuple[str, ...], forced: bool = False):
        super().__init__(names, forced)
        self.call: JsonCall | None = None
        self.lead = ""  # what a candidate call began with (whitespace, the tag): content if it is none

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self.state == "call":
            out = self.call.finish(self.forced)
            held = self.call.text
        else:
            held = self.buffer if self.state == "text" or not self.forced else None
        if held is not None and self.state != "text":
            held = self.lead + held
        self.buffer = ""
        return self.drop_gaps(out + ([TextDelta(held)] if held else []))

    def _start(self) -> list[Event] | None:
        buf = self.buffer
        body = buf.lstrip(" \t\r\n;" if self.calls else " \t\r\n")
        if body.startswith(PYTHON_TAG):
            self.lead += buf[: len(buf) - len(body)] + PYTHON_TAG
            self.buffer = body[len(PYTHON_TAG) :]
            return []
        if not body or PYTHON_TAG.startswith(body):
            return None
        if body[0] == "{":
            self.lead += buf[: len(buf) - len(body)]
            self.call, self.buffer, self.state = JsonCall(self.events, self.names), body, "call"
            return []
        self.state, self.buffer = "text", (body if self.calls else self.lead + buf)
        self.lead = ""
        return []

    def _call(self) -> list[Event] | None:
        if not self.buffer:
            return None
        text, self.buffer = self.buffer, ""
        out = self.call.feed(text)
        if self.call.done:
            if self.call.text is None:
                self.state, self.buffer = "start", self.call.rest
            else:  # not a call: it, and all that follows, is content
                self.state, self.buffer = "text", self.lead + self.call.text + self.call.rest
            self.lead = ""
        return out

    def _text(self) -> list[Event] | None:
        if not self.buffer:
            return None
        text, self.buffer = self.buffer, ""
        return [TextDelta(text)]
