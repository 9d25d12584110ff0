"""POST /v1/messages and /v1/messages/count_tokens: a Messages request in, the router's events out
as an Anthropic message or its SSE events.

The request becomes the chat request its prompt is built from (`protocol.to_chat_request`) and
runs like any other (`RouterCore.start`); what comes back is the router's event stream, rendered
here: thinking, text and tool_use content blocks, the stop reason, Anthropic's usage (cache reads
apart), and every error in Anthropic's shape. Only shapes are translated: sampling, templates and
tokens stay in the engine.

Thinking blocks carry the model's reasoning whenever it wrote some (a model that thinks by
default does so without the request's `thinking`), before the text and tool_use blocks. Their
`signature` is empty: we keep no secret to sign with and never check one (earlier turns'
thinking is left out of the prompt); streamed, the block still ends with its `signature_delta`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..events import (
    Error,
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from ..hop import GenerateRequest
from ..http.auth import check_api_key
from ..http.errors import ApiError, anthropic_error_body, anthropic_error_response
from ..http.sse import event_stream, sse_event
from ..openai.builders import new_id
from ..settings import LOADED_CALL_TIMEOUT_S
from .protocol import (
    CountTokensRequest,
    MessagesRequest,
    image_refs,
    parse,
    prompt_input,
    sampling,
    to_chat_request,
)

log = logging.getLogger("ray.serve")

# "stop" is the end of the turn (EOS) or a matched stop string: the engine names the string
# (`Finish.stop_sequence`), and one of the request's stop_sequences is "stop_sequence"; one of the
# model's own stop strings (its default_sampling) reads as end_turn. "abort" only happens once the
# client went away.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
SIGNATURE = ""  # thinking blocks' signature: see the module docstring


def stop_reason(finish: Finish | None, used_tools: bool = False, stop_sequences=()) -> tuple[str, str | None]:
    """The stop reason and the stop sequence that matched. `used_tools`: the answer has tool_use
    blocks (a forced, named tool call may finish "stop"); `stop_sequences`: the request's."""
    reason = finish.reason if finish is not None else None
    if used_tools and reason in (None, "stop"):
        return "tool_use", None
    matched = finish.stop_sequence if finish is not None else None
    if reason == "stop" and matched is not None and matched in stop_sequences:
        return "stop_sequence", matched
    return STOP_REASONS.get(reason or "stop", "end_turn"), None


def message_id(openai_id: str) -> str:
    """msg_<hex> with the request's hex, so that the engine's logs name the same request."""
    return "msg_" + openai_id.partition("-")[2]


def usage(u: dict | None) -> dict[str, int]:
    """Anthropic counts cache reads apart: input_tokens + cache_read_input_tokens is the prompt."""
    u = u or {}
    prompt, cached = u.get("prompt_tokens", 0), (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": u.get("completion_tokens", 0),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def tool_input(model: str, arguments: Any) -> dict[str, Any]:
    """A tool_use block's input: the call's arguments, which Anthropic requires to be an object."""
    if not isinstance(arguments, dict):
        raise ApiError(
            502, f"model {model!r} produced tool call arguments that are not a JSON object", type="server_error"
        )
    return arguments


def to_message(events: list[Event], msg_id: str, model: str, stop_sequences=()) -> dict[str, Any]:
    """An Anthropic message from a whole response (`output.collect`'s batch)."""
    thinking = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    content: list[dict[str, Any]] = (
        [{"type": "thinking", "thinking": thinking, "signature": SIGNATURE}] if thinking else []
    )
    content += [{"type": "text", "text": text}] if text else []
    starts = {e.index: e for e in events if isinstance(e, ToolCallStart)}
    for e in events:
        if isinstance(e, ToolCallEnd):
            start = starts[e.index]
            content.append(
                {"type": "tool_use", "id": start.id, "name": start.name, "input": tool_input(model, e.arguments)}
            )
    finish = next((e for e in events if isinstance(e, Finish)), None)
    reason, matched = stop_reason(finish, any(b["type"] == "tool_use" for b in content), stop_sequences)
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": matched,
        "usage": usage(next((e.usage for e in events if isinstance(e, Usage)), None)),
    }


