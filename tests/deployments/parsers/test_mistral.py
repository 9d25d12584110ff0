"""Mistral tool calls (deployments.parsers.mistral) on outputs in both of Mistral's forms after
[TOOL_CALLS]: the v3 JSON list and the v11+ `name[ARGS]{...}` calls."""

from __future__ import annotations

import pytest

from deployments.events import TextDelta
from deployments.parsers.mistral import MistralParser

from .streaming import Call, assert_any_split_parses_the_same, parse

NAMES = ("get_weather", "search")
WEATHER = Call(
    "get_weather",
    '{"city": "Zürich", "days": {"from": 1, "to": [2, "]"]}}',
    {"city": "Zürich", "days": {"from": 1, "to": [2, "]"]}},
)


def parser(forced: bool = False):
    return lambda: MistralParser(NAMES, forced)


def test_the_v3_list_with_several_calls_after_text():
    text = 'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": ' + WEATHER.arguments + "}, "
    text += '{"name": "search", "arguments": {"q": "ok"}, "id": "a1B2c3D4e"}]'
    assert assert_any_split_parses_the_same(parser(), text) == [
        TextDelta("Checking."),
        WEATHER,
        Call("search", '{"q": "ok"}', {"q": "ok"}),
    ]


def test_the_v11_form_repeated_per_call_with_or_without_a_call_id():
    text = "[TOOL_CALLS]get_weather[ARGS]" + WEATHER.arguments + '[TOOL_CALLS]search[CALL_ID]x7Yz90abc[ARGS]{"q": "ok"}'
    assert assert_any_split_parses_the_same(parser(), text) == [WEATHER, Call("search", '{"q": "ok"}', {"q": "ok"})]


@pytest.mark.parametrize(
    "text",
    [
        "The [TOOL_CALLS] token starts calls.",
        '[TOOL_CALLS]send_mail[ARGS]{"to": "x"}',  # a tool the request does not offer
        '[TOOL_CALLS][{"name": "send_mail", "arguments": {}}]',
        'A list: [{"name": "get_weather", "arguments": {}}]',  # no [TOOL_CALLS]: text
    ],
)
def test_text_that_only_looks_like_a_call_stays_text(text):
    assert assert_any_split_parses_the_same(parser(), text) == [TextDelta(text)]


def test_a_cut_off_call_ends_with_its_text_and_a_cut_off_header_is_dropped_when_forced():
    assert parse(parser(), '[TOOL_CALLS]search[ARGS]{"q": "o') == [Call("search", '{"q": "o', '{"q": "o')]
    assert assert_any_split_parses_the_same(parser(forced=True), "[TOOL_CALLS]sea") == []
    assert assert_any_split_parses_the_same(parser(), "[TOOL_CALLS]sea") == [TextDelta("[TOOL_CALLS]sea")]
