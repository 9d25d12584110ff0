"""A Responses conversation as the chat request its prompt is built from.

The conversation is the stored one of `previous_response_id` (its input items, then its output
items) followed by this request's input; it becomes OpenAI chat messages, and with the request's
tools, tool_choice, text.format and sampling one `ChatCompletionRequest`, so templates, the tool
prompt, grammars and validation stay the chat path's. Only shapes are translated:
  - `instructions` is a system message ahead of everything (never carried over from a previous
    response, as OpenAI does);
  - an assistant message and the function calls that follow it are one assistant turn with
    `tool_calls`, as the model wrote them; a `function_call_output` is a `tool` message;
  - reasoning items stay in the conversation but are not rendered (templates drop the thinking
    of earlier turns).
A continued conversation renders as the earlier prompt followed by the earlier output, so its
prompt starts with the tokens the model's paged cache kept, and prefix-affinity routing sends it
to the replica that holds them.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..http.errors import ApiError
from ..http.images import ImageRef
from ..openai.protocol import ChatCompletionRequest, bad_request
from .protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    ImagePart,
    Item,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
)

ITEMS = TypeAdapter(list[Item])
# The chat request's names for what the Responses request calls otherwise (its 400s name ours).
RENAMED = (
    ("response_format", "text.format"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
    ("reasoning_effort", "reasoning.effort"),
)


def stored_items(items: list[dict[str, Any]]) -> list[Item]:
    """Items kept by the store (this server's own output, or input it validated) as items again."""
    return ITEMS.validate_python(items)


def check_calls(items: list[Item], first: int) -> None:
    """Every function_call_output answers a function_call earlier in the conversation; `first` is
    the index of this request's first input item (the errors name the request's own items)."""
    calls: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem) and item.call_id not in calls:
            param = f"input.{i - first}.call_id" if i >= first else "previous_response_id"
            raise ApiError(
                400,
                f"{param}: no function_call with call_id {item.call_id!r} comes before this "
                "function_call_output (in input, or in the previous response)",
                param=param,
            )


def _call(item: FunctionCallItem) -> dict[str, Any]:
    return {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}


def to_messages(items: list[Item], instructions: str | None) -> list[dict[str, Any]]:
    """Chat messages of a conversation: an assistant message and the calls after it are one turn."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    turn: dict[str, Any] | None = None  # the assistant turn the next function_call joins
    for item in items:
        if isinstance(item, ReasoningItem):
            continue
        if isinstance(item, MessageItem):
            turn = {"role": item.role, "content": item.text()} if item.role == "assistant" else None
            messages.append(turn or {"role": item.role, "content": item.chat_content()})
        elif isinstance(item, FunctionCallItem):
            if turn is None:
                turn = {"role": "assistant", "content": None}
                messages.append(turn)
            turn.setdefault("tool_calls", []).append(_call(item))
        else:
            turn = None
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def image_refs(items: list[Item], first: int) -> list[ImageRef]:
    """The conversation's images in order, named by this request's input fields (`first`: the index
    of its first input item; earlier ones came with `previous_response_id`)."""
    return [
        ImageRef(f"input.{i - first}.content.{j}.image_url" if i >= first else "previous_response_id", part.image_url)
        for i, item in enumerate(items)
        if isinstance(item, MessageItem)
        for j, part in enumerate(item.content if not isinstance(item.content, str) else [])
        if isinstance(part, ImagePart)
    ]


def _tools(req: ResponsesRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if req.tools:
        out["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type", "defer_loading"}, exclude_none=True)}
            for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        out["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    if req.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = req.parallel_tool_calls
    return out


def _response_format(req: ResponsesRequest) -> dict[str, Any]:
    if req.text is None:
        return {}
    fmt = req.text.format
    if fmt.type != "json_schema":
        return {"response_format": {"type": fmt.type}}
    schema = fmt.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
    return {"response_format": {"type": "json_schema", "json_schema": schema}}


def _sampling(req: ResponsesRequest) -> dict[str, Any]:
    effort = req.reasoning.effort if req.reasoning is not None else None
    pairs = (
        ("max_tokens", req.max_output_tokens),
        ("temperature", req.temperature),
        ("top_p", req.top_p),
        ("reasoning_effort", effort),
    )
    return {k: v for k, v in pairs if v is not None}


def renamed(exc: ApiError) -> ApiError:
    """A chat-path (or engine) 400 with the Responses request's field names."""
    err = exc.body["error"]
    param, message = err.get("param"), err["message"]
    for chat, ours in RENAMED:
        if param and (param == chat or param.startswith(chat + ".")):
            param = ours + param[len(chat) :]
        if message.startswith(chat):
            message = ours + message[len(chat) :]
    return ApiError(exc.status_code, message, type=err["type"], param=param, code=err.get("code"), headers=exc.headers)


def to_chat_request(req: ResponsesRequest, items: list[Item]) -> ChatCompletionRequest:
    body = {
        "model": req.model,
        "messages": to_messages(items, req.instructions),
        **_tools(req),
        **_response_format(req),
        **_sampling(req),
    }
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise renamed(bad_request(exc)) from None
