"""Where a JSON value ends, found as its text streams in, without parsing it.

A tool call's arguments are streamed to clients as the model writes them, so a parser must know
when the arguments' value is complete (its closing bracket, quote or delimiter) before the text
that follows it (the call's own closing brace, a tag) is mistaken for more arguments.
"""

from __future__ import annotations

_SCALAR_END = frozenset(",}] \t\r\n")


class JsonValueEnd:
    """Feed text after the value's start; `feed` returns the offset in that text just past the
    value's end (or None while it goes on). Leading whitespace is skipped."""

    def __init__(self):
        self.kind: str | None = None  # the value's first character
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> int | None:
        for i, c in enumerate(text):
            if self.kind is None:
                if c.isspace():
                    continue
                self.kind = c
                self.depth = 1 if c in "{[" else 0
                self.in_string = c == '"'
            elif self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.kind == '"':
                        return i + 1
            elif self.kind in "{[":
                if c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        return i + 1
            elif c in _SCALAR_END:
                return i
        return None


class JsonText:
    """A JSON value's text as it streams: `take(text)` returns the part of `text` that belongs to
    the value (all of it while the value goes on); `done` once its end was read."""

    def __init__(self):
        self.text = ""
        self.done = False
        self._end = JsonValueEnd()

    def take(self, text: str) -> str:
        at = self._end.feed(text)
        piece = text if at is None else text[:at]
        self.text += piece
        self.done = at is not None
        return piece
