"""The reasoning splitter (deployments.parsers.reasoning) on each tag format, fed whole and at
every character, with the edge cases its module docstring decides."""

from __future__ import annotations

import pytest

from deployments.events import ReasoningDelta, TextDelta, ToolCallStart
from deployments.parsers import OutputParser, Parsing, make_parser
from deployments.parsers.reasoning import TagReasoning
from engine.chat_format import OutputFormat

CALL = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'


def split(events) -> tuple[str, str]:
    """The reasoning and the content the events carry."""
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    return reasoning, content


def whole(text: str, fmt: str = "think", inside: bool = False) -> tuple[str, str]:
    p = TagReasoning(fmt, inside)
    return split(p.feed(text) + p.finish())


def by_char(text: str, fmt: str = "think", inside: bool = False) -> tuple[str, str]:
    p = TagReasoning(fmt, inside)
    return split([e for c in text for e in p.feed(c)] + p.finish())


CASES = [
    # (format, in_reasoning, output, reasoning, content)
    ("think", False, "<think>\nLet me add.\n</think>\n\n4", "Let me add.", "4"),  # Qwen3
    ("think", True, "\nOkay, 2+2.\n</think>\n\nIt is 4.", "Okay, 2+2.", "It is 4."),  # QwQ, R1 distills
    ("think", False, "<think>\n\n</think>\n\nHi!", "", "Hi!"),  # Qwen3 /no_think: an empty block
    ("think", False, "Just an answer.", "", "Just an answer."),  # thinking off
    ("mistral", False, "[THINK]Check units.[/THINK]5 km", "Check units.", "5 km"),  # Magistral
    ("think", False, "<think>a</think>b<think>c</think>d", "ac", "bd"),  # thinking again later
    ("think", False, "Sure.</think>\n\nDone", "", "Sure.Done"),  # a stray closing tag is dropped
    ("think", True, "cut off at max_tok", "cut off at max_tok", ""),  # ended inside: all reasoning
    ("think", True, "cut at </thi", "cut at </thi", ""),  # a partial tag at the end is reasoning
    ("think", False, "a <thinking> b", "", "a <thinking> b"),  # only the exact tag counts
]


@pytest.mark.parametrize("fmt,inside,text,reasoning,content", CASES)
def test_reasoning_and_content_split_the_same_fed_whole_or_at_every_character(fmt, inside, text, reasoning, content):
    assert whole(text, fmt, inside) == (reasoning, content)
    assert by_char(text, fmt, inside) == (reasoning, content)


def test_a_tag_split_at_every_position_between_two_chunks_is_found():
    text = "<think>abc</think>xyz"
    for cut in range(len(text) + 1):
        p = TagReasoning("think")
        assert split(p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish()) == ("abc", "xyz"), cut


def test_nothing_that_may_still_become_a_tag_is_released():
    p = TagReasoning("think", in_reasoning=True)
    assert split(p.feed("hmm </th")) == ("hmm", "")
    assert split(p.feed("ink> ok")) == ("", "ok")


def test_a_tool_call_written_while_thinking_stays_reasoning_and_is_not_made():
    parser = make_parser(OutputFormat(reasoning="think", in_reasoning=True), Parsing(tools=("f",)))
    assert isinstance(parser, OutputParser)
    text = "I could call " + CALL + " here.</think>No call needed."
    events = [e for c in text for e in parser.feed(c)] + parser.finish()
    assert split(events) == ("I could call " + CALL + " here.", "No call needed.")
    assert not any(isinstance(e, ToolCallStart) for e in events) and parser.calls == 0


def test_a_call_after_the_reasoning_is_made():
    parser = make_parser(OutputFormat(reasoning="think"), Parsing(tools=("f",)))
    events = parser.feed("<think>I need f.</think>\n" + CALL) + parser.finish()
    assert split(events)[0] == "I need f."
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["f"]


def test_harmony_reasoning_is_split_by_the_harmony_parser_alone_with_or_without_tools():
    for parsing in (Parsing(), Parsing(tools=("f",))):
        parser = make_parser(OutputFormat(tools="hermes", reasoning="harmony"), parsing)
        assert parser.reasoning is None and type(parser.tools).__name__ == "HarmonyParser"
        events = parser.feed("<|channel|>analysis<|message|>hmm<|end|>") + parser.finish()
        assert events == [ReasoningDelta("hmm")]
