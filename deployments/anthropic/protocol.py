"""The Anthropic Messages API (POST /v1/messages and /v1/messages/count_tokens) as an adapter over
the OpenAI chat path.

A Messages body becomes an OpenAI chat request (`to_chat_request`), RouterCore runs it like any
/v1/chat/completions request, and its chat.completion (or its chunks) becomes an Anthropic message
(`to_message`) or its SSE events (`MessageEvents`). Only shapes are translated here: sampling,
templates and tokens stay in the engine. Bodies are parsed as strictly as the OpenAI ones: an
unknown field, or a feature this server does not implement (images, documents, extended thinking,
server tools, a prefilled assistant turn), is a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..openai.protocol import ApiError, ChatCompletionRequest, bad_request

log = logging.getLogger("ray.serve")

BLOCK_TYPES = ("text", "tool_use", "tool_result")
# Anthropic features this server does not implement: refused by name, never ignored.
UNSUPPORTED_BLOCKS = {
    "image",
    "document",
    "search_result",
    "thinking",
    "redacted_thinking",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "container_upload",
    "mcp_tool_use",
    "mcp_tool_result",
}
UNSUPPORTED_FIELDS = {
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_format",
    "output_config",
    "inference_geo",
    "strict",
    "speed",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
}


# --- requests ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CacheControl(_Strict):
    """A prompt-caching breakpoint. Accepted and not acted on: the engine's prefix cache reuses
    every shared prompt prefix by itself, so what the hint asks for already happens."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[Any] | None = None  # the SDK sends null back with a response's text blocks

    @field_validator("citations")
    @classmethod
    def _no_citations(cls, v):
        if v:
            raise ValueError("citations are not supported by this server")
        return v


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


def _text_blocks(v: Any, allowed: tuple[str, ...] = ("text",)) -> Any:
    """A string is one text block; every block needs a type we implement (see UNSUPPORTED_BLOCKS)."""
    if isinstance(v, str):
        return [{"type": "text", "text": v}]
    if isinstance(v, list):
        for i, block in enumerate(v):
            kind = block.get("type") if isinstance(block, dict) else None
            if not isinstance(kind, str):
                raise ValueError(f'block {i} must be an object with a "type"')
            if kind in UNSUPPORTED_BLOCKS:
                raise ValueError(f"block {i}: {kind!r} content blocks are not supported by this server")
            if kind not in allowed:
                raise ValueError(
                    f"block {i}: unknown content block type {kind!r} (expected one of {', '.join(allowed)})"
                )
    return v


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: list[TextBlock] = []
    is_error: bool = False
    cache_control: CacheControl | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, v):
        return _text_blocks(v)

    def text(self) -> str:
        """The result as the text of an OpenAI tool message, which has no error flag: a failed
        call's result says so in its text, so that the model still knows."""
        text = "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, v):
        return _text_blocks(v, BLOCK_TYPES)


