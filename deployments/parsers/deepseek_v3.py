"""DeepSeek V3 / R1 tool calls, between `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>` (the bars
are U+FF5C, the spaces U+2581), one `<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>` per call:
  V3, R1         `function<｜tool▁sep｜>NAME` newline, then the arguments in a ```json fence
  V3.1, R1-0528  `NAME<｜tool▁sep｜>` then the arguments' JSON

A call starts once its name is read, its arguments stream until their JSON value ends, and what
follows them (the fence's close) up to its end tag is skipped. A call of a tool the request does
not offer, or a block in neither shape, is content as written; text before the block is content.
"""

from __future__ import annotations

import re

from ..events import Event, TextDelta
from .calls import StepParser, parse_arguments, partial_tail
from .json_stream import JsonText

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_V3 = re.compile(r"\s*function" + SEP + r"([^\n]+)\n\s*```(?:json)?[ \t]*\n")
_V31 = re.compile(r"\s*([^\s<｜]+)" + SEP)


class DeepSeekV3Parser(StepParser):
    state = "text"  # text | calls (between calls) | head | args | tail (to the call's end) | other

    def __init__(self, names: tuple[str, ...], forced: bool = False):
        super().__init__(names, forced)
        self.args = JsonText()
        self.shown = True  # the block's opening tag is shown (as content) or was a call's

    def finish(self) -> list[Event]:
        rest, self.buffer = self.buffer, ""
        out: list[Event] = []
        if self.state in ("args", "tail"):
            out = self.events.end(parse_arguments(self.args.text))
        elif self.state in ("head", "other") and not self.forced:
            out = [TextDelta(self._opening() + CALL_BEGIN + rest)]
        elif self.state == "text" and rest:
            out = [TextDelta(rest)]
        return self.drop_gaps(out)

    def _text(self) -> list[Event] | None:
        out, tag = self.text_until(CALLS_BEGIN)
        if tag is not None:
            self.state, self.shown = "calls", False
            return out
        return out or None

    def _calls(self) -> list[Event] | None:
        body = self.buffer.lstrip()
        for tag, state in ((CALL_BEGIN, "head"), (CALLS_END, "text")):
            if body.startswith(tag):
                self.buffer, self.state = body[len(tag) :], state
                return [TextDelta(CALLS_END)] if tag == CALLS_END and self.shown is None else []
        if not body or partial_tail(body, CALL_BEGIN) == len(body) or partial_tail(body, CALLS_END) == len(body):
            return None
        self.state = "text"  # not a call: content
        opening = self._opening()
        return [TextDelta(opening)] if opening else []

    def _head(self) -> list[Event] | None:
        body = self.buffer.lstrip()
        typed = body.startswith("function" + SEP)  # V3's type, or V3.1's tool named `function`
        after = body[len("function" + SEP) :].lstrip() if typed else ""
        if typed and not after:
            return None
        match = _V3.match(self.buffer) if typed and after[0] != "{" else _V31.match(self.buffer)
        if match is not None and match.group(1).strip() in self.names:
            self.buffer, self.state, self.args, self.shown = self.buffer[match.end() :], "args", JsonText(), True
            return self.events.start(match.group(1).strip())
        if match is not None or CALL_END in self.buffer:
            self.state = "other"
        return [] if self.state == "other" else None

    def _args(self) -> list[Event] | None:
        if not self.buffer:
            return None
        piece = self.args.take(self.buffer)
        self.buffer = self.buffer[len(piece) :]
        if self.args.done:
            self.state = "tail"
        return self.events.args(piece)

    def _tail(self) -> list[Event] | None:
        at = self.buffer.find(CALL_END)
        if at < 0:
            return None
        self.buffer, self.state = self.buffer[at + len(CALL_END) :], "calls"
        return self.events.end(parse_arguments(self.args.text))

    def _other(self) -> list[Event] | None:
        at = self.buffer.find(CALL_END)
        if at < 0:
            return None
        body, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(CALL_END) :], "calls"
        return [TextDelta(self._opening() + CALL_BEGIN + body + CALL_END)]

    def _opening(self) -> str:
        """The block's opening tag, before the first content of a block that made no call yet
        (`shown` None from then on: its closing tag is content too)."""
        if self.shown is False:
            self.shown = None
            return CALLS_BEGIN
        return ""
