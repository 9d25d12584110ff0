"""Mistral tool calls, after the `[TOOL_CALLS]` token, in either of Mistral's two forms:
  v3 (Mistral 7B v0.3, Nemo, Small 3.0/3.1)  `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
  v11+ (Small 3.2, Magistral, Devstral)      `[TOOL_CALLS]name[ARGS]{...}`, repeated per call
                                              (`name[CALL_ID]id[ARGS]{...}` read too; our ids are used)

Text before the token is content. The v3 list's objects stream as json_call.JsonCall reads them;
a v11 call starts at `[ARGS]` and its arguments stream until their JSON value ends. What follows
the token but reads as neither form (or calls a tool the request does not offer) is content.
"""

from __future__ import annotations

import re

from ..events import Event, TextDelta
from .calls import StepParser, parse_arguments
from .json_call import JsonCall
from .json_stream import JsonText

TAG = "[TOOL_CALLS]"
_HEADER = re.compile(r"\s*([\w.-]+)(?:\[CALL_ID\][\w-]*)?\[ARGS\]")
_NAME = re.compile(r"\s*[\w.-]*")


def maybe_header(text: str) -> bool:
    """Whether `text` may still become a v11 call's `name[ARGS]`."""
    rest = text[_NAME.match(text).end() :]
    if rest.startswith("[CALL_ID]"):
        rest = re.sub(r"^\[CALL_ID\][\w-]*", "", rest)
    elif "[CALL_ID]".startswith(rest):
        return True
    return "[ARGS]".startswith(rest)


class MistralParser(StepParser):
    # text | tag (after [TOOL_CALLS]) | item (v3: before an object) | object | sep (after one) | args (v11)
    state = "text"

    def __init__(self, names: tuple[str, ...], forced: bool = False):
        super().__init__(names, forced)
        self.call: JsonCall | None = None
        self.args: JsonText | None = None
        self.unoffered: str | None = None  # a v11 call to a tool not offered: its text so far (content)
        self.opening = ""  # the v3 list's opening, shown with its first object if that is no call
        self.as_text = False  # the v3 list is shown as content (an object in it was no call)

    def finish(self) -> list[Event]:
        rest, self.buffer = self.buffer, ""
        out: list[Event] = []
        if self.state == "object":
            out = self.call.finish(self.forced)
            rest = self.call.text or ""
        elif self.state == "args" and self.unoffered is None:
            out = self.events.end(parse_arguments(self.args.text))
        elif self.state == "args":
            rest = self.unoffered + self.args.text
        elif self.state in ("tag", "item") and not self.forced:
            rest = (TAG if self.state == "tag" else self.opening) + rest
        elif self.state != "text" and not (self.state == "sep" and self.as_text):
            rest = ""
        return self.drop_gaps(out + ([TextDelta(rest)] if rest else []))

    def _text(self) -> list[Event] | None:
        out, tag = self.text_until(TAG)
        if tag is not None:
            self.state = "tag"
            return out
        return out or None

    def _tag(self) -> list[Event] | None:
        body = self.buffer.lstrip()
        if body.startswith("["):
            self.opening, self.as_text = TAG + self.buffer[: len(self.buffer) - len(body) + 1], False
            self.buffer, self.state = body[1:], "item"
            return []
        match = _HEADER.match(self.buffer)
        if match is not None:
            name, self.buffer = match.group(1), self.buffer[match.end() :]
            self.args, self.state = JsonText(), "args"
            if name in self.names:
                self.unoffered = None
                return self.events.start(name)
            self.unoffered = TAG + match.group(0)
            return []
        if not body or maybe_header(self.buffer):
            return None
        self.state = "text"
        return [TextDelta(TAG)]

    def _args(self) -> list[Event] | None:
        if not self.buffer:
            return None
        piece = self.args.take(self.buffer)
        self.buffer = self.buffer[len(piece) :]
        out = self.events.args(piece) if self.unoffered is None else []
        if self.args.done:
            self.state = "text"
            if self.unoffered is None:
                return out + self.events.end(parse_arguments(self.args.text))
            return [TextDelta(self.unoffered + self.args.text)]
        return out

    def _item(self) -> list[Event] | None:
        body = self.buffer.lstrip()
        if not body:
            return None
        gap, self.buffer = self._shown(self.buffer[: len(self.buffer) - len(body)]), body
        if body.startswith("{"):
            self.call, self.state = JsonCall(self.events, self.names), "object"
            return gap
        self.state = "text"  # `[]`, or not a list of calls: the rest is content
        return gap + ([TextDelta(self.opening)] if self.opening else [])

    def _object(self) -> list[Event] | None:
        if not self.buffer:
            return None
        text, self.buffer = self.buffer, ""
        out = self.call.feed(text)
        if self.call.done:
            self.buffer, self.state = self.call.rest, "sep"
            if self.call.text is not None:
                out.append(TextDelta(self.opening + self.call.text))
                self.as_text = True
            self.opening = ""
        return out

    def _sep(self) -> list[Event] | None:
        body = self.buffer.lstrip()
        if not body:
            return None
        taken = len(self.buffer) - len(body) + (body[0] in ",]")
        shown, self.buffer = self._shown(self.buffer[:taken]), self.buffer[taken:]
        self.state = "item" if body[0] == "," else "text"
        return shown

    def _shown(self, text: str) -> list[Event]:
        """The v3 list's own text (brackets, commas, gaps) as content, when the list is."""
        return [TextDelta(text)] if self.as_text and text else []
