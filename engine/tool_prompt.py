"""Tools in the prompt: through the model's chat template when it takes `tools` (the template
teaches its own call format, engine.chat_format reads which), else the Hermes format
(NousResearch's, which Qwen's templates also use) written into the conversation.

A template that takes tools gets the conversation's earlier calls and results in the shape
templates read: calls' arguments as objects (or as their JSON text, for the templates that
concatenate them: engine.prompts retries with `arguments_as_text`), each tool result with the
name of the call it answers, and for Mistral's templates, which insist on it, call ids of nine
letters and digits (derived from ours, so a call and its result still match).

The Hermes format: the system prompt lists the tools as JSON schemas inside <tools></tools> and
asks for each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; an assistant
turn's earlier calls are written back the same way, and a tool's result goes in a user turn as
`<tool_response>...</tool_response>`. The router parses calls out of the output with the same
tags (deployments/parsers/hermes.py), and forced calls use the same tags in their grammar.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any

from .chat_format import takes_tools, template_source

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_ID_CHARS = string.ascii_letters + string.digits

HERMES_SYSTEM = (  # `{tools}` is replaced (str.replace: the text's other braces stay as they are)
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def template_takes_tools(tokenizer, template: str | None) -> bool:
    """Whether the chat template renders a `tools` argument itself (engine.chat_format.takes_tools)."""
    source = template_source(template if template is not None else getattr(tokenizer, "chat_template", None))
    return bool(source) and takes_tools(source)


def for_template(
    messages: list[dict[str, Any]], tool_format: str = "hermes", arguments_as_text: bool = False
) -> list[dict[str, Any]]:
    """OpenAI messages for a template that takes tools, in the shape templates read (see above)."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                arguments = c["function"]["arguments"]
                arguments = _text(arguments) if arguments_as_text else _arguments(arguments)
                call = {**c, "function": {**c["function"], "arguments": arguments}}
                names[c.get("id", "")] = c["function"]["name"]
                calls.append(_mistral_id(call) if tool_format == "mistral" else call)
            m = {**m, "tool_calls": calls}
        elif m["role"] == "tool":
            m = {**m, "name": m.get("name") or names.get(m.get("tool_call_id", ""), "")}
            m = _mistral_id(m, "tool_call_id") if tool_format == "mistral" else m
        out.append(m)
    return out


def _mistral_id(item: dict[str, Any], key: str = "id") -> dict[str, Any]:
    """A call id as Mistral's templates require it: nine letters and digits."""
    if not item.get(key):
        return item
    digest = hashlib.sha256(str(item[key]).encode()).digest()
    return {**item, key: "".join(MISTRAL_ID_CHARS[b % len(MISTRAL_ID_CHARS)] for b in digest[:9])}


def _text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def hermes(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, system: str | None = None
) -> list[dict[str, Any]]:
    """OpenAI messages (tool calls, tool results) as plain Hermes-format turns, tools (if any)
    described in the system prompt (`system`, with `{tools}`; default HERMES_SYSTEM)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(
                call_text(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in m["tool_calls"]
            )
            out.append({"role": "assistant", "content": "\n".join(p for p in (m.get("content") or "", calls) if p)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    if tools:
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        described = (system or HERMES_SYSTEM).replace("{tools}", schemas)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def call_text(name: str, arguments: Any) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
