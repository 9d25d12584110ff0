"""End to end: the Anthropic Messages API of a real `serve run serve_config.yaml`, driven with the
official `anthropic` client against the small SmolLM2 model (greedy, a few tokens).

Starts on a clean Ray (`ray stop` first: this stops any local Ray cluster on the machine) and stops
with SIGINT, as tests/test_serve_e2e.py does. This SDK's create() has no temperature parameter:
greedy decoding goes in extra_body.
"""

from __future__ import annotations

import anthropic
import jsonschema
import pytest

from .serve_helpers import BASE, start_serve, stop, wait_healthy

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
GREEDY = {"temperature": 0}
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
EVENT_ORDER = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve_run.log"
    proc = start_serve("serve_config.yaml", log)
    try:
        ready_s = wait_healthy(proc, log)
        print(f"serve run healthy after {ready_s:.1f}s")
        yield {"proc": proc, "log": log, "ready_s": ready_s}
    finally:
        stop(proc)


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


def test_a_matched_stop_sequence_reads_as_end_turn(client):
    """The engine does not say which stop string matched (nor that one did): see STOP_REASONS."""
    full = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, extra_body=GREEDY).content[0].text
    words = full.split()
    assert len(words) >= 2, full
    cut = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, stop_sequences=[words[1]],
                                 extra_body=GREEDY)
    assert cut.stop_reason == "end_turn" and cut.stop_sequence is None
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

    events = [e.type for e in client.messages.create(model=MODEL, max_tokens=16, messages=HELLO, stream=True,
                                                      extra_body=GREEDY)]
    collapsed = [t for i, t in enumerate(events) if i == 0 or t != events[i - 1]]
    assert collapsed == EVENT_ORDER, events


def test_a_bad_request_is_a_bad_request_error(client):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert "'image' content blocks are not supported" in info.value.body["error"]["message"]
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


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = [{"name": "get_weather", "description": "The current weather of a city.", "input_schema": WEATHER_SCHEMA}]


def test_tool_use_round_trip(client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    msg = client.messages.create(model=MODEL, max_tokens=16, messages=[question], tools=WEATHER,
                                 tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and uses, msg
    assert uses[0].name == "get_weather" and uses[0].id
    jsonschema.validate(uses[0].input, WEATHER_SCHEMA)

    result = {"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees and sunny"}
    answer = client.messages.create(model=MODEL, max_tokens=16, tools=WEATHER, extra_body=GREEDY, messages=[
        question, {"role": "assistant", "content": msg.content}, {"role": "user", "content": [result]}])
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()
