"""Tools in the prompt: through the model's chat template when it takes `tools`, else the Hermes
format (NousResearch's, which Qwen's templates also use) written into the conversation.

The Hermes format: the system prompt lists the tools as JSON schemas inside <tools></tools> and
asks for each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; an assistant
turn's earlier calls are written back the same way, and a tool's result goes in a user turn as
`<tool_response>...</tool_response>`. The router parses calls out of the output with the same
tags (deployments/parsers/hermes.py), and forced calls use the same tags in their grammar.
"""

from __future__ import annotations

import json
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

HERMES_SYSTEM = (  # `{tools}` is replaced (str.replace: the text's other braces stay as they are)
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def template_takes_tools(tokenizer, template: str | None) -> bool:
    """Whether the chat template renders a `tools` argument itself, in the Hermes format (Qwen's
    do); a template with another call format gets the Hermes prompt instead, since calls are
    parsed (and forced) with the Hermes tags."""
    source = template if template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates
        source = " ".join(str(v) for v in source.values())
    return isinstance(source, str) and "tools" in source and CALL_OPEN in source


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages for a template that takes tools: call arguments as objects, as the
    templates (Qwen's, Llama's) expect them."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


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
