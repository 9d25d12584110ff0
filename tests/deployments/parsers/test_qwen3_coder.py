"""Qwen3-Coder XML tool calls (deployments.parsers.qwen3_coder) on outputs in the format its
template teaches: `<tool_call><function=NAME><parameter=P>value</parameter>...`, values typed by
the tool's schema."""

from __future__ import annotations

import pytest

from deployments.events import TextDelta, ToolCallArgsDelta
from deployments.parsers.qwen3_coder import Qwen3CoderParser

from .streaming import Call, assert_any_split_parses_the_same, parse, run

SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "ratio": {"type": "number"},
            "metric": {"type": "boolean"},
            "where": {"type": "object"},
            "tags": {"type": "array"},
            "zip": {"type": ["string", "null"]},
        },
    },
    "search": {"type": "object", "properties": {"q": {"type": "string"}}},
}


def parser(forced: bool = False):
    return lambda: Qwen3CoderParser(tuple(SCHEMAS), forced, SCHEMAS)


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def test_parameter_values_become_json_by_the_schema_types():
    text = call(
        "get_weather",
        city="Zürich 8000",
        days="3",
        ratio="0.5",
        metric="True",
        where='{"lat": 47.4, "names": ["Zürich", "}"]}',
        tags='["a", "b"]',
        zip="8001",
        extra="42",
    )
    want = {
        "city": "Zürich 8000",
        "days": 3,
        "ratio": 0.5,
        "metric": True,
        "where": {"lat": 47.4, "names": ["Zürich", "}"]},
        "tags": ["a", "b"],
        "zip": "8001",  # a string type keeps the text
        "extra": "42",  # a parameter the schema does not describe: text
    }
    [got] = assert_any_split_parses_the_same(parser(), text)
    assert got.name == "get_weather" and got.parsed == want


def test_arguments_stream_one_parameter_at_a_time():
    events = run(parser(), [call("get_weather", city="Paris", days="2")])
    pieces = [e.text for e in events if isinstance(e, ToolCallArgsDelta)]
    assert pieces == ['{"city": "Paris"', ', "days": 2', "}"]


def test_several_calls_after_text_and_a_multiline_value():
    text = "Let me look.\n" + call("search", q="line one\nline two") + "\n" + call("get_weather", city="Oslo")
    assert assert_any_split_parses_the_same(parser(), text) == [
        TextDelta("Let me look.\n"),
        Call("search", '{"q": "line one\\nline two"}', {"q": "line one\nline two"}),
        Call("get_weather", '{"city": "Oslo"}', {"city": "Oslo"}),
    ]


def test_a_call_without_parameters_and_a_value_without_its_closing_tag():
    text = "<tool_call>\n<function=search>\n</function>\n</tool_call>"
    assert assert_any_split_parses_the_same(parser(), text) == [Call("search", "{}", {})]
    text = "<tool_call>\n<function=search>\n<parameter=q>\ncats\n</function>\n</tool_call>"
    assert assert_any_split_parses_the_same(parser(), text) == [Call("search", '{"q": "cats"}', {"q": "cats"})]


@pytest.mark.parametrize(
    "text",
    [
        call("send_mail", to="x"),  # a tool the request does not offer
        '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>',  # not this format
        "Write <tool_call> to call.",
    ],
)
def test_text_that_only_looks_like_a_call_stays_text(text):
    assert assert_any_split_parses_the_same(parser(), text) == [TextDelta(text)]


def test_a_cut_off_call_ends_with_its_complete_parameters_and_a_cut_off_head_is_dropped_when_forced():
    cut = call("get_weather", city="Paris", days="2")[:-40]
    assert parse(parser(), cut) == [Call("get_weather", '{"city": "Paris"}', {"city": "Paris"})]
    assert assert_any_split_parses_the_same(parser(forced=True), "<tool_call>\n<func") == []
