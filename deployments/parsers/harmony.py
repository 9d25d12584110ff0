"""GPT-OSS's harmony format: the output is messages, each a header then `<|message|>` and a body
ended by `<|end|>`, `<|call|>` or `<|return|>`; the header names the message's channel and, for a
call, its recipient:

    <|channel|>analysis<|message|>...<|end|>                                    reasoning
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>
    <|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{...}<|call|>
    <|start|>assistant<|channel|>final<|message|>...<|return|>                 content

(The prompt ends with `<|start|>assistant`, so the first message's header starts at
`<|channel|>`.) Harmony is both the reasoning and the tool-call format, so this parser is the
request's only one (deployments.parsers.make_parser). The analysis channel is `ReasoningDelta`,
so a call written while reasoning is never made; a message to `functions.NAME` of a tool the
request offers is a call whose body (its arguments' JSON) streams as written; final and
commentary without a recipient are content, and so is a message to any other recipient (tools
we do not run) and text outside any header.
"""

from __future__ import annotations

import re

from ..events import Event, ReasoningDelta, TextDelta
from .calls import StepParser, parse_arguments, partial_tail

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>", START)  # a body ends at these (START: an end left out)
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


class HarmonyParser(StepParser):
    state = "header"  # header (a message's, up to <|message|>) | body

    def __init__(self, names: tuple[str, ...], forced: bool = False, in_reasoning: bool = False):
        super().__init__(names, forced)
        self.kind = "reasoning" if in_reasoning else "content"  # the body's: reasoning | content | call
        self.args = ""
        if in_reasoning:
            self.state = "body"

    def finish(self) -> list[Event]:
        rest, self.buffer = self.buffer, ""
        if self.state == "header":  # a header cut off: markup, not content
            return []
        out = self._piece(rest)
        if self.kind == "call":
            out += self.events.end(parse_arguments(self.args))
        return self.drop_gaps(out)

    def _header(self) -> list[Event] | None:
        at = self.buffer.find(MESSAGE)
        if at < 0:
            body = self.buffer.lstrip()
            if not body or any(body.startswith(t) or t.startswith(body) for t in (START, CHANNEL)):
                return None
            self.state, self.kind = "body", "content"  # text outside any message: content
            return []
        header, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(MESSAGE) :], "body"
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        name = recipient.group(1).removeprefix("functions.") if recipient else None
        if recipient is not None and recipient.group(1).startswith("functions.") and name in self.names:
            self.kind, self.args = "call", ""
            return self.events.start(name)
        analysis = recipient is None and channel is not None and channel.group(1) == "analysis"
        self.kind = "reasoning" if analysis else "content"
        return []

    def _body(self) -> list[Event] | None:
        buf = self.buffer
        found = [(buf.find(t), t) for t in ENDS if t in buf]
        if not found:
            cut = len(buf) - max(partial_tail(buf, t) for t in ENDS)
            self.buffer = buf[cut:]
            return self._piece(buf[:cut]) or None
        at, tag = min(found)
        self.buffer, self.state = buf[at + (0 if tag == START else len(tag)) :], "header"
        out = self._piece(buf[:at])
        if self.kind == "call":
            out += self.events.end(parse_arguments(self.args))
        return out

    def _piece(self, text: str) -> list[Event]:
        if not text:
            return []
        if self.kind == "call":
            self.args += text
            return self.events.args(text)
        return [ReasoningDelta(text) if self.kind == "reasoning" else TextDelta(text)]
