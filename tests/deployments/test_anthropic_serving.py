"""The Anthropic Messages routes without a model: the router's events rendered as a message and as
SSE events, and the routes driven by the official `anthropic` SDK over an in-process ASGI
transport with scripted model clients (tests/fakes.py's FakeClient). The real model:
tests/e2e (the agent APIs)."""

from __future__ import annotations

import json

import anthropic
import httpx
import httpx2
import pytest

from deployments.anthropic import serving
from deployments.anthropic.serving import MessageEvents, stream_events, to_message
from deployments.config import RouterConfig
from deployments.events import Error, Finish, Logprobs, TextDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart, Usage
from deployments.http.errors import ApiError
from deployments.router import RouterCore, create_app
from engine.request import PromptInput
from tests.fakes import HOT, OVERLOADED, USAGE, FakeClient, chunk, closing_batches

HI = [{"role": "user", "content": "hi"}]
BASE = {"model": "m1", "max_tokens": 8, "messages": HI}


class CountingClient(FakeClient):
    """A FakeClient whose replica also counts tokens: one per character of the messages' text."""

    async def count_tokens(self, prompt, timeout_s, load=False):
        self.payloads.append(prompt)
        return sum(len(m["content"]) for m in prompt.messages)


def make_core(router=None, **clients) -> RouterCore:
    return RouterCore(RouterConfig.model_validate(router or {}), clients or {"m1": CountingClient("m1")})


def sdk(core: RouterCore, api_key: str = "k") -> anthropic.AsyncAnthropic:
    transport = httpx2.ASGITransport(app=create_app(core))
    return anthropic.AsyncAnthropic(
        api_key=api_key,
        base_url="http://test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://test"),
    )


def raw(core: RouterCore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test")


# --- OpenAI → Anthropic ----------------------------------------------------------------------


def whole(text: str = "", calls: list[tuple] = (), finish: str = "stop", usage: dict = USAGE) -> list:
    """A whole response's events (`events.collect`): `calls` as (id, name, arguments) triples."""
    events = [TextDelta(text), Logprobs([])]
    for i, (call_id, name, arguments) in enumerate(calls):
        events += [
            ToolCallStart(i, call_id, name),
            ToolCallArgsDelta(i, json.dumps(arguments)),
            ToolCallEnd(i, arguments),
        ]
    return events + [Finish(finish), Usage(usage)]


def test_text_response_with_usage_and_cache_reads():
    msg = to_message(whole("Hello!"), "msg_abc", "m1")
    assert msg == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "m1",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 2,
            "output_tokens": 3,
            "cache_read_input_tokens": 1,
            "cache_creation_input_tokens": 0,
        },
    }


@pytest.mark.parametrize(
    "finish,reason",
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")],
)
def test_stop_reasons(finish, reason):
    assert to_message(whole("x", finish=finish), "msg_1", "m1")["stop_reason"] == reason


WEATHER_CALL = ("call_1", "get_weather", {"city": "Paris"})


def test_tool_calls_become_tool_use_blocks_with_parsed_input():
    calls = [WEATHER_CALL, ("call_2", "now", {})]
    msg = to_message(whole(calls=calls, finish="tool_calls"), "msg_1", "m1")
    assert msg["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
    ]
    assert msg["stop_reason"] == "tool_use"
    forced = to_message(whole(calls=calls, finish="stop"), "msg_1", "m1")  # a named tool_choice
    assert forced["stop_reason"] == "tool_use"
    bad = [("c", "f", [1, 2])]
    with pytest.raises(ApiError) as info:
        to_message(whole(calls=bad, finish="tool_calls"), "msg_1", "m1")
    assert info.value.status_code == 502


# --- the stream's events -----------------------------------------------------------------------


def call(index: int, call_id: str, name: str, arguments) -> list:
    """One complete call's events, as the event stream has them."""
    text = json.dumps(arguments)
    return [ToolCallStart(index, call_id, name), ToolCallArgsDelta(index, text), ToolCallEnd(index, arguments)]


def events_of(batches: list[list]) -> list[tuple[str, dict]]:
    events = MessageEvents("msg_abc", "m1", 3)
    out = events.start()
    for batch in batches:
        out += events.feed(batch)
    for name, data in out:
        assert data["type"] == name
    return out


