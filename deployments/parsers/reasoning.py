"""Reasoning kept apart from the answer: the text between a format's tags is reasoning.

`<think>...</think>` (and Magistral's `[THINK]...[/THINK]`): text inside the tags becomes
`ReasoningDelta`, the rest `TextDelta`. The output may start inside the block when the prompt
opened it (`in_reasoning`). Tags split across chunks are held back until they are known.
"""

from __future__ import annotations

from engine.chat_format import REASONING_TAGS

from ..events import Event, ReasoningDelta, TextDelta
from .calls import partial_tail


class TagReasoning:
    def __init__(self, reasoning: str, in_reasoning: bool = False):
        self.open_tag, self.close_tag = REASONING_TAGS[reasoning]
        self.inside = in_reasoning
        self._buffer = ""
        self._after_close = False  # strip the whitespace that follows a closing tag

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        out: list[Event] = []
        while self._buffer:
            tag = self.close_tag if self.inside else self.open_tag
            at = self._buffer.find(tag)
            cut = at if at >= 0 else len(self._buffer) - partial_tail(self._buffer, tag)
            out += self._emit(self._buffer[:cut])
            if at < 0:
                self._buffer = self._buffer[cut:]
                break
            self._buffer = self._buffer[at + len(tag) :]
            self._after_close, self.inside = self.inside, not self.inside
        return out

    def finish(self) -> list[Event]:
        rest, self._buffer = self._buffer, ""
        return self._emit(rest)

    def _emit(self, text: str) -> list[Event]:
        if self._after_close and not self.inside:
            text = text.lstrip()
            self._after_close = not text
        if not text:
            return []
        return [ReasoningDelta(text) if self.inside else TextDelta(text)]
