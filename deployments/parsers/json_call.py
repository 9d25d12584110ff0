"""One tool call written as a JSON object, `{"name": ..., "arguments": {...}}` (or `"parameters"`,
Llama's key), streamed: the format parsers that write calls as such objects (Llama 3.x JSON,
Mistral's v3 list) feed it the text from the object's `{` on.

The call starts once its name is read (the keys in that order, a name the request offers), its
arguments stream as written and it ends at the object's closing brace. An object that does not
read so is decided whole at its end: a call when it parses as one, else the caller's content.
"""

from __future__ import annotations

import json
import re

from ..events import Event
from .calls import CallEvents, parse_arguments
from .json_stream import JsonText, JsonValueEnd

_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
ARGUMENT_KEYS = ("arguments", "parameters")


def call_value(value, names: tuple[str, ...]) -> tuple[str, object] | None:
    """(name, arguments) when a parsed JSON value is a call of one of `names`, else None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    keys = [k for k in ARGUMENT_KEYS if k in value]
    if not keys or set(value) - {"name", "id", *ARGUMENT_KEYS}:
        return None
    return value["name"], value[keys[0]]


class JsonCall:
    """Feed the text from the object's `{`. Once `done`, `rest` is the text after the object, and
    `text` the object's own text when it was not a call (None when it was)."""

    def __init__(self, events: CallEvents, names: tuple[str, ...]):
        self.events, self.names = events, names
        self.state = "head"  # head | args | tail
        self.held = ""  # head: the object's text so far
        self._whole = JsonValueEnd()  # head: where the object ends
        self.args = JsonText()
        self._tail = JsonValueEnd()
        self.done = False
        self.rest = ""
        self.text: str | None = None

    def feed(self, text: str) -> list[Event]:
        if self.state == "head":
            return self._head(text)
        if self.state == "args":
            return self._args(text)
        return self._close(text)

    def finish(self, forced: bool) -> list[Event]:
        """The output ended inside the object: a call cut off ends with what it has; an undecided
        head is content (dropped when the output was forced to be calls)."""
        self.done = True
        if self.state != "head":
            return self.events.end(parse_arguments(self.args.text))
        self.text = None if forced else self.held
        return []

    def _head(self, text: str) -> list[Event]:
        self.held += text
        match = _HEAD.match(self.held)
        if match is not None and match.end() < len(self.held):
            name = json.loads(f'"{match.group(1)}"')
            if name in self.names:
                self.state = "args"
                return self.events.start(name) + self._args(self.held[match.end() :])
        end = self._whole.feed(text)
        if end is None:
            return []
        at = len(self.held) - len(text) + end
        body, self.rest, self.done = self.held[:at], self.held[at:], True
        try:
            call = call_value(json.loads(body), self.names)
        except ValueError:
            call = None
        if call is None:
            self.text = body
            return []
        return self.events.whole(*call)

    def _args(self, text: str) -> list[Event]:
        piece = self.args.take(text)
        out = self.events.args(piece)
        if self.args.done:
            self.state = "tail"
            self._tail.feed("{")  # inside the call's object, after its arguments
            out += self._close(text[len(piece) :])
        return out

    def _close(self, text: str) -> list[Event]:
        end = self._tail.feed(text)
        if end is None:
            return []
        self.rest, self.done = text[end:], True
        return self.events.end(parse_arguments(self.args.text))