def test_text_stream_event_sequence():
    out = events_of(
        [
            [],
            [TextDelta("Hel")],
            [TextDelta("lo")],
            [Finish("length")],
            [Usage(USAGE)],
        ]
    )
    assert [n for n, _ in out] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = out[0][1]["message"]
    assert start["id"] == "msg_abc" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 3, "output_tokens": 0}
    assert out[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert out[3][1] == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}
    assert out[5][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert out[5][1]["usage"] == {
        "input_tokens": 2,
        "output_tokens": 3,
        "cache_read_input_tokens": 1,
        "cache_creation_input_tokens": 0,
    }


def test_tool_call_stream_event_sequence():
    out = events_of(
        [
            [TextDelta("Let me check.")],
            [ToolCallStart(0, "call_1", "get_weather")],
            [ToolCallArgsDelta(0, '{"city": ')],
            [ToolCallArgsDelta(0, '"Paris"}'), ToolCallEnd(0, {"city": "Paris"})],
            [ToolCallStart(1, "call_2", "now"), ToolCallArgsDelta(1, "{}"), ToolCallEnd(1, {})],
            [Finish("tool_calls")],
            [Usage(USAGE)],
        ]
    )
    names = [n for n, _ in out]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert out[4][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
    }
    partial = [d["delta"]["partial_json"] for n, d in out if n == "content_block_delta" and d["index"] == 1]
    assert json.loads("".join(partial)) == {"city": "Paris"}
    assert out[8][1]["index"] == 2 and out[8][1]["content_block"]["id"] == "call_2"
    assert out[9][1]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    assert out[11][1]["delta"]["stop_reason"] == "tool_use"
    forced = events_of([call(0, "call_1", "f", {}), [Finish("stop")], [Usage(USAGE)]])
    assert forced[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_closing_the_sse_body_closes_the_chunks():
    """A client that goes away closes the body; the batches' own close is what cancels the model call."""
    closed = []
    body = stream_events(closing_batches(closed), MessageEvents("msg_1", "m1", 3))
    assert (await body.__anext__()).startswith(b"event: message_start\n")
    await body.__anext__()
    await body.aclose()
    assert closed == [True]


def test_an_error_mid_stream_is_an_error_event():
    engine_error = ApiError(500, "engine died", type="server_error")
    out = events_of([[TextDelta("a")], [Error(engine_error)]])
    assert [n for n, _ in out] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert out[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "engine died"}}


# --- the routes, through the official SDK ------------------------------------------------------


async def test_sdk_create_and_stream_a_text_answer():
    core = make_core()
    client = sdk(core)
    msg = await client.messages.create(
        model="m1", max_tokens=4, system="Be brief.", messages=HI, stop_sequences=["END"], extra_body={"temperature": 0}
    )
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == "m1"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello!"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (2, 1, 3)
    payload = core.models["m1"].payloads[0]
    assert payload["request_id"] == "chatcmpl-" + msg.id.removeprefix("msg_")
    assert payload["prompt"] == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    }
    assert payload["sampling"] == {"max_tokens": 4, "temperature": 0.0, "stop": ["END"]}

    async with client.messages.stream(model="m1", max_tokens=4, messages=HI) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text == "Hello!"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3 and final.usage.input_tokens == 2

    raw_events = [e async for e in await client.messages.create(model="m1", max_tokens=4, messages=HI, stream=True)]
    assert [e.type for e in raw_events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert raw_events[0].message.usage.input_tokens == 3  # the whole prompt, before the cache read is known


async def test_the_sse_framing_names_each_event():
    async with raw(make_core()) as client:
        r = await client.post("/v1/messages", json={**BASE, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f]
    assert frames[0].startswith("event: message_start\ndata: {")
    assert frames[-1] == 'event: message_stop\ndata: {"type":"message_stop"}'
    for frame in frames:
        name, data = frame.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


class ScriptedCore(RouterCore):
    """A router whose calls answer with scripted events (tool calls, before the engine has them)."""

    def __init__(self, whole: list, batches: list[list]):
        super().__init__(RouterConfig.model_validate({}), {"m1": CountingClient("m1")})
        self.whole, self.batches = whole, batches

    async def collect(self, call, parser):
        await call.close()
        return self.whole

    async def stream(self, call, parser):
        await call.close()
        for batch in self.batches:
            yield batch


async def test_sdk_reads_tool_use_blocks_created_and_streamed(monkeypatch):
    core = ScriptedCore(
        whole(calls=[WEATHER_CALL], finish="tool_calls"),
        [
            [],
            [ToolCallStart(0, "call_1", "get_weather")],
            [ToolCallArgsDelta(0, '{"city"')],
            [ToolCallArgsDelta(0, ': "Paris"}'), ToolCallEnd(0, {"city": "Paris"})],
            [Finish("tool_calls")],
            [Usage(USAGE)],
        ],
    )
    core.requests = []  # the chat requests the Messages requests became

    def to_chat_request(req):
        core.requests.append(translate(req))
        return core.requests[-1]

    translate = serving.to_chat_request
    monkeypatch.setattr(serving, "to_chat_request", to_chat_request)
    client = sdk(core)
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    msg = await client.messages.create(
        model="m1", max_tokens=16, messages=HI, tools=tools, tool_choice={"type": "tool", "name": "get_weather"}
    )
    assert core.requests[0].tool_choice.model_dump() == {"type": "function", "function": {"name": "get_weather"}}
    assert core.requests[0].plan.forced is not None  # the named call is forced
    assert msg.stop_reason == "tool_use" and msg.content[0].type == "tool_use"
    use = msg.content[0]
    assert (use.id, use.name, use.input) == ("call_1", "get_weather", {"city": "Paris"})
    async with client.messages.stream(model="m1", max_tokens=16, messages=HI, tools=tools) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and len(final.content) == 1
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris"}


async def test_sdk_raises_its_typed_errors():
    client = sdk(
        make_core(m1=CountingClient("m1"), busy=FakeClient("busy", [OVERLOADED]), hot=FakeClient("hot", [HOT]))
    )
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="m1", max_tokens=4, messages=HI, extra_body={"bogus": 1})
    assert bad.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bogus: unknown field"},
    }
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="nope", max_tokens=4, messages=HI)
    assert missing.value.body["error"]["type"] == "not_found_error" and "m1" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.ServiceUnavailableError) as busy:
        await client.messages.create(model="busy", max_tokens=4, messages=HI)
    assert busy.value.body["error"] == {"type": "overloaded_error", "message": "queue full"}
    assert busy.value.response.headers["retry-after"] == "2"
    with pytest.raises(anthropic.BadRequestError, match="temperature: too hot"):
        await client.messages.create(model="hot", max_tokens=4, messages=HI, stream=True)


