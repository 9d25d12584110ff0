"""The Responses request (deployments.responses.protocol) and the chat request it becomes
(deployments.responses.convert): items as chat messages, what is refused by name, field names."""

from __future__ import annotations

import json

import pytest

from deployments.http.errors import ApiError
from deployments.responses.convert import check_calls, stored_items, to_chat_request
from deployments.responses.protocol import parse

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def body(**fields) -> bytes:
    return json.dumps({"model": "m1", "input": "hi", **fields}).encode()


def chat(**fields):
    req = parse(body(**fields))
    items = req.items()
    check_calls(items, 0)
    return to_chat_request(req, items)


def refused(**fields) -> dict:
    with pytest.raises(ApiError) as info:
        chat(**fields)
    assert info.value.status_code == 400
    return info.value.body["error"]


def test_a_string_input_is_one_user_turn_after_the_instructions():
    req = chat(instructions="Be brief.", max_output_tokens=5, temperature=0.0, top_p=0.5)
    assert req.prompt_input().messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert req.sampling() == {"max_tokens": 5, "temperature": 0.0, "top_p": 0.5}


def test_items_become_chat_turns_and_an_assistant_message_with_its_calls_is_one_turn():
    items = [
        {"role": "developer", "content": "Use tools."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Paris?"}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}],
        },
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
    ]
    req = chat(input=items, tools=[WEATHER])
    call = lambda i, city: {  # noqa: E731 - a table of two rows
        "id": i,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }
    assert req.prompt_input().messages == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c1", "Paris"), call("c2", "Lyon")]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "tool", "content": "rain", "tool_call_id": "c2"},
    ]
    assert req.prompt_input().tools == [
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    ]
    assert req.plan.forced is None and req.parsing().tools == ("get_weather",)


def test_tool_choice_and_text_format_are_the_chat_request_s():
    forced = chat(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    assert forced.plan.forced is not None and forced.parsing().forced
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    shaped = chat(text={"format": {"type": "json_schema", "name": "s", "schema": schema, "strict": True}})
    assert shaped.sampling()["guided"] == {"json_schema": schema}
    assert chat(text={"format": {"type": "json_object"}}).sampling()["guided"] == {"json_object": True}
    assert "guided" not in chat(text={"format": {"type": "text"}}).sampling()


def test_chat_path_errors_name_the_responses_fields():
    err = refused(
        tools=[WEATHER], tool_choice="required", text={"format": {"type": "json_schema", "name": "s", "schema": {}}}
    )
    assert err["param"] == "text.format" and err["message"].startswith("text.format: cannot be combined")
    assert refused(tool_choice={"type": "function", "name": "nope"}, tools=[WEATHER])["param"] == "tool_choice"


def test_built_in_tools_are_refused_naming_each():
    err = refused(tools=[WEATHER, {"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["v"]}])
    assert err["param"] == "tools.1.type" and err["code"] == "unsupported_tool"
    assert "web_search (tools.1)" in err["message"] and "file_search (tools.2)" in err["message"]
    for kind in ("code_interpreter", "computer_use_preview", "image_generation", "mcp", "local_shell"):
        assert kind in refused(tools=[{"type": kind}])["message"]
    assert "'web_search_preview'" in refused(tools=[WEATHER], tool_choice={"type": "web_search_preview"})["message"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning.summary"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "p"}}, "prompt"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity"),
    ],
)
def test_fields_this_server_does_not_implement_are_refused_by_name(fields, param):
    err = refused(**fields)
    assert err["param"] == param and err["code"] == "unsupported_parameter", err


def test_malformed_or_unsupported_items_name_their_field():
    assert refused(input=[{"type": "function_call", "name": "f", "arguments": "{}"}])["param"] == "input.0.call_id"
    file = {"type": "input_file", "file_id": "file-1"}
    err = refused(input=[{"role": "user", "content": [file]}])
    assert err["param"] == "input.0.content" and "'input_file' content parts are not supported" in err["message"]
    assert (
        "'item_reference' items are not supported" in refused(input=[{"type": "item_reference", "id": "x"}])["message"]
    )
    assert "unknown item type 'nope'" in refused(input=[{"type": "nope"}])["message"]
    assert refused(input=[{"role": "robot", "content": "x"}])["param"] == "input.0.role"
    assert refused(input=[])["param"] == "input"
    assert refused(include=["reasoning.encrypted_content"])["param"] == "include"
    assert refused(extra=1)["param"] == "extra"


def test_a_function_call_output_for_no_call_names_its_call_id():
    err = refused(
        input=[{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c9", "output": "1"}]
    )
    assert err["param"] == "input.1.call_id" and "'c9'" in err["message"]
    # with a previous response's items ahead, the index is still the request's own
    earlier = stored_items([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}])
    req = parse(body(input=[{"type": "function_call_output", "call_id": "c1", "output": "1"}]))
    check_calls(earlier + req.items(), 1)
    with pytest.raises(ApiError, match="input.0.call_id"):
        check_calls(stored_items([]) + req.items(), 0)
