"""Pythonic tool calls: a Python list of calls with keyword arguments, `[get_weather(city="Paris"),
get_time()]` (Llama 3.2 / 4's pythonic templates, Gemma-style prompts, and LFM2, which writes the
list between `<|tool_call_start|>` and `<|tool_call_end|>`; Llama 4 may wrap it in
`<|python_start|>` / `<|python_end|>`).

A bare list counts only at the start of the output (or right after calls); a wrapped one
anywhere. The list is read whole, to its closing bracket, and parsed with `ast`: it is calls only
when every element is a call of a tool the request offers with literal keyword arguments (JSON's
true / false / null read as Python's), and then each call is sent whole, its arguments as JSON.
Anything else, the brackets and tags included, is content as written.
"""

from __future__ import annotations

import ast
from typing import Any

from ..events import Event, TextDelta
from .calls import StepParser, partial_tail

WRAPPERS = {"<|tool_call_start|>": "<|tool_call_end|>", "<|python_start|>": "<|python_end|>"}
_JSON_NAMES = {"true": True, "false": False, "null": None}


class ListEnd:
    """Where a Python list that starts the text ends: its closing bracket, strings and nested
    brackets skipped."""

    def __init__(self):
        self.depth = 0
        self.quote: str | None = None
        self.escaped = False

    def feed(self, text: str) -> int | None:
        for i, c in enumerate(text):
            if self.quote is not None:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == self.quote:
                    self.quote = None
            elif c in "'\"":
                self.quote = c
            elif c in "([{":
                self.depth += 1
            elif c in ")]}":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    return ast.literal_eval(node)


def parse_calls(text: str, names: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls a list's text makes, or None when it is not a list of calls of `names`."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
                return None
            if node.func.id not in names or any(k.arg is None for k in node.keywords):
                return None
            calls.append((node.func.id, {k.arg: _literal(k.value) for k in node.keywords}))
        return calls
    except (SyntaxError, ValueError, TypeError):
        return None


class PythonicParser(StepParser):
    state = "start"  # start (may a bare list begin here) | text | list | close (the wrapper's end)

    def __init__(self, names: tuple[str, ...], forced: bool = False):
        super().__init__(names, forced)
        self.wrapper: str | None = None  # the list's opening tag, if any
        self.held = ""
        self.end: ListEnd | None = None

    def finish(self) -> list[Event]:
        rest, self.buffer = self.buffer, ""
        if self.state == "list":
            rest = "" if self.forced else (self.wrapper or "") + self.held + rest
        elif self.state == "close":
            rest = rest.strip()
        return self.drop_gaps([TextDelta(rest)] if rest else [])

    def _start(self) -> list[Event] | None:
        body = self.buffer.lstrip()
        if not body:
            return None
        if body.startswith("["):
            self._open(None, body)
            return []
        self.state = "text"
        return []

    def _text(self) -> list[Event] | None:
        out, tag = self.text_until(*WRAPPERS)
        if tag is not None:
            self._open(tag, self.buffer)
            return out
        return out or None

    def _open(self, wrapper: str | None, text: str) -> None:
        self.wrapper, self.buffer, self.held, self.end, self.state = wrapper, text, "", ListEnd(), "list"

    def _list(self) -> list[Event] | None:
        if not self.held:  # before the list: whitespace, then its bracket
            body = self.buffer.lstrip()
            if not body:
                return None
            if not body.startswith("["):
                self.state = "text"
                return [TextDelta(self.wrapper)]
            self.buffer = body
        at = self.end.feed(self.buffer)
        if at is None:
            self.held, self.buffer = self.held + self.buffer, ""
            return None
        text, self.buffer = self.held + self.buffer[:at], self.buffer[at:]
        calls = parse_calls(text, self.names)
        if calls is None:
            self.state = "text"
            return [TextDelta((self.wrapper or "") + text)]
        self.state = "close" if self.wrapper else "start"
        return [e for name, args in calls for e in self.events.whole(name, args)]

    def _close(self) -> list[Event] | None:
        tag = WRAPPERS[self.wrapper]
        body = self.buffer.lstrip()
        if not body or (partial_tail(body, tag) == len(body)):
            return None
        self.buffer, self.state = body.removeprefix(tag), "start"
        return []
