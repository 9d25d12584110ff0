"""GPT-OSS harmony output (deployments.parsers.harmony): the analysis channel is reasoning, a
commentary message to functions.NAME is a call (recipient before or after the channel), final
is content; through make_parser, harmony is the request's one parser, with or without tools."""

from __future__ import annotations

from deployments.events import ReasoningDelta, TextDelta
from deployments.parsers import OutputParser, Parsing, make_parser
from deployments.parsers.harmony import HarmonyParser
from engine.chat_format import OutputFormat

from .streaming import Call, assert_any_split_parses_the_same, parse, summary

NAMES = ("get_weather", "search")

ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather.<|end|>"


def parser(forced: bool = False, in_reasoning: bool = False):
    return lambda: HarmonyParser(NAMES, forced, in_reasoning)


def test_reasoning_then_a_call_with_the_recipient_after_the_channel():
    args = '{"city": "Zürich", "when": {"days": [1, 2]}}'
    text = (
        ANALYSIS
        + "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        + args
        + "<|call|>"
    )
    assert assert_any_split_parses_the_same(parser(), text) == [
        ReasoningDelta("The user wants the weather."),
        Call("get_weather", args, {"city": "Zürich", "when": {"days": [1, 2]}}),
    ]


def test_the_recipient_before_the_channel_and_several_calls():
    text = (
        '<|start|>assistant to=functions.search<|channel|>commentary json<|message|>{"q": "東京"}<|call|>'
        + '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>'
    )
    assert assert_any_split_parses_the_same(parser(), text) == [
        Call("search", '{"q": "東京"}', {"q": "東京"}),
        Call("get_weather", '{"city": "Oslo"}', {"city": "Oslo"}),
    ]


def test_a_call_written_while_reasoning_is_not_made():
    text = (
        '<|channel|>analysis<|message|>I could send commentary to=functions.get_weather json {"city": "Paris"} '
        "but I know it.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>"
    )
    assert assert_any_split_parses_the_same(parser(), text) == [
        ReasoningDelta('I could send commentary to=functions.get_weather json {"city": "Paris"} but I know it.'),
        TextDelta("It is sunny."),
    ]


def test_final_and_preambles_are_content_and_other_recipients_are_no_calls():
    text = (
        "<|channel|>commentary<|message|>Looking it up.<|end|>"
        + '<|start|>assistant<|channel|>commentary to=functions.send_mail <|constrain|>json<|message|>{"to": "x"}<|call|>'
    )
    assert assert_any_split_parses_the_same(parser(), text) == [TextDelta('Looking it up.{"to": "x"}')]
    assert assert_any_split_parses_the_same(parser(), "Just text.") == [TextDelta("Just text.")]


def test_output_that_starts_inside_the_analysis_channel():
    text = "Thinking.<|end|><|start|>assistant<|channel|>final<|message|>Done."
    assert assert_any_split_parses_the_same(parser(in_reasoning=True), text) == [
        ReasoningDelta("Thinking."),
        TextDelta("Done."),
    ]


def test_a_cut_off_call_ends_with_its_text_and_a_cut_off_header_is_dropped():
    text = "<|channel|>commentary to=functions.search <|constrain|>json<|message|>" + '{"q": "ca'
    assert parse(parser(), text) == [Call("search", '{"q": "ca', '{"q": "ca')]
    assert assert_any_split_parses_the_same(parser(), ANALYSIS + "<|start|>assistant<|chan") == [
        ReasoningDelta("The user wants the weather.")
    ]


def test_make_parser_uses_harmony_alone_with_or_without_tools():
    fmt = OutputFormat(tools="harmony", reasoning="harmony")
    text = ANALYSIS + "<|start|>assistant<|channel|>final<|message|>Hi.<|return|>"
    for parsing in (Parsing(), Parsing(tools=NAMES)):
        made = make_parser(fmt, parsing)
        assert isinstance(made, OutputParser) and made.reasoning is None and isinstance(made.tools, HarmonyParser)
        assert summary(made.feed(text) + made.finish()) == [
            ReasoningDelta("The user wants the weather."),
            TextDelta("Hi."),
        ]
