"""Forced tool calls in every family's own syntax (engine.tool_grammar): the grammar built for the
model's call format holds a real model (SmolLM2, CPU) to calls that the router's parser for that
format reads, with arguments that validate against the tools' schemas."""

from __future__ import annotations

import jsonschema
import pytest

from deployments.events import ToolCallEnd, ToolCallStart
from deployments.parsers import Parsing, make_tool_parser
from engine.chat_format import TOOL_FORMATS
from engine.config import EngineConfig
from engine.constraints import GuidedSpec
from engine.engine import AsyncEngine
from engine.request import PromptInput
from engine.sampling import SamplingParams
from engine.tool_grammar import MAX_PARALLEL_CALLS, call_grammar

from ..conftest import SMOLLM
from .helpers import collect

TOOLS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    {
        "name": "book_flight",
        "parameters": {
            "type": "object",
            "properties": {
                "route": {
                    "type": "object",
                    "properties": {
                        "from": {"type": "string", "maxLength": 20},
                        "to": {"type": "string", "maxLength": 20},
                    },
                    "required": ["from", "to"],
                    "additionalProperties": False,
                },
                "seats": {"type": "integer", "minimum": 1, "maximum": 9},
                "window": {"type": "boolean"},
            },
            "required": ["route", "seats"],
            "additionalProperties": False,
        },
    },
]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
PROMPT = PromptInput(
    messages=[{"role": "user", "content": "Book 2 seats from Paris to Rome, then tell me the weather in Rome."}],
    tools=[{"type": "function", "function": t} for t in TOOLS],
)


@pytest.fixture(scope="module")
def engine(load_once):
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=64))
    yield eng
    eng.shutdown()


async def forced_calls(engine, fmt: str, tools: list[dict], parallel: bool, max_tokens: int = 120):
    """The model's output under the format's grammar, and the calls its parser reads in it."""
    spec = GuidedSpec(tool_calls={"tools": tools, "parallel": parallel})
    constraint = engine.scheduler.grammars.compile(spec, fmt)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, guided=spec)
    text, _, outs = await collect(engine.submit(PROMPT, params, constraint=constraint))
    assert outs[-1].finish_reason == "stop", text  # the grammar completed, max_tokens did not cut it
    parser = make_tool_parser(fmt, Parsing(tools=tuple(t["name"] for t in tools), forced=True, schemas=SCHEMAS))
    events = parser.feed(text) + parser.finish()
    names = [e.name for e in events if isinstance(e, ToolCallStart)]
    arguments = [e.arguments for e in events if isinstance(e, ToolCallEnd)]
    return text, list(zip(names, arguments, strict=True))


@pytest.mark.parametrize("fmt", TOOL_FORMATS)
async def test_a_forced_call_is_written_in_the_models_format_and_validates(engine, fmt):
    text, calls = await forced_calls(engine, fmt, TOOLS, parallel=False)
    assert len(calls) == 1, text
    jsonschema.validate(calls[0][1], SCHEMAS[calls[0][0]])


@pytest.mark.parametrize("fmt", ["hermes", "pythonic"])
async def test_parallel_calls_stop_at_the_most_the_grammar_allows(engine, fmt):
    text, calls = await forced_calls(engine, fmt, TOOLS[:1], parallel=True, max_tokens=240)
    assert 1 <= len(calls) <= MAX_PARALLEL_CALLS, text
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])


def test_tags_that_are_special_tokens_are_matched_as_tokens():
    lark = call_grammar(TOOLS[:1], False, "mistral", {"[TOOL_CALLS]": 9, "[ARGS]": 32})
    assert lark.startswith("start: <[9]> (v3 | v11)") and '"get_weather" <[32]>' in lark
    assert '"<tool_call>"' in call_grammar(TOOLS[:1], False, "hermes", {})


async def test_a_forced_tool_whose_schema_cannot_be_enforced_is_refused_naming_tools(engine):
    from engine.errors import InvalidRequestError

    spec = GuidedSpec(tool_calls={"tools": [{"name": "f", "parameters": {"type": "strin"}}]})
    with pytest.raises(InvalidRequestError, match="tools") as err:
        engine.submit(PROMPT, SamplingParams(guided=spec))
    assert err.value.param == "tools"
