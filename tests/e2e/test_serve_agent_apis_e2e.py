"""End to end, what agents use, on a real `serve run serve_config.yaml` with the small SmolLM2 model
(greedy, few tokens): the Anthropic Messages API through the official `anthropic` client, and
structured output, tool calls and logprobs through the official `openai` client.

Runs on the shared `serve run` (tests/e2e/conftest.default_server), which test_serve_e2e also
uses, in either order. This SDK's create() has no temperature parameter: greedy decoding goes in
extra_body.
"""

from __future__ import annotations

import concurrent.futures
import json

import anthropic
import jsonschema
import openai
import pytest

from .serving import BASE

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
GREEDY = {"temperature": 0}
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
EVENT_ORDER = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


@pytest.fixture(scope="module")
def server(default_server):
    return default_server.get()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=BASE, api_key="not-needed", max_retries=0, timeout=120)


def test_create_answers_with_text_usage_and_stop_reason(client):
    msg = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, extra_body=GREEDY)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert 1 <= msg.usage.output_tokens <= 16
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 10  # the templated prompt

    short = client.messages.create(model=MODEL, max_tokens=2, messages=HELLO, extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    assert msg.content[0].text.startswith(short.content[0].text)


def test_a_matched_stop_sequence_is_named(client):
    full = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, extra_body=GREEDY).content[0].text
    words = full.split()
    assert len(words) >= 2, full
    cut = client.messages.create(
        model=MODEL, max_tokens=16, messages=HELLO, stop_sequences=[words[1]], extra_body=GREEDY
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == words[1]
    assert words[1] not in cut.content[0].text and full.startswith(cut.content[0].text)


def test_stream_deltas_assemble_the_final_message(client):
    with client.messages.stream(model=MODEL, max_tokens=16, messages=HELLO, extra_body=GREEDY) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(deltas) >= 2 and "".join(deltas) == final.content[0].text
    reference = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, extra_body=GREEDY)
    assert final.content[0].text == reference.content[0].text
    assert final.stop_reason == reference.stop_reason
    assert final.usage.output_tokens == reference.usage.output_tokens

    events = [
        e.type
        for e in client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, stream=True, extra_body=GREEDY)
    ]
    collapsed = [t for i, t in enumerate(events) if i == 0 or t != events[i - 1]]
    assert collapsed == EVENT_ORDER, events


def test_a_bad_request_is_a_bad_request_error(client):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert "messages.0.content.0.source: not a decodable image" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="temperature"):  # refused by the engine's range check
        client.messages.create(model=MODEL, max_tokens=8, messages=HELLO, extra_body={"temperature": 5})


def test_an_unknown_model_is_a_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="claude-opus-17", max_tokens=8, messages=HELLO)
    assert info.value.body["error"]["type"] == "not_found_error" and MODEL in info.value.body["error"]["message"]


def test_count_tokens_agrees_with_the_usage_of_create(client):
    system = "You answer in French."
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=HELLO).input_tokens
    msg = client.messages.create(model=MODEL, max_tokens=1, system=system, messages=HELLO, extra_body=GREEDY)
    # Anthropic counts prefix-cache reads apart from input_tokens; together they are the prompt.
    assert counted == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    longer = [{"role": "user", "content": HELLO[0]["content"] + " Then say goodbye in another one."}]
    assert client.messages.count_tokens(model=MODEL, system=system, messages=longer).input_tokens > counted


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = [{"name": "get_weather", "description": "The current weather of a city.", "input_schema": WEATHER_SCHEMA}]