async def test_an_engine_failure_mid_stream_raises_in_the_sdk():
    died = {
        "error": {"message": "engine died", "type": "server_error", "param": None, "code": None},
        "status_code": 503,
    }
    client = sdk(make_core(m1=FakeClient("m1", [chunk("Hel"), died])))
    seen = []
    with pytest.raises(anthropic.APIStatusError) as info:
        async for event in await client.messages.create(model="m1", max_tokens=4, messages=HI, stream=True):
            seen.append(event.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    # a mid-stream error has no status of its own: the type comes from the OpenAI type
    assert info.value.body == {"type": "error", "error": {"type": "api_error", "message": "engine died"}}


async def test_api_key_as_x_api_key_or_bearer_and_the_body_limit():
    core = make_core({"api_key": "secret-key-123", "max_request_body_bytes": 2048})
    with pytest.raises(anthropic.AuthenticationError) as denied:
        await sdk(core, api_key="wrong").messages.create(model="m1", max_tokens=4, messages=HI)
    assert denied.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in denied.value.body["error"]["message"]
    assert (await sdk(core, api_key="secret-key-123").messages.create(model="m1", max_tokens=4, messages=HI)).content
    async with raw(core) as client:
        keyed = await client.post("/v1/messages", json=BASE, headers={"x-api-key": "secret-key-123"})
        wrong = await client.post(
            "/v1/messages/count_tokens", json={"model": "m1", "messages": HI}, headers={"x-api-key": "secret-key-12"}
        )
        none = await client.post("/v1/messages", json=BASE)
        big = await client.post(
            "/v1/messages",
            headers={"x-api-key": "secret-key-123"},
            json={**BASE, "messages": [{"role": "user", "content": "x" * 5000}]},
        )
        junk = await client.post("/v1/messages", content=b"{not json", headers={"x-api-key": "secret-key-123"})
    assert keyed.status_code == 200 and keyed.json()["content"][0]["text"] == "Hello!"
    assert wrong.status_code == 401 and none.status_code == 401
    assert big.status_code == 413 and big.json() == {
        "type": "error",
        "error": {"type": "request_too_large", "message": "the request body is larger than 2048 bytes"},
    }
    assert junk.status_code == 400 and junk.json()["type"] == "error"
    assert "not valid JSON" in junk.json()["error"]["message"]


async def test_count_tokens_through_the_replica():
    core = make_core()
    client = sdk(core)
    counted = await client.messages.count_tokens(model="m1", system="ab", messages=HI)
    assert counted.input_tokens == 4  # CountingClient: one per character of "ab" and "hi"
    assert core.models["m1"].payloads == [
        PromptInput(messages=[{"role": "system", "content": "ab"}, {"role": "user", "content": "hi"}])
    ]
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.count_tokens(model="nope", messages=HI)
    await client.messages.count_tokens(model="m1", messages=HI, thinking={"type": "disabled"})
    assert core.models["m1"].payloads[-1] == PromptInput(messages=[{"role": "user", "content": "hi"}], thinking=False)


async def test_an_unexpected_failure_is_a_500_in_anthropics_shape():
    class Broken(CountingClient):
        async def count_tokens(self, prompt, timeout_s, load=False):
            raise RuntimeError("bug")

    with pytest.raises(anthropic.InternalServerError) as info:
        await sdk(make_core(m1=Broken("m1"))).messages.count_tokens(model="m1", messages=HI)
    assert info.value.status_code == 500
    assert info.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "internal error: RuntimeError"},
    }


async def test_metrics_count_messages_requests():
    core = make_core()
    client = sdk(core)
    await client.messages.create(model="m1", max_tokens=4, messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model="m1", max_tokens=4, messages=HI, extra_body={"bogus": 1})
    text = core.metrics.render().decode()
    assert 'orchard_requests_total{endpoint="messages",model="m1",status="200"} 1.0' in text
    assert 'orchard_requests_total{endpoint="messages",model="-",status="400"} 1.0' in text
    assert 'orchard_completion_tokens_total{model="m1"} 3.0' in text