class ToolParam(_Strict):
    """A client tool (`type` "custom" or absent); server tools (web search, bash...) are refused."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, v):
        kind = v.get("type") if isinstance(v, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise ValueError(
                f"server tools ({kind!r}) are not supported by this server; define a client tool "
                "with name, description and input_schema"
            )
        return v

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, v):
        if v.get("type") != "object":
            raise ValueError('must be a JSON schema with "type": "object"')
        return v


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(_Strict):
    user_id: str | None = None  # accepted and ignored: nothing here is per end user


class CountTokensRequest(_Strict):
    """The conversation: what /v1/messages/count_tokens takes, and what a message is made from."""

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    cache_control: CacheControl | None = None  # automatic prompt caching: what the prefix cache does anyway

    @field_validator("system", mode="before")
    @classmethod
    def _system_blocks(cls, v):
        return _text_blocks(v)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: Metadata | None = None


def request_error(exc: ValidationError) -> ApiError:
    """The first problem of a Messages body as a 400 naming its field (`messages.0.content.1.input`).
    The union tag pydantic puts in a block's location is dropped; other shapes are bad_request's."""
    err = exc.errors()[0]
    if err["type"] in ("json_invalid", "model_type") and len(err["loc"]) == 0:
        return bad_request(exc)
    loc = [
        p for i, p in enumerate(err["loc"]) if not (p in BLOCK_TYPES and i > 0 and isinstance(err["loc"][i - 1], int))
    ]
    param = ".".join(str(p) for p in loc) or None
    if err["type"] == "extra_forbidden" and loc and loc[-1] in UNSUPPORTED_FIELDS:
        return ApiError(
            400,
            f"{param}: not supported by this server; remove it from the request",
            param=param,
            code="unsupported_parameter",
        )
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"{param}: unknown field", param=param)
    msg = err["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


def parse(body: bytes, model_cls: type[CountTokensRequest]) -> Any:
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        raise request_error(exc) from None


# --- Anthropic → OpenAI ----------------------------------------------------------------------


def _parts(blocks: list[TextBlock]) -> list[dict[str, str]]:
    return [{"type": "text", "text": b.text} for b in blocks]


def _user_messages(msg: MessageParam, i: int) -> list[dict[str, Any]]:
    """tool_result blocks become `tool` messages, ahead of the turn's text (a user message)."""
    results = [b for b in msg.content if isinstance(b, ToolResultBlock)]
    texts = [b for b in msg.content if isinstance(b, TextBlock)]
    for j, b in enumerate(msg.content):
        if isinstance(b, ToolUseBlock):
            raise ApiError(
                400,
                f"messages.{i}.content.{j}: tool_use blocks belong in assistant turns",
                param=f"messages.{i}.content.{j}",
            )
    out = [{"role": "tool", "tool_call_id": r.tool_use_id, "content": r.text()} for r in results]
    if texts or not results:
        out.append({"role": "user", "content": _parts(texts)})
    return out


