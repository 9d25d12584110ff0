"""The Anthropic Messages API's requests: the schema, and its translation into the chat request
the prompt is built from.

A Messages (or count_tokens) body becomes an OpenAI chat request (`to_chat_request`): its
messages, tools and sampling fields are what the chat path renders and sends to the model, so
templates, tool prompts and grammars stay one path. Bodies are parsed as strictly as the OpenAI
ones: an unknown field, or a feature this server does not implement (documents, server tools, a
prefilled assistant turn), is a 400 naming the field, never silently ignored. Image blocks (base64,
or a URL the router's allow-list permits) in user turns become the chat request's image parts.

Extended thinking: `thinking` enabled / disabled turns the model's thinking on or off through its
chat template (engine.chat_format.thinking_variables: a model that cannot is a 400 naming
`thinking`), and `budget_tokens` caps it (engine.thinking; below Anthropic's 1024 minimum is
allowed, it must stay under max_tokens). Thinking blocks in earlier assistant turns are accepted
and left out of the prompt, as Anthropic does; their signatures are not checked (ours are empty).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from engine.request import PromptInput

from ..http.errors import ApiError
from ..http.images import ImageRef
from ..http.validation import Strict, parse_body, request_error, typed_items
from ..openai.protocol import ChatCompletionRequest, bad_request

BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")
# Anthropic features this server does not implement: refused by name, never ignored.
UNSUPPORTED_BLOCKS = {
    "document",
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "container_upload",
    "mcp_tool_use",
    "mcp_tool_result",
}
UNSUPPORTED_FIELDS = {
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


class CacheControl(Strict):
    """A prompt-caching breakpoint. Accepted and not acted on: the engine's prefix cache reuses
    every shared prompt prefix by itself, so what the hint asks for already happens."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Strict):
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


class Base64Source(Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class UrlSource(Strict):
    type: Literal["url"]
    url: str = Field(min_length=1)


class ImageBlock(Strict):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None

    def url(self) -> str:
        """As the chat request's image_url: a data: URL for base64 (http.images checks the bytes)."""
        src = self.source
        return f"data:{src.media_type};base64,{src.data}" if isinstance(src, Base64Source) else src.url


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ThinkingBlock(Strict):
    """An earlier turn's thinking: accepted, and left out of the prompt (as Anthropic does)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None
    cache_control: CacheControl | None = None


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str
    cache_control: CacheControl | None = None


def _text_blocks(v: Any, allowed: tuple[str, ...] = ("text",)) -> Any:
    """A string is one text block; every block needs a type we implement (see UNSUPPORTED_BLOCKS)."""
    if isinstance(v, str):
        return [{"type": "text", "text": v}]
    unsupported = (
        UNSUPPORTED_BLOCKS if "image" in allowed else UNSUPPORTED_BLOCKS | {"image"}
    )  # images: user turns only
    return typed_items(v, allowed, unsupported, "block", "content block")


class ToolResultBlock(Strict):
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


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]
THINKING_BLOCKS = (ThinkingBlock, RedactedThinkingBlock)


class MessageParam(Strict):
    role: Literal["user", "assistant"]
    content: list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, v):
        return _text_blocks(v, BLOCK_TYPES)


class ToolParam(Strict):
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


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingParam(Strict):
    """Extended thinking: `enabled` with a budget of thinking tokens, or `disabled`."""

    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _budget(self):
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError('budget_tokens: required when type is "enabled"')
        if self.type == "disabled" and self.budget_tokens is not None:
            raise ValueError('budget_tokens: only when type is "enabled"')
        return self


class Metadata(Strict):
    user_id: str | None = None  # accepted and ignored: nothing here is per end user


class CountTokensRequest(Strict):
    """The conversation: what /v1/messages/count_tokens takes, and what a message is made from."""

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    cache_control: CacheControl | None = None  # automatic prompt caching: what the prefix cache does anyway
    thinking: ThinkingParam | None = None

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

    @model_validator(mode="after")
    def _budget_under_max_tokens(self):
        budget = self.thinking.budget_tokens if self.thinking is not None else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError("thinking.budget_tokens: must be less than max_tokens")
        return self


def _field(loc, i: int) -> bool:
    """Location parts that are fields, not the block type pydantic puts after a block's index."""
    return not (loc[i] in BLOCK_TYPES and i > 0 and isinstance(loc[i - 1], int))


def _unsupported(param: str | None, err: dict) -> bool:
    return err["type"] == "extra_forbidden" and param is not None and param.rsplit(".", 1)[-1] in UNSUPPORTED_FIELDS


def messages_error(exc: ValidationError) -> ApiError:
    """The first problem of a Messages body as a 400 naming its field (`messages.0.content.1.input`)."""
    return request_error(exc, keep=_field, unsupported=_unsupported, unknown_field="unknown field")


def parse(body: bytes, model_cls: type[CountTokensRequest]) -> Any:
    return parse_body(body, model_cls, messages_error)


# --- Anthropic → OpenAI ----------------------------------------------------------------------


def _parts(blocks: list[TextBlock | ImageBlock]) -> list[dict[str, Any]]:
    return [
        {"type": "image_url", "image_url": {"url": b.url()}}
        if isinstance(b, ImageBlock)
        else {"type": "text", "text": b.text}
        for b in blocks
    ]


def image_refs(req: CountTokensRequest) -> list[ImageRef]:
    """The request's images in order of appearance (the chat request's order), each named by its
    Messages field."""
    return [
        ImageRef(f"messages.{i}.content.{j}.source", b.url())
        for i, msg in enumerate(req.messages)
        for j, b in enumerate(msg.content)
        if isinstance(b, ImageBlock)
    ]


def _user_messages(msg: MessageParam, i: int) -> list[dict[str, Any]]:
    """tool_result blocks become `tool` messages, ahead of the turn's text and images (a user message)."""
    results = [b for b in msg.content if isinstance(b, ToolResultBlock)]
    texts = [b for b in msg.content if isinstance(b, (TextBlock, ImageBlock))]
    for j, b in enumerate(msg.content):
        if isinstance(b, (ToolUseBlock, *THINKING_BLOCKS)):
            raise ApiError(
                400,
                f"messages.{i}.content.{j}: {b.type} blocks belong in assistant turns",
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
        if isinstance(b, (ToolResultBlock, ImageBlock)):
            raise ApiError(
                400,
                f"messages.{i}.content.{j}: {b.type} blocks belong in user turns",
                param=f"messages.{i}.content.{j}",
            )
        if isinstance(b, THINKING_BLOCKS):
            continue  # an earlier turn's thinking is not part of the prompt
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


def prompt_input(
    req: CountTokensRequest, chat: ChatCompletionRequest, images: list[bytes] | None = None
) -> PromptInput:
    """The chat request's prompt (with the bytes of `image_refs(req)`), with the request's thinking
    turned on or off."""
    prompt = chat.prompt_input(images)
    if req.thinking is None:
        return prompt
    return dataclasses.replace(prompt, thinking=req.thinking.type == "enabled")


def sampling(req: MessagesRequest, chat: ChatCompletionRequest) -> dict[str, Any]:
    """The chat request's sampling fields, with the thinking budget as the request's cap."""
    out = chat.sampling()
    if req.thinking is not None and req.thinking.budget_tokens is not None:
        out["max_thinking_tokens"] = req.thinking.budget_tokens
    return out


def to_chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(to_openai(req))
    except ValidationError as exc:
        raise bad_request(exc) from None
