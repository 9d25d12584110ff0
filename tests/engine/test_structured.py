"""Structured output and logprobs in the engine, on both batch loops (real SmolLM2, CPU).

A JSON schema is enforced by a grammar (llguidance) as a per-row mask inside the batch: the output
parses and validates, and an unconstrained neighbour's greedy output is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import math

import jsonschema
import pytest

from engine.constraints import GuidedSpec
from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams

from .helpers import chat, collect, run

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["items"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
                },
                "required": ["id", "tags"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "bool_number": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0, "maximum": 10}},
        "required": ["ok", "score"],
        "additionalProperties": False,
    },
}


def valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_json_schema_output_parses_and_validates(engine, name):
    schema = SCHEMAS[name]
    text, _, outs = await run(
        engine,
        chat(f"Give me a JSON object: {json.dumps(schema)}"),
        temperature=0,
        max_tokens=80,
        guided=GuidedSpec(json_schema=schema),
    )
    assert outs[-1].finish_reason == "stop", text
    valid(text, schema)


async def test_json_object_output_is_an_object(engine):
    text, _, _ = await run(
        engine,
        chat("Describe a cat as JSON."),
        temperature=0.8,
        seed=3,
        max_tokens=80,
        guided=GuidedSpec(json_object=True),
    )
    assert isinstance(json.loads(text), dict)


async def test_a_constrained_neighbour_leaves_greedy_outputs_unchanged(engine):
    """The unconstrained requests' greedy tokens are the same alone and beside constrained ones
    (which make the batch read its tokens before sampling)."""
    questions = ["What is 2+2?", "Name 3 colors.", "Capital of Japan?"]
    solo = [(await run(engine, chat(q), temperature=0, max_tokens=16))[1] for q in questions]
    guided = [
        engine.submit(
            chat("A person as JSON"),
            SamplingParams(temperature=0, max_tokens=40, guided=GuidedSpec(json_schema=SCHEMAS[k])),
        )
        for k in ("person", "nested")
    ]
    free = [engine.submit(chat(q), SamplingParams(temperature=0, max_tokens=16)) for q in questions]
    results = await asyncio.gather(*(collect(s) for s in [*guided, *free]))
    assert [r[1] for r in results[2:]] == solo
    valid(results[0][0], SCHEMAS["person"])


async def test_a_bad_schema_is_refused_at_submit(engine):
    with pytest.raises(InvalidRequestError, match="response_format"):
        engine.submit(chat("hi"), SamplingParams(guided=GuidedSpec(json_schema={"type": "strin"})))
    with pytest.raises(InvalidRequestError, match="tools") as err:  # a forced call's grammar names `tools`
        engine.submit(
            chat("hi"), SamplingParams(guided=GuidedSpec(lark='start: "<tool_call>" %json {"type": "strin"}'))
        )
    assert err.value.param == "tools"
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0  # nothing was queued


async def test_logprobs_are_consistent_with_the_chosen_tokens(engine):
    _, ids, outs = await run(engine, chat("Name 3 colors."), temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    entries = [e for o in outs for e in (o.logprobs or [])]
    assert [e["id"] for e in entries] == ids
    for e in entries:
        assert e["logprob"] <= 0.0 and len(e["top"]) == 3
        assert e["top"][0][0] == e["id"] and math.isclose(
            e["top"][0][2], e["logprob"], abs_tol=1e-4
        )  # greedy: the best
        assert [t[2] for t in e["top"]] == sorted((t[2] for t in e["top"]), reverse=True)
        assert sum(math.exp(t[2]) for t in e["top"]) <= 1.0 + 1e-4
        assert e["token"] == engine.tokenizer.decode([e["id"]])


async def test_logprobs_do_not_change_tokens_and_are_absent_unless_asked(engine):
    _, plain, outs = await run(engine, chat("Name 3 colors."), temperature=0, max_tokens=8)
    _, with_lp, _ = await run(engine, chat("Name 3 colors."), temperature=0, max_tokens=8, logprobs=True)
    assert plain == with_lp
    assert all(o.logprobs is None for o in outs)


# --- tools in the prompt (engine.tool_prompt) ------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALLED = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
]


def test_tools_reach_a_template_without_tool_support_as_the_hermes_prompt(smollm):
    from engine.prompts import encode_prompt
    from engine.request import PromptInput

    text = smollm.tokenizer.decode(encode_prompt(smollm.tokenizer, PromptInput(messages=CALLED, tools=[WEATHER_TOOL])))
    assert "<tools>" in text and '"name": "get_weather"' in text  # the system prompt describes the tool
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C\n</tool_response>" in text
    custom = encode_prompt(
        smollm.tokenizer,
        PromptInput(messages=CALLED[:1], tools=[WEATHER_TOOL]),
        tool_prompt="Functions you may call:\n{tools}\nAnswer with <tool_call>{...}</tool_call>.",
    )
    custom_text = smollm.tokenizer.decode(custom)
    assert "Functions you may call:\n{" in custom_text and "<tools>" not in custom_text


def test_a_tool_prompt_without_its_placeholder_is_a_config_error():
    from pydantic import ValidationError

    from engine.config import EngineConfig

    with pytest.raises(ValidationError, match=r"must contain \{tools\}"):
        EngineConfig(tool_prompt="Use the tools.")