def _assistant_message(msg: MessageParam, i: int) -> dict[str, Any]:
    """Text blocks are the content, tool_use blocks the OpenAI tool_calls (arguments as JSON text)."""
    texts, calls = [], []
    for j, b in enumerate(msg.content):
        if isinstance(b, ToolResultBlock):
            raise ApiError(
                400,
                f"messages.{i}.content.{j}: tool_result blocks belong in user turns",
                param=f"messages.{i}.content.{j}",
            )
        if isinstance(b, TextBlock):
            texts.append(b)
        else:
            calls.append(
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)},
                }
            )
    out: dict[str, Any] = {"role": "assistant", "content": _parts(texts) if texts or not calls else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _tools(req: CountTokensRequest) -> dict[str, Any]:
    """tools and tool_choice in OpenAI's shape: any → "required", tool → that function,
    disable_parallel_tool_use → parallel_tool_calls false."""
    out: dict[str, Any] = {}
    if req.tools:
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "parameters": t.input_schema,
                    **({"description": t.description} if t.description else {}),
                },
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is None:
        return out
    if choice.type == "tool":
        if not choice.name:
            raise ApiError(400, 'tool_choice.name: required when tool_choice.type is "tool"', param="tool_choice.name")
        if choice.name not in {t.name for t in req.tools or []}:
            raise ApiError(400, f"tool_choice.name: no tool named {choice.name!r} in tools", param="tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice.name is not None:
        raise ApiError(400, 'tool_choice.name: only for tool_choice.type "tool"', param="tool_choice.name")
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use and choice.type != "none":
        out["parallel_tool_calls"] = False
    return out


def _sampling(req: CountTokensRequest) -> dict[str, Any]:
    if not isinstance(req, MessagesRequest):
        return {}
    out: dict[str, Any] = {"max_tokens": req.max_tokens}
    for ours, theirs in (
        ("stop", "stop_sequences"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
    ):
        if getattr(req, theirs) is not None:
            out[ours] = getattr(req, theirs)
    if req.stream:
        out.update(stream=True, stream_options={"include_usage": True})
    return out


def to_openai(req: CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat request body of a Messages (or count_tokens) request."""
    if req.messages[-1].role == "assistant":
        # Anthropic continues a final assistant turn; the chat template would start a new one instead.
        raise ApiError(
            400,
            "messages: a final assistant turn (prefill) is not supported by this server; end with a user turn",
            param="messages",
        )
    messages = [{"role": "system", "content": _parts(req.system)}] if req.system else []
    for i, msg in enumerate(req.messages):
        messages += _user_messages(msg, i) if msg.role == "user" else [_assistant_message(msg, i)]
    return {"model": req.model, "messages": messages, **_tools(req), **_sampling(req)}


def to_chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(to_openai(req))
    except ValidationError as exc:
        raise bad_request(exc) from None


# --- OpenAI → Anthropic ----------------------------------------------------------------------

# "stop" is both the end of the turn (EOS) and a matched stop string: the engine trims the stop
# string and reports neither which one matched nor that one did, so stop_sequence is never
# reported (it would be a guess) and a matched stop string reads as end_turn. "abort" only
# happens once the client went away.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def stop_reason(finish_reason: str | None, used_tools: bool = False) -> str:
    """`used_tools`: the answer has tool_use blocks; a forced (named) tool call may finish "stop"."""
    if used_tools and finish_reason in (None, "stop"):
        return "tool_use"
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def message_id(openai_id: str) -> str:
    """msg_<hex> with the OpenAI request's hex, so that the engine's logs name the same request."""
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


def tool_input(model: str, arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ApiError(
            502, f"model {model!r} produced tool call arguments that are not a JSON object", type="server_error"
        )
    return value


def to_message(completion: dict[str, Any], msg_id: str) -> dict[str, Any]:
    """An Anthropic message from an OpenAI chat.completion."""
    choice = completion["choices"][0]
    message, model = choice["message"], completion["model"]
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        content.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": fn["name"],
                "input": tool_input(model, fn.get("arguments", "")),
            }
        )
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"], any(b["type"] == "tool_use" for b in content)),
        "stop_sequence": None,
        "usage": usage(completion.get("usage")),
    }


# --- errors ----------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OPENAI_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "overloaded_error": "overloaded_error",
    "timeout_error": "timeout_error",
}


def error_type(status: int | None, openai_type: str | None) -> str:
    """The Anthropic error type of an OpenAI error: by status (503 is ours for "busy or loading,
    retry", which Anthropic calls overloaded), else by the OpenAI type (a mid-stream error has no status)."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    if status is not None:
        return "invalid_request_error" if 400 <= status < 500 else "api_error"
    return OPENAI_TYPES.get(openai_type or "", "api_error")


def error_body(openai_body: dict[str, Any], status: int | None = None) -> dict[str, Any]:
    err = openai_body.get("error") or {}
    return {
        "type": "error",
        "error": {"type": error_type(status, err.get("type")), "message": err.get("message", "error")},
    }


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.body, exc.status_code), status_code=exc.status_code, headers=exc.headers)


# --- streaming -------------------------------------------------------------------------------


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {payload}\n\n".encode()


class MessageEvents:
    """Turns one response's OpenAI chunks into Anthropic stream events, (name, data) pairs.

    The state is the open content block: ("text", None), or ("tool_use", (index, id)) for the call
    at one OpenAI tool_calls index. A call's first delta item carries its id and name, later ones
    argument fragments; text after a call, or another call, closes the block and opens the next.
    """

    def __init__(self, msg_id: str, model: str, prompt_tokens: int):
        self.msg_id, self.model, self.prompt_tokens = msg_id, model, prompt_tokens
        self.index = -1
        self.open: tuple[str, Any] | None = None
        self.finish_reason: str | None = None
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

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict]]:
        if "error" in chunk:
            return [("error", error_body(chunk))]
        if not chunk.get("choices"):
            return self._finish(chunk.get("usage"))
        choice = chunk["choices"][0]
        delta, events = choice.get("delta") or {}, []
        if delta.get("content"):
            events += self._open(("text", None), {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            events += self._tool_call(call)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[tuple[str, dict]]:
        fn, events = call.get("function") or {}, []
        open_key = self.open[1] if self.open and self.open[0] == "tool_use" else None
        same = open_key is not None and open_key[0] == call.get("index") and call.get("id") in (None, open_key[1])
        if not same:
            block = {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": {}}
            events += self._open(("tool_use", (call.get("index"), call.get("id"))), block)
            self.used_tools = True
        if fn.get("arguments"):
            events.append(self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]}))
        return events

    def _open(self, key: tuple[str, Any], block: dict) -> list[tuple[str, dict]]:
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
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _finish(self, u: dict | None) -> list[tuple[str, dict]]:
        """The last chunk (usage): close the open block, then message_delta and message_stop."""
        delta = {"stop_reason": stop_reason(self.finish_reason, self.used_tools), "stop_sequence": None}
        return self._close() + [
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(u)}),
            ("message_stop", {"type": "message_stop"}),
        ]


