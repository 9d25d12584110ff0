"""What every tool-call parser shares: numbering calls, making their events, holding back text
that may still become a tag, and the parsed arguments."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..events import Event, ToolCallArgsDelta, ToolCallEnd, ToolCallStart


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def partial_tail(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag` (to hold back, undecided)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_arguments(text: str) -> Any:
    """A call's arguments as the model wrote them: the JSON value, or the text when it is not JSON
    (cut off by max_tokens, or malformed: clients get the text as the model wrote it)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class CallEvents:
    """Numbers one response's calls and makes their events (ids are ours: `call_<hex>`)."""

    def __init__(self):
        self.count = 0  # calls started
        self.open: int | None = None  # the index of the call whose arguments are streaming

    def start(self, name: str) -> list[Event]:
        self.open, self.count = self.count, self.count + 1
        return [ToolCallStart(self.open, new_call_id(), name)]

    def args(self, text: str) -> list[Event]:
        return [ToolCallArgsDelta(self.open, text)] if text and self.open is not None else []

    def end(self, arguments: Any) -> list[Event]:
        index, self.open = self.open, None
        return [ToolCallEnd(index, arguments)]

    def whole(self, name: str, arguments: Any) -> list[Event]:
        """A call known all at once: its start, its arguments' JSON text in one delta, its end."""
        return self.start(name) + self.args(json.dumps(arguments, ensure_ascii=False)) + self.end(arguments)
