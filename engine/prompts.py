"""Prompt → token ids: chat messages through the model's chat template, or plain text."""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequestError
from .request import PromptInput
from .tool_prompt import for_template, hermes, template_takes_tools


def encode_prompt(
    tokenizer,
    prompt: PromptInput,
    chat_template: str | None = None,
    tool_prompt: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    tool_format: str = "hermes",
) -> list[int]:
    """Token ids of a prompt; `chat_template` (EngineConfig) replaces the tokenizer's own,
    `tool_prompt` the Hermes prompt that describes tools to a template that does not take them,
    `template_kwargs` are variables for the template (checked by the caller: engine.chat_format),
    and `tool_format` is the call format of the model's output (engine.chat_format)."""
    given = [f for f in ("messages", "text", "token_ids") if getattr(prompt, f) is not None]
    if len(given) != 1:
        raise InvalidRequestError("give exactly one of messages, prompt text or token ids", param="messages")
    if prompt.token_ids is not None:
        ids = _check_ids(prompt.token_ids, len(tokenizer))
    elif prompt.text is not None:
        ids = tokenizer.encode(prompt.text)
    else:
        ids = _apply_chat_template(
            tokenizer, prompt.messages, chat_template, prompt.tools, tool_prompt, template_kwargs or {}, tool_format
        )
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    return ids


def render_chat(
    tokenizer,
    prompt: PromptInput,
    chat_template: str | None = None,
    tool_prompt: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    tool_format: str = "hermes",
) -> str:
    """A chat prompt with images as the chat template's text, each `{"type": "image"}` part
    rendered by the template (its image marker, which the model's processor expands)."""
    if prompt.messages is None or prompt.text is not None or prompt.token_ids is not None:
        raise InvalidRequestError("images come with chat messages only", param="messages")
    return _apply_chat_template(
        tokenizer, prompt.messages, chat_template, prompt.tools, tool_prompt, template_kwargs or {}, tool_format, True
    )


def _check_ids(ids: list[int], vocab: int) -> list[int]:
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"token ids must be integers in [0, {vocab}): got {bad[0]!r}", param="prompt")
    return list(ids)


def _apply_chat_template(
    tokenizer,
    messages: list[dict[str, Any]],
    template: str | None,
    tools: list[dict[str, Any]] | None = None,
    tool_prompt: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    tool_format: str = "hermes",
    images: bool = False,
) -> list[int] | str:
    """Token ids of the rendered messages; with `images`, the text (image parts kept for the template)."""
    if not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    if template is None and not tokenizer.has_chat_template:
        raise InvalidRequestError(
            "this model has no chat template (a base model): use /v1/completions with a prompt",
            param="messages",
        )
    normalized = [_normalize_message(m, i, images) for i, m in enumerate(messages)]
    extra: dict[str, Any] = {**(template_kwargs or {})}
    if images:
        extra["tokenize"] = False
    if template is not None:
        extra["chat_template"] = template
    if not (tools or any(m.get("tool_calls") or m["role"] == "tool" for m in normalized)):
        return _render(tokenizer, normalized, extra)
    if not template_takes_tools(tokenizer, template):
        return _render(tokenizer, hermes(normalized, tools, tool_prompt), extra)
    extra["tools"] = tools
    try:
        return _render(tokenizer, for_template(normalized, tool_format), extra)
    except InvalidRequestError:  # templates that concatenate a call's arguments want them as text
        if not any(m.get("tool_calls") for m in normalized):
            raise
        return _render(tokenizer, for_template(normalized, tool_format, arguments_as_text=True), extra)


def _render(tokenizer, messages: list[dict[str, Any]], extra: dict[str, Any]) -> list[int] | str:
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
        return out if isinstance(out, str) else list(out)
    except Exception as exc:  # jinja2 TemplateError and friends: the template rejected the conversation
        raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc


def _normalize_message(message: dict[str, Any], index: int, images: bool = False) -> dict[str, Any]:
    """OpenAI content may be a string or a list of text parts; templates want a string. With
    `images`, a content list holding image parts stays a list of text and image parts (VLM
    templates render both)."""
    if not isinstance(message, dict) or "role" not in message:
        raise InvalidRequestError(f"messages[{index}] needs a role and content", param=f"messages.{index}")
    content = message.get("content")
    if images and isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content):
        return {**message, "content": [_image_or_text(p, index) for p in content]}
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequestError(
                    f"messages[{index}]: only text content parts are supported", param=f"messages.{index}.content"
                )
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise InvalidRequestError(f"messages[{index}].content must be a string", param=f"messages.{index}.content")
    return {**message, "content": content}


def _image_or_text(part: Any, index: int) -> dict[str, Any]:
    if isinstance(part, dict) and part.get("type") == "image":
        return {"type": "image"}
    if isinstance(part, dict) and part.get("type") == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    raise InvalidRequestError(
        f"messages[{index}]: only text and image content parts are supported", param=f"messages.{index}.content"
    )
