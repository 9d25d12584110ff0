"""A continued conversation (`previous_response_id`) renders as the earlier prompt followed by the
earlier output, token for token, through the bundled SmolLM2's chat template: so the paged cache,
which keeps a finished request's prompt and output blocks, serves the continuation's prefix, and
prefix-affinity routing (which hashes the same rendered messages) sends it to the replica that
holds them. The real cache hit: tests/e2e/test_responses_e2e.py."""

from __future__ import annotations

import json

import pytest

from deployments.events import Finish, TextDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart, Usage
from deployments.hop import GenerateRequest
from deployments.prefix_hashing import block_hashes, prompt_text
from deployments.responses.builders import ResponseEvents
from deployments.responses.convert import stored_items, to_chat_request
from deployments.responses.protocol import parse
from engine.prompts import encode_prompt
from tests.fakes import USAGE

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ANSWER = [TextDelta("The capital of France is Paris."), Finish("stop"), Usage(USAGE)]
ARGS = '{"city": "Paris"}'
CALLED = [
    ToolCallStart(0, "call_1", "get_weather"),
    ToolCallArgsDelta(0, ARGS),
    ToolCallEnd(0, {"city": "Paris"}),
    Finish("tool_calls"),
    Usage(USAGE),
]
CALL_TEXT = f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>'


def turns(first_fields: dict, output_events: list, then: list[dict]):
    """The first request's prompt, the stored response, and the continuation's prompt (as
    `serving.conversation` builds it: the stored items and output, then the new input)."""
    first = parse(json.dumps({"model": "m", **first_fields}).encode())
    response = ResponseEvents(first, "resp_1").whole(output_events)
    stored = [i.model_dump(exclude_none=True, by_alias=True) for i in first.items()]
    fields = {k: v for k, v in first_fields.items() if k in ("tools", "instructions")}
    second = parse(json.dumps({"model": "m", "input": then, "previous_response_id": "resp_1", **fields}).encode())
    items = stored_items(stored + response["output"]) + second.items()
    return to_chat_request(first, first.items()).prompt_input(), to_chat_request(second, items).prompt_input()


@pytest.mark.parametrize(
    "first_fields, output_events, output_text",
    [
        ({"input": "What is the capital of France?", "instructions": "Be brief."}, ANSWER, ANSWER[0].text),
        ({"input": "Weather in Paris?", "tools": [WEATHER]}, CALLED, CALL_TEXT),
    ],
    ids=["text", "function_call"],
)
def test_a_continuation_starts_with_the_previous_prompt_and_output_tokens(
    smollm, first_fields, output_events, output_text
):
    tok = smollm.tokenizer
    then = [{"role": "user", "content": "And Germany?"}]
    if output_events is CALLED:
        then = [{"type": "function_call_output", "call_id": "call_1", "output": "18C"}]
    first, second = turns(first_fields, output_events, then)
    before = encode_prompt(tok, first)
    generated = tok.encode(output_text, add_special_tokens=False) + [tok.eos_token_id]  # what the model wrote
    after = encode_prompt(tok, second)
    assert after[: len(before) + len(generated)] == before + generated
    assert len(after) > len(before) + len(generated)


def test_prefix_affinity_hashes_a_continuation_as_an_extension_of_its_previous_prompt():
    first, second = turns(
        {"input": "Weather in Paris?", "tools": [WEATHER]}, ANSWER, [{"role": "user", "content": "Hm?"}]
    )
    one, two = (block_hashes(prompt_text(GenerateRequest(p)), 16) for p in (first, second))
    assert one and two[: len(one)] == one and len(two) > len(one)
