"""Pythonic tool calls (deployments.parsers.pythonic) on outputs in the Llama 3.2 / 4 pythonic and
LFM2 formats: a Python list of keyword-argument calls, bare or between LFM2's tags."""

from __future__ import annotations

import pytest

from deployments.events import TextDelta
from deployments.parsers.pythonic import PythonicParser

from .streaming import Call, assert_any_split_parses_the_same

NAMES = ("get_weather", "search")


def parser(forced: bool = False):
    return lambda: PythonicParser(NAMES, forced)


def test_a_bare_list_of_calls_with_nested_unicode_literals():
    text = '[get_weather(city="Zürich", when={"days": [1, 2], "note": "])"}, metric=True), search(q=\'東京\')]'
    assert assert_any_split_parses_the_same(parser(), text) == [
        Call(
            "get_weather",
            '{"city": "Zürich", "when": {"days": [1, 2], "note": "])"}, "metric": true}',
            {"city": "Zürich", "when": {"days": [1, 2], "note": "])"}, "metric": True},
        ),
        Call("search", '{"q": "東京"}', {"q": "東京"}),
    ]


def test_lfm2_tags_around_the_list_after_text_and_json_literals():
    text = "Checking.<|tool_call_start|>[search(q=null, exact=false)]<|tool_call_end|>Done."
    assert assert_any_split_parses_the_same(parser(), text) == [
        TextDelta("Checking."),
        Call("search", '{"q": null, "exact": false}', {"q": None, "exact": False}),
        TextDelta("Done."),
    ]


def test_llama4_python_tags_and_a_call_without_arguments():
    text = "<|python_start|>[search()]<|python_end|>"
    assert assert_any_split_parses_the_same(parser(), text) == [Call("search", "{}", {})]


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3] are numbers.",
        '[get_weather("Paris")]',  # a positional argument
        "[send_mail(to='x')]",  # a tool the request does not offer
        "[search(q='x'), 42]",  # not every element is a call
        "See [search(q='x')] for details.",  # a bare list counts only at the start
        "[search(q=open('f'))]",  # not a literal
        "<|tool_call_start|>search(q='x')<|tool_call_end|>",  # no list
    ],
)
def test_text_that_only_looks_like_calls_stays_text(text):
    assert assert_any_split_parses_the_same(parser(), text) == [TextDelta(text)]


def test_a_list_cut_off_is_content_unless_the_output_was_forced():
    cut = "[search(q='x'), get_weather(city="
    assert assert_any_split_parses_the_same(parser(), cut) == [TextDelta(cut)]
    assert assert_any_split_parses_the_same(parser(forced=True), cut) == []
