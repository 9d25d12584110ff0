"""Hermes tool calls (deployments.parsers.hermes) under the same checks as every other family:
several calls, nested unicode arguments, any split of the text."""

from __future__ import annotations

import pytest

from deployments.events import TextDelta
from deployments.parsers.hermes import HermesParser

from .streaming import Call, assert_any_split_parses_the_same

NAMES = ("get_weather", "search")


def parser(forced: bool = False):
    return lambda: HermesParser(NAMES, forced)


def test_several_calls_after_text_parse_the_same_however_the_text_is_split():
    args = '{"city": "Zürich", "when": {"days": [1, 2], "note": "</tool_call>"}}'
    text = f'Checking.\n<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "search", "arguments": {"q": "東京"}}\n</tool_call>'
    assert assert_any_split_parses_the_same(parser(), text) == [
        TextDelta("Checking.\n"),
        Call("get_weather", args, {"city": "Zürich", "when": {"days": [1, 2], "note": "</tool_call>"}}),
        Call("search", '{"q": "東京"}', {"q": "東京"}),
    ]


@pytest.mark.parametrize(
    "text",
    ['<tool_call>\n{"name": "send_mail", "arguments": {}}\n</tool_call>', "Write <tool_call> tags."],
)
def test_text_that_only_looks_like_a_call_stays_text(text):
    assert assert_any_split_parses_the_same(parser(), text) == [TextDelta(text)]
