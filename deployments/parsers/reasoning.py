"""Reasoning kept apart from the answer: the text between a format's tags is reasoning.

`<think>...</think>` (and Magistral's `[THINK]...[/THINK]`): text inside the tags becomes
`ReasoningDelta`, the rest `TextDelta`. The output may start inside the block when the prompt
opened it (`in_reasoning`: QwQ's, DeepSeek-R1's templates end the prompt with `<think>`). What
this parser decides:
  - tags split across chunks (at any character) are held back until they are known;
  - whitespace right after either tag, and the reasoning's trailing whitespace before its closing
    tag, belong to neither part (Qwen3 writes `<think>\\n...\\n</think>\\n\\n`);
  - a closing tag outside a block (the prompt did not open one, as the output format says) is
    dropped, with the whitespace after it, and the text before it stays content: streamed
    content cannot be taken back, and a whole response reads as the streamed one does. A model
    whose template opens the block is detected from its prompt (engine.chat_format), so this is
    only a model that closes a block it never opened;
  - the output ending inside a block (max_tokens, a thinking cap that could not close it) ends
    its reasoning: what was written so far is reasoning, never content;
  - text inside a block is never parsed for tool calls (deployments.parsers.OutputParser).
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
        self._strip = in_reasoning  # the next text's leading whitespace follows a tag
        self._space = ""  # the reasoning's trailing whitespace, held until more reasoning follows

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        out: list[Event] = []
        while self._buffer:
            at, tag = self._next_tag()
            cut = at if at >= 0 else len(self._buffer) - self._undecided()
            out += self._emit(self._buffer[:cut])
            if at < 0:
                self._buffer = self._buffer[cut:]
                break
            self._buffer = self._buffer[at + len(tag) :]
            if self.inside or tag == self.open_tag:  # a stray closing tag changes nothing
                self.inside = not self.inside
            self._strip, self._space = True, ""
        return out

    def finish(self) -> list[Event]:
        rest, self._buffer = self._buffer, ""
        out = self._emit(rest)
        self._space = ""
        return out

    def _next_tag(self) -> tuple[int, str]:
        """The first tag in the buffer that changes something (-1 when none is there yet)."""
        if self.inside:
            return self._buffer.find(self.close_tag), self.close_tag
        found = [(self._buffer.find(t), t) for t in (self.open_tag, self.close_tag)]
        return min(((at, t) for at, t in found if at >= 0), default=(-1, self.open_tag))

    def _undecided(self) -> int:
        """How many trailing characters may still become a tag."""
        tags = (self.close_tag,) if self.inside else (self.open_tag, self.close_tag)
        return max(partial_tail(self._buffer, t) for t in tags)

    def _emit(self, text: str) -> list[Event]:
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        if not text:
            return []
        if not self.inside:
            return [TextDelta(text)]
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        return [ReasoningDelta(body)] if body else []