class MessageEvents:
    """Turns one response's event batches into Anthropic stream events, (name, data) pairs.

    The state is the open content block: a thinking block, a text block, or the tool_use block of
    one call. Another kind of output, or another call, closes the block (a thinking block with its
    signature_delta) and opens the next; `Usage` (the end) closes the last one and sends
    message_delta and message_stop.
    """

    def __init__(self, msg_id: str, model: str, prompt_tokens: int, stop_sequences=()):
        self.msg_id, self.model, self.prompt_tokens = msg_id, model, prompt_tokens
        self.stop_sequences = tuple(stop_sequences)
        self.index = -1
        self.open: tuple[str, int | None] | None = None
        self.finish: Finish | None = None
        self.used_tools = False

    def start(self) -> list[tuple[str, dict]]:
        """message_start: the message with no content yet; input_tokens is the whole prompt here
        (the cached part is known at the end, and message_delta corrects it)."""
        message = {
            "id": self.msg_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def feed(self, batch: list[Event]) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        for event in batch:
            out += self._event(event)
        return out

    def _event(self, e: Event) -> list[tuple[str, dict]]:
        if isinstance(e, ReasoningDelta) and e.text:
            block = {"type": "thinking", "thinking": "", "signature": ""}
            return self._open(("thinking", None), block) + [self._delta({"type": "thinking_delta", "thinking": e.text})]
        if isinstance(e, TextDelta) and e.text:
            return self._open(("text", None), {"type": "text", "text": ""}) + [
                self._delta({"type": "text_delta", "text": e.text})
            ]
        if isinstance(e, ToolCallStart):
            self.used_tools = True
            return self._open(("tool_use", e.index), {"type": "tool_use", "id": e.id, "name": e.name, "input": {}})
        if isinstance(e, ToolCallArgsDelta) and e.text:
            return [self._delta({"type": "input_json_delta", "partial_json": e.text})]
        if isinstance(e, Finish):
            self.finish = e
        elif isinstance(e, Usage):
            return self._finish(e.usage)
        elif isinstance(e, Error):
            return [("error", anthropic_error_body(e.error.body))]
        return []

    def _open(self, key: tuple[str, int | None], block: dict) -> list[tuple[str, dict]]:
        if self.open == key:
            return []
        events = self._close()
        self.index += 1
        self.open = key
        return events + [
            ("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})
        ]

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def _close(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        signed = (
            [self._delta({"type": "signature_delta", "signature": SIGNATURE})] if self.open[0] == "thinking" else []
        )
        self.open = None
        return signed + [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _finish(self, u: dict | None) -> list[tuple[str, dict]]:
        """The end: close the open block, then message_delta and message_stop."""
        reason, matched = stop_reason(self.finish, self.used_tools, self.stop_sequences)
        delta = {"stop_reason": reason, "stop_sequence": matched}
        return self._close() + [
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(u)}),
            ("message_stop", {"type": "message_stop"}),
        ]


async def stream_events(batches: AsyncIterator[list[Event]], events: MessageEvents) -> AsyncIterator[bytes]:
    """The SSE body; closing it (the client went away) closes the batches, which cancels the call."""
    try:
        for name, data in events.start():
            yield sse_event(name, data)
        async for batch in batches:
            for name, data in events.feed(batch):
                yield sse_event(name, data)
    finally:
        await batches.aclose()


# --- routes ----------------------------------------------------------------------------------


async def create_message(core, request: Request) -> Response:
    """POST /v1/messages; the metrics count it as "messages"."""
    start, model = time.monotonic(), "-"
    try:
        req = parse(await core.read_body(request), MessagesRequest)
        model = req.model
        chat = to_chat_request(req)
        request_id = new_id("chatcmpl")
        images = await core.images.load(image_refs(req))
        generate = GenerateRequest(prompt_input(req, chat, images), sampling(req, chat), request_id)
        call = await core.start(model, generate, start)
        msg_id, stops = message_id(request_id), req.stop_sequences or ()
        if req.stream:
            events = MessageEvents(msg_id, model, call.prompt_tokens or 0, stops)
            response = event_stream(stream_events(core.stream(call, chat.parsing()), events))
        else:
            whole = await core.collect(call, chat.parsing())
            response = JSONResponse(to_message(whole, msg_id, model, stops))
    except ApiError as exc:
        core.observe(model, "messages", exc.status_code)
        raise
    core.observe(model, "messages", 200)
    return response


async def count_tokens(core, request: Request) -> dict[str, int]:
    """POST /v1/messages/count_tokens: the prompt's tokens through the model's chat template, counted
    by its replica without generating. An unloaded model is loaded first, like /v1/models/{name}/load."""
    req = parse(await core.read_body(request), CountTokensRequest)
    model, _ = core.resolve(req.model)  # an adapter's prompt is its base's tokens
    client = core.client(model)
    prompt = prompt_input(req, to_chat_request(req), await core.images.load(image_refs(req)))
    load_timeout = core.load_timeout(model)
    core.touch(model)
    n = await client.count_tokens(
        prompt, timeout_s=load_timeout or LOADED_CALL_TIMEOUT_S, load=load_timeout is not None
    )
    return {"input_tokens": n}


async def _answer(core, request: Request, handler) -> Response:
    """Runs a route's handler; every error, unexpected ones included, in Anthropic's shape. The API
    key may come as `x-api-key` (Anthropic's header) or as a bearer token."""
    try:
        check_api_key(request, core.api_key, x_api_key=True)
        result = await handler(core, request)
        return result if isinstance(result, Response) else JSONResponse(result)
    except ApiError as exc:
        return anthropic_error_response(exc)
    except Exception as exc:  # noqa: BLE001 - a 500 in Anthropic's shape, not the OpenAI one
        log.exception("unexpected error in %s", request.url.path)
        return anthropic_error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def install_anthropic_routes(app: FastAPI, core) -> None:
    """Registers POST /v1/messages and /v1/messages/count_tokens on the router's app."""

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await _answer(core, request, create_message)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request):
        return await _answer(core, request, count_tokens)