async def stream_events(chunks: AsyncIterator[dict], events: MessageEvents) -> AsyncIterator[bytes]:
    """The SSE body; closing it (the client went away) closes the chunks, which cancels the call."""
    try:
        for name, data in events.start():
            yield sse_event(name, data)
        async for chunk in chunks:
            for name, data in events.feed(chunk):
                yield sse_event(name, data)
    finally:
        await chunks.aclose()


# --- routes ----------------------------------------------------------------------------------


def check_auth(core, request: Request) -> None:
    """With an API key: `x-api-key: <key>` (Anthropic's header) or `Authorization: Bearer <key>`."""
    if not core.api_key:
        return
    key = request.headers.get("x-api-key")
    if key is not None and hmac.compare_digest(key.strip().encode(), core.api_key.encode()):
        return
    try:
        core.check_auth(request)
    except ApiError:
        raise ApiError(
            401,
            "invalid or missing API key (x-api-key: <key> or Authorization: Bearer <key>)",
            type="authentication_error",
            code="invalid_api_key",
        ) from None


async def create_message(core, request: Request) -> Response:
    """POST /v1/messages: the request runs on the chat path; the metrics count it as "messages"."""
    start, model = time.monotonic(), "-"
    try:
        req = parse(await core.read_body(request), MessagesRequest)
        model = req.model
        call, builder = await core.start(to_chat_request(req), "chat", start)
        msg_id = message_id(builder.id)
        if req.stream:
            events = MessageEvents(msg_id, model, call.prompt_tokens or 0)
            response = StreamingResponse(
                stream_events(core.chunks(call, builder, True), events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        else:
            response = JSONResponse(to_message(await core.collect(call, builder), msg_id))
    except ApiError as exc:
        core.metrics.observe_request(model if model in core.models else "-", "messages", exc.status_code)
        raise
    core.metrics.observe_request(model, "messages", 200)
    return response


async def count_tokens(core, request: Request) -> dict[str, int]:
    """POST /v1/messages/count_tokens: the prompt's tokens through the model's chat template, counted
    by its replica without generating. An unloaded model is loaded first, like /v1/models/{name}/load."""
    req = parse(await core.read_body(request), CountTokensRequest)
    client = core.client(req.model)
    prompt = to_chat_request(req).prompt_input()
    load_timeout = core.load_timeout(req.model)
    core.touch(req.model)
    n = await client.count_tokens(prompt, timeout_s=load_timeout or 30.0, load=load_timeout is not None)
    return {"input_tokens": n}


async def _answer(core, request: Request, handler) -> Response:
    """Runs a route's handler; every error, unexpected ones included, in Anthropic's shape."""
    try:
        check_auth(core, request)
        result = await handler(core, request)
        return result if isinstance(result, Response) else JSONResponse(result)
    except ApiError as exc:
        return error_response(exc)
    except Exception as exc:  # noqa: BLE001 - a 500 in Anthropic's shape, not the OpenAI one
        log.exception("unexpected error in %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def install_anthropic_routes(app: FastAPI, core) -> None:
    """Registers POST /v1/messages and /v1/messages/count_tokens on the router's app."""

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await _answer(core, request, create_message)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request):
        return await _answer(core, request, count_tokens)
