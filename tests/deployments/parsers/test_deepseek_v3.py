"""DeepSeek V3 / R1 tool calls (deployments.parsers.deepseek_v3) on outputs in both of DeepSeek's
shapes: V3's `function<｜tool▁sep｜>NAME` + a ```json fence, and V3.1 / R1-0528's
`NAME<｜tool▁sep｜>{...}`."""

from __future__ import annotations

import pytest

from deployments.events import TextDelta
from deployments.parsers.deepseek_v3 import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, DeepSeekV3Parser

from .streaming import Call, assert_any_split_parses_the_same, parse

NAMES = ("get_weather", "search")
ARGS = '{"city": "Zürich", "when": {"days": [1, 2], "note": "```"}}'
WEATHER = Call("get_weather", ARGS, {"city": "Zürich", "when": {"days": [1, 2], "note": "```"}})


def parser(forced: bool = False):
    return lambda: DeepSeekV3Parser(NAMES, forced)


def v3(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


@pytest.mark.parametrize("shape", [v3, v31])
def test_several_calls_after_text(shape):
    text = "Let me check." + CALLS_BEGIN + shape("get_weather", ARGS) + shape("search", '{"q": "東京"}') + CALLS_END
    assert assert_any_split_parses_the_same(parser(), text) == [
        TextDelta("Let me check."),
        WEATHER,
        Call("search", '{"q": "東京"}', {"q": "東京"}),
    ]


@pytest.mark.parametrize(
    "text",
    [
        CALLS_BEGIN + v31("send_mail", '{"to": "x"}') + CALLS_END,  # a tool the request does not offer
        CALLS_BEGIN + "no calls here" + CALLS_END,
        'The tool call JSON is {"name": "get_weather"}.',
    ],
)
def test_text_that_only_looks_like_a_call_stays_text(text):
    assert assert_any_split_parses_the_same(parser(), text) == [TextDelta(text)]


def test_a_cut_off_call_ends_with_its_text_and_a_cut_off_head_is_dropped_when_forced():
    text = CALLS_BEGIN + v31("search", '{"q": "ca')[: -len(CALL_END)]
    assert parse(parser(), text) == [Call("search", '{"q": "ca', '{"q": "ca')]
    head = CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "sea"
    assert assert_any_split_parses_the_same(parser(forced=True), head) == []
    assert assert_any_split_parses_the_same(parser(), head) == [TextDelta(head)]
