"""What the tool-call parsers' tests share: a parser run over a text in given pieces, its events
in a form that does not depend on how the text was split, and the check that every split gives
the whole text's parse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployments.events import ReasoningDelta, TextDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # the argument deltas' texts, joined
    parsed: Any  # ToolCallEnd's value


def run(make, pieces: list[str]) -> list:
    parser = make()
    out = []
    for piece in pieces:
        out += parser.feed(piece)
    return out + parser.finish()


def summary(events: list) -> list:
    """Content and reasoning as joined texts and each call as a Call, in output order (ids
    aside); checks that every call starts, streams and ends in order."""
    out: list = []
    open_call: dict | None = None
    for e in events:
        if isinstance(e, ToolCallStart):
            assert open_call is None, "a call started inside another"
            assert e.id.startswith("call_") and e.index == sum(isinstance(x, Call) for x in out)
            open_call = {"index": e.index, "name": e.name, "args": ""}
        elif isinstance(e, ToolCallArgsDelta):
            assert open_call is not None and e.index == open_call["index"] and e.text
            open_call["args"] += e.text
        elif isinstance(e, ToolCallEnd):
            assert open_call is not None and e.index == open_call["index"]
            out.append(Call(open_call["name"], open_call["args"], e.arguments))
            open_call = None
        else:
            assert isinstance(e, (TextDelta, ReasoningDelta)) and e.text, e
            if out and type(out[-1]) is type(e):
                out[-1] = type(e)(out[-1].text + e.text)
            else:
                out.append(e)
    assert open_call is None, "a call never ended"
    return out


def parse(make, text: str) -> list:
    return summary(run(make, [text]))


def assert_any_split_parses_the_same(make, text: str) -> list:
    """The text fed whole, char by char, and in every two pieces gives the same summary."""
    whole = parse(make, text)
    assert summary(run(make, list(text))) == whole, "char by char"
    for i in range(1, len(text)):
        assert summary(run(make, [text[:i], text[i:]])) == whole, f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    return whole