def test_tool_use_round_trip(client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    msg = client.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[question],
        tools=WEATHER,
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,
    )
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and uses, msg
    assert uses[0].name == "get_weather" and uses[0].id
    jsonschema.validate(uses[0].input, WEATHER_SCHEMA)

    result = {"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees and sunny"}
    answer = client.messages.create(
        model=MODEL,
        max_tokens=16,
        tools=WEATHER,
        extra_body=GREEDY,
        messages=[question, {"role": "assistant", "content": msg.content}, {"role": "user", "content": [result]}],
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()


# --- OpenAI: structured output, tools, logprobs ---------------------------------------------------

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "admin": {"type": "boolean"}},
                "required": ["id", "admin"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}, "passed": {"type": "boolean"}},
        "required": ["score", "passed"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -99, "maximum": 99},
                        "y": {"type": "integer", "minimum": -99, "maximum": 99},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
                "maxItems": 2,
            }
        },
        "required": ["points"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error"]},
            "code": {"type": "integer", "minimum": 100, "maximum": 599},
        },
        "required": ["status", "code"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 12}]}
        },
        "required": ["answer"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 24},
            "done": {"type": "boolean"},
            "priority": {"enum": [1, 2, 3]},
        },
        "required": ["title", "done", "priority"],
        "additionalProperties": False,
    },
]
OPENAI_WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The current weather of a city.", "parameters": WEATHER_SCHEMA},
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_json_schema_output_parses_and_validates(oai):
    """Every schema at once (they share the batch, each row under its own grammar)."""

    def ask(index: int):
        return oai.chat.completions.create(
            model=MODEL,
            temperature=0,
            max_tokens=120,
            messages=[
                {"role": "user", "content": f"Reply with a JSON object for this schema: {json.dumps(SCHEMAS[index])}"}
            ],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{index}", "schema": SCHEMAS[index], "strict": True},
            },
        )

    with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS)) as pool:
        answers = list(pool.map(ask, range(len(SCHEMAS))))
    for index, r in enumerate(answers):
        assert r.choices[0].finish_reason == "stop", (index, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[index])


def test_an_unconstrained_neighbour_of_constrained_requests_keeps_its_greedy_output(oai):
    free = dict(model=MODEL, temperature=0, max_tokens=24, messages=[{"role": "user", "content": "Name 3 colors."}])
    solo = oai.chat.completions.create(**free).choices[0].message.content
    constrained = dict(
        model=MODEL,
        temperature=0,
        max_tokens=60,
        messages=ASK_WEATHER,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}},
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(oai.chat.completions.create, **constrained) for _ in range(3)]
        beside = pool.submit(oai.chat.completions.create, **free)
        for job in jobs:
            jsonschema.validate(json.loads(job.result().choices[0].message.content), SCHEMAS[0])
    assert beside.result().choices[0].message.content == solo


def test_tool_choice_required_gives_a_call_whose_arguments_validate(oai):
    r = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=64, messages=ASK_WEATHER, tools=[OPENAI_WEATHER], tool_choice="required"
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    # SmolLM2 repeats the call (~31 tokens each): at 45 tokens the second is cut off, and a forced
    # call cut off is dropped, never shown as content.
    cut = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=45, messages=ASK_WEATHER, tools=[OPENAI_WEATHER], tool_choice="required"
    ).choices[0]
    assert cut.message.content is None and cut.finish_reason in ("length", "tool_calls"), cut
    assert [c.function.name for c in cut.message.tool_calls] == ["get_weather"], cut


def test_streamed_tool_calls_assemble_to_the_same_call(oai):
    args = dict(
        model=MODEL,
        temperature=0,
        max_tokens=64,
        messages=ASK_WEATHER,
        tools=[OPENAI_WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    whole = oai.chat.completions.create(**args).choices[0].message.tool_calls
    calls, finish = {}, None
    for c in oai.chat.completions.create(**args, stream=True):
        for tc in c.choices[0].delta.tool_calls or [] if c.choices else []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = (c.choices[0].finish_reason if c.choices else None) or finish
    assert finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": t.function.name, "arguments": t.function.arguments} for t in whole
    ]


def test_a_full_tool_round_trip(oai):
    call = (
        oai.chat.completions.create(
            model=MODEL,
            temperature=0,
            max_tokens=64,
            messages=ASK_WEATHER,
            tools=[OPENAI_WEATHER],
            tool_choice="required",
        )
        .choices[0]
        .message
    )
    history = (
        ASK_WEATHER
        + [call.model_dump(exclude_none=True)]
        + [
            {"role": "tool", "tool_call_id": tc.id, "content": '{"temp_c": 18, "sky": "sunny"}'}
            for tc in call.tool_calls
        ]
    )
    final = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=24, messages=history, tools=[OPENAI_WEATHER]
    )
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")


def test_logprobs_are_there_and_match_the_chosen_tokens(oai):
    r = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=8, messages=HELLO, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    # mlx_lm's streaming detokenizer drops the first token's leading space from the text
    assert "".join(t.token for t in content).strip() == r.choices[0].message.content.strip()
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the best
    text = oai.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    ).choices[0]
    assert "".join(text.logprobs.tokens).strip() == text.text.strip() and len(text.logprobs.top_logprobs[0]) == 2
