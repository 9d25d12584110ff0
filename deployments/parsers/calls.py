"""What every tool-call parser shares: numbering calls, making their events, holding back text
that may still become a tag, and the parsed arguments."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..events import Event, TextDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart


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


class Gaps:
    """The whitespace that follows a call is not content, however the text was split."""

    def __init__(self):
        self.after_call = False  # after a call, before any content

    def drop(self, out: list[Event]) -> list[Event]:
        kept: list[Event] = []
        for e in out:
            if isinstance(e, ToolCallEnd):
                self.after_call = True
            elif isinstance(e, TextDelta) and self.after_call:
                e = TextDelta(e.text.lstrip())
                if not e.text:
                    continue
                self.after_call = False
            kept.append(e)
        return kept


class StepParser:
    """A tool-call parser as a small state machine over held text: `feed` runs the current
    state's step (`_<state>`) until one returns None (it needs more text); each step consumes
    what it decided from `self.buffer` and returns its events. Subclasses set the states."""

    state = "text"

    def __init__(self, names: tuple[str, ...], forced: bool = False):
        self.names, self.forced = names, forced
        self.events = CallEvents()
        self.buffer = ""
        self.gaps = Gaps()

    @property
    def calls(self) -> int:
        return self.events.count

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        out: list[Event] = []
        while (step := getattr(self, f"_{self.state}")()) is not None:
            out += step
        return self.drop_gaps(out)

    def drop_gaps(self, out: list[Event]) -> list[Event]:
        return self.gaps.drop(out)

    def text_until(self, *tags: str) -> tuple[list[Event], str | None]:
        """The buffer's text up to the first of `tags` as content (less what may still begin one):
        its events and the tag found (consumed), or None when none is there yet."""
        buf = self.buffer
        found = [(buf.find(t), t) for t in tags if t in buf]
        if found:
            at, tag = min(found)
            self.buffer = buf[at + len(tag) :]
            return ([TextDelta(buf[:at])] if at else []), tag
        cut = len(buf) - max(partial_tail(buf, t) for t in tags)
        self.buffer = buf[cut:]
        return ([TextDelta(buf[:cut])] if cut else []), None
