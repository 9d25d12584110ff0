"""Extended thinking and stop sequences on the Anthropic Messages routes, driven by the official
`anthropic` SDK over an in-process ASGI transport with a scripted replica (tests/fakes.py): the
`thinking` parameter as the prompt's switch and the request's cap, thinking blocks created and
streamed before the text, earlier turns' thinking left out of the prompt, and `stop_sequence`."""

from __future__ import annotations

import anthropic
import httpx2

from deployments.config import RouterConfig
from deployments.router import RouterCore, create_app
from tests.fakes import USAGE, FakeClient, chunk

HI = [{"role": "user", "content": "hi"}]
THINKS = {"tools": "hermes", "reasoning": "think", "in_reasoning": True}


def thinking_answer(last_extra: dict | None = None) -> list:
    """A replica's chunks: reasoning the prompt opened, split mid-tag, then the answer."""
    return [
        {**chunk("Two plus two"), "format": THINKS},
        chunk(" is four.\n</thi"),
        chunk("nk>\n\nIt is 4."),
        {**chunk("", 1, "stop", USAGE), **(last_extra or {})},
    ]


def sdk_for(items: list) -> tuple[anthropic.AsyncAnthropic, FakeClient]:
    fake = FakeClient("m1", items)
    core = RouterCore(RouterConfig.model_validate({}), {"m1": fake})
    transport = httpx2.ASGITransport(app=create_app(core))
    client = anthropic.AsyncAnthropic(
        api_key="k",
        base_url="http://test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://test"),
    )
    return client, fake


async def test_thinking_enabled_turns_thinking_on_caps_it_and_comes_back_as_a_thinking_block():
    client, fake = sdk_for(thinking_answer())
    msg = await client.messages.create(
        model="m1", max_tokens=64, messages=HI, thinking={"type": "enabled", "budget_tokens": 16}
    )
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Two plus two is four." and msg.content[0].signature == ""
    assert msg.content[1].text == "It is 4." and msg.stop_reason == "end_turn"
    sent = fake.payloads[0]
    assert sent["prompt"]["thinking"] is True and sent["sampling"]["max_thinking_tokens"] == 16

    await client.messages.create(model="m1", max_tokens=64, messages=HI, thinking={"type": "disabled"})
    assert fake.payloads[1]["prompt"]["thinking"] is False and "max_thinking_tokens" not in fake.payloads[1]["sampling"]


async def test_a_streamed_thinking_block_comes_first_and_ends_with_its_signature():
    client, _ = sdk_for(thinking_answer())
    events = [e async for e in await client.messages.create(model="m1", max_tokens=64, messages=HI, stream=True)]
    kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in events]
    thinking_start = next(e for e in events if e.type == "content_block_start")
    assert thinking_start.content_block.type == "thinking" and thinking_start.index == 0
    assert ("content_block_delta", "thinking_delta") in kinds
    signature = kinds.index(("content_block_delta", "signature_delta"))
    assert kinds[signature + 1] == ("content_block_stop", None)
    assert kinds.index(("content_block_delta", "text_delta")) > signature

    async with client.messages.stream(model="m1", max_tokens=64, messages=HI) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Two plus two is four." and final.content[1].text == "It is 4."


async def test_earlier_turns_thinking_blocks_are_accepted_and_left_out_of_the_prompt():
    client, fake = sdk_for(thinking_answer())
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "They greet me.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Hello!"},
            ],
        },
        {"role": "user", "content": "2+2?"},
    ]
    await client.messages.create(model="m1", max_tokens=64, messages=history)
    assert fake.payloads[0]["prompt"]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]


async def test_the_request_s_stop_sequence_that_matched_is_named_created_or_streamed():
    client, _ = sdk_for(thinking_answer({"stop_sequence": "###"}))
    msg = await client.messages.create(model="m1", max_tokens=64, messages=HI, stop_sequences=["END", "###"])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "###"
    async with client.messages.stream(model="m1", max_tokens=64, messages=HI, stop_sequences=["###"]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "###"


async def test_a_stop_string_of_the_model_s_own_ends_the_turn():
    client, _ = sdk_for(thinking_answer({"stop_sequence": "<|im_end|>"}))
    msg = await client.messages.create(model="m1", max_tokens=64, messages=HI, stop_sequences=["###"])
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
