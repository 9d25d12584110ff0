"""Qwen3-Coder's XML tool calls (also Qwen3.5's and other templates that teach it):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text; it becomes JSON by the tool's schema: a string parameter (or one
the schema does not describe) stays the text, other types are parsed (numbers, booleans, objects,
arrays, null), and a value that does not parse stays the text. The call starts at its function's
name, its arguments stream one parameter at a time as each completes (`{"city": "Paris"`, then
`, "days": 3`, then `}`) and it ends at `</function>`. A block naming a tool the request does not
offer, or not in this shape, is content as written.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..events import Event, TextDelta
from .calls import StepParser

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>")
_VALUE_ENDS = ("</parameter>", "<parameter=", "</function>")


def convert(text: str, schema: dict[str, Any] | None) -> Any:
    """A parameter's text as the JSON value its schema types it as."""
    kinds = (schema or {}).get("type", "string" if not schema else None)
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "string" in kinds:
        return text
    try:
        return json.loads(text)
    except ValueError:
        lowered = text.strip().lower()
        if "boolean" in kinds and lowered in ("true", "false"):
            return lowered == "true"
        return text


def _may_open(text: str) -> bool:
    """Whether `text` may still become `<function=name>`."""
    if text.startswith("<function="):
        return not re.search(r"[>\n]", text[len("<function=") :])
    return "<function=".startswith(text)


class Qwen3CoderParser(StepParser):
    state = "text"  # text | head | params | value | close | other (a block that is no call)

    def __init__(self, names: tuple[str, ...], forced: bool = False, schemas: dict[str, dict] | None = None):
        super().__init__(names, forced)
        self.schemas = schemas or {}
        self.arguments: dict[str, Any] = {}
        self.param = ""
        self.properties: dict[str, Any] = {}

    def finish(self) -> list[Event]:
        rest, self.buffer = self.buffer, ""
        out: list[Event] = []
        if self.state in ("params", "value"):  # cut off inside the call: what was complete
            out = self._end()
        elif self.state in ("head", "other") and not self.forced:
            out = [TextDelta(OPEN + rest)]
        elif self.state == "text" and rest:
            out = [TextDelta(rest)]
        return self.drop_gaps(out)

    def _text(self) -> list[Event] | None:
        out, tag = self.text_until(OPEN)
        if tag is not None:
            self.state = "head"
            return out
        return out or None

    def _head(self) -> list[Event] | None:
        match = _FUNCTION.match(self.buffer)
        if match is None or match.group(1).strip() not in self.names:
            if match is None and _may_open(self.buffer.lstrip()) and CLOSE not in self.buffer:
                return None
            self.state = "other"
            return []
        name = match.group(1).strip()
        self.buffer, self.state = self.buffer[match.end() :], "params"
        self.arguments, self.properties = {}, self.schemas.get(name, {}).get("properties", {})
        return self.events.start(name)

    def _other(self) -> list[Event] | None:
        at = self.buffer.find(CLOSE)
        if at < 0:
            return None
        body, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(CLOSE) :], "text"
        return [TextDelta(OPEN + body + CLOSE)]

    def _params(self) -> list[Event] | None:
        match = _PARAMETER.match(self.buffer)
        if match is not None:
            self.param, self.buffer, self.state = match.group(1).strip(), self.buffer[match.end() :], "value"
            return []
        at = self.buffer.find("</function>")
        if at < 0:
            return None
        self.buffer, self.state = self.buffer[at + len("</function>") :], "close"
        return self._end()

    def _value(self) -> list[Event] | None:
        found = [(self.buffer.find(t), t) for t in _VALUE_ENDS if t in self.buffer]
        if not found:
            return None
        at, tag = min(found)
        text, self.buffer = self.buffer[:at], self.buffer[at + len(tag) if tag == _VALUE_ENDS[0] else at :]
        text = text.removeprefix("\n").removesuffix("\n")
        value = convert(text, self.properties.get(self.param))
        piece = ("{" if not self.arguments else ", ") + json.dumps({self.param: value}, ensure_ascii=False)[1:-1]
        self.arguments[self.param] = value
        self.state = "params"
        return self.events.args(piece)

    def _close(self) -> list[Event] | None:
        body = self.buffer.lstrip()
        if not body or CLOSE.startswith(body):
            return None
        self.buffer, self.state = body.removeprefix(CLOSE), "text"
        return []

    def _end(self) -> list[Event]:
        return self.events.args("}" if self.arguments else "{}") + self.events.end(self.arguments)
