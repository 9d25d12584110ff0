"""Llama 3.x JSON tool calls (deployments.parsers.llama3_json) on outputs in Meta's documented
format: `{"name": ..., "parameters": {...}}`, optionally after <|python_tag|>."""

from __future__ import annotations

import pytest

from deployments.events import TextDelta
from deployments.parsers.llama3_json import Llama3JsonParser

from .streaming import Call, assert_any_split_parses_the_same, parse

NAMES = ("get_weather", "search")


def parser(forced: bool = False):
    return lambda: Llama3JsonParser(NAMES, forced)


def test_one_call_with_nested_unicode_arguments_streams_as_written():
    text = '{"name": "get_weather", "parameters": {"city": "Zürich", "when": {"days": [1, 2], "note": "}{"}}}'
    args = '{"city": "Zürich", "when": {"days": [1, 2], "note": "}{"}}'
    assert assert_any_split_parses_the_same(parser(), text) == [
        Call("get_weather", args, {"city": "Zürich", "when": {"days": [1, 2], "note": "}{"}})
    ]


@pytest.mark.parametrize("sep", ["; ", ";", "\n", "\n\n"])
def test_several_calls_after_the_python_tag_apart_by_semicolons_or_newlines(sep):
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}' + sep
    text += '{"name": "search", "parameters": {"q": "東京"}}'
    assert assert_any_split_parses_the_same(parser(), text) == [
        Call("get_weather", '{"city": "Paris"}', {"city": "Paris"}),
        Call("search", '{"q": "東京"}', {"q": "東京"}),
    ]


def test_keys_in_another_order_make_the_call_once_the_object_is_read():
    text = '{"parameters": {"city": "Rome"}, "name": "get_weather"}'
    assert assert_any_split_parses_the_same(parser(), text) == [
        Call("get_weather", '{"city": "Rome"}', {"city": "Rome"})
    ]


@pytest.mark.parametrize(
    "text",
    [
        'Use {"name": "get_weather", "parameters": {"city": "Paris"}} to ask.',  # JSON inside text
        '{"name": "send_mail", "parameters": {"to": "a@b.c"}}',  # a tool the request does not offer
        '{"city": "Paris", "temp": 21}',  # JSON, not a call
        '[{"name": "get_weather"}]',
        '<|python_tag|>brave_search.call(query="x")',  # a built-in tool's call, not ours
    ],
)
def test_text_that_only_looks_like_a_call_stays_text(text):
    assert assert_any_split_parses_the_same(parser(), text) == [TextDelta(text)]


def test_text_after_the_calls_is_content():
    text = '{"name": "search", "parameters": {"q": "x"}}\nDone.'
    assert assert_any_split_parses_the_same(parser(), text) == [
        Call("search", '{"q": "x"}', {"q": "x"}),
        TextDelta("Done."),
    ]


def test_a_call_cut_off_ends_with_its_text_and_a_cut_off_head_is_content_unless_forced():
    cut = '{"name": "get_weather", "parameters": {"city": "Par'
    assert parse(parser(), cut) == [Call("get_weather", '{"city": "Par', '{"city": "Par')]
    head = '{"name": "get_wea'
    assert assert_any_split_parses_the_same(parser(), head) == [TextDelta(head)]
    assert assert_any_split_parses_the_same(parser(forced=True), head) == []
