"""Forced tool calls (`tool_choice` "required" or a named function): a Lark grammar (llguidance)
that makes the output nothing but calls of the given tools, written in the model's own call
format (engine.chat_format), so the router's parser for that format reads them.

Arguments written as JSON (hermes, llama3_json, mistral, deepseek_v3, harmony) are held to each
tool's parameters schema. qwen3_coder and pythonic write one value per parameter: the grammar
fixes the function and parameter names (required ones always, in the schema's order; optional
ones may be left out) and holds each value to that parameter's own schema (a JSON value, which is
also a Python literal), except a qwen3_coder string, which is raw text: any text without `</`
(its length, pattern or enum aside). A format's tags that are special tokens of the model's
vocabulary are matched as those tokens (`<[id]>`), else as text.

With `parallel` the grammar admits up to MAX_PARALLEL_CALLS calls; harmony always one (the model
stops at `<|call|>`).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from .json_layout import JSON_OPTIONS

MAX_PARALLEL_CALLS = 4  # a forced parallel call makes at most this many calls


def call_grammar(
    tools: list[dict[str, Any]], parallel: bool, tool_format: str, special: dict[str, int] | None = None
) -> str:
    """The Lark grammar of forced calls of `tools` ({"name", "parameters"} each) in `tool_format`;
    `special` maps the vocabulary's special tokens to their ids."""
    return _GRAMMARS[tool_format](_Lark(special or {}), tools, parallel)


class _Lark:
    def __init__(self, special: dict[str, int]):
        self.special = special

    def lit(self, text: str) -> str:
        """A literal: the special token, or the text."""
        if text in self.special:
            return f"<[{self.special[text]}]>"
        return json.dumps(text, ensure_ascii=False)


_q = json.dumps  # a Lark string literal
COMMA = '", "'
NL = "\n"


def _json(schema: dict[str, Any] | None) -> str:
    return f"%json {json.dumps({**(schema or {}), 'x-guidance': JSON_OPTIONS}, ensure_ascii=False)}"


def _call_object(tools: list[dict[str, Any]], arguments_key: str) -> str:
    """One JSON object `{"name": ..., <arguments_key>: {...}}` of any of the tools."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, arguments_key: t.get("parameters") or {"type": "object"}},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return _json({"anyOf": options})


def _repeat(item: str, parallel: bool, sep: str = "") -> str:
    if not parallel:
        return item
    return f"{item} ({sep} {item}){{0,{MAX_PARALLEL_CALLS - 1}}}" if sep else f"{item}{{1,{MAX_PARALLEL_CALLS}}}"


def _hermes(lark: _Lark, tools, parallel) -> str:
    call = f'{lark.lit("<tool_call>")} "\\n" {_call_object(tools, "arguments")} "\\n" {lark.lit("</tool_call>")} "\\n"?'
    return f"start: {_repeat('call', parallel)}\ncall: {call}\n"


def _llama3_json(lark: _Lark, tools, parallel) -> str:
    return f"start: {_repeat('call', parallel, _q('; '))}\ncall: {_call_object(tools, 'parameters')}\n"


def _mistral(lark: _Lark, tools, parallel) -> str:
    """Either of Mistral's forms (v3 list, v11 `name[ARGS]`): the model writes the one it learned."""
    tag = lark.lit("[TOOL_CALLS]")
    named = " | ".join(f"{_q(t['name'])} {lark.lit('[ARGS]')} {_json(t.get('parameters'))}" for t in tools)
    return (
        f"start: {tag} (v3 | v11)\n"
        f'v3: "[" {_repeat("object", parallel, COMMA)} "]"\n'
        f"object: {_call_object(tools, 'arguments')}\n"
        f"v11: {_repeat('named', parallel, tag)}\n"
        f"named: {named}\n"
    )


def _deepseek_v3(lark: _Lark, tools, parallel) -> str:
    """Either shape (V3's typed and fenced, V3.1's bare): the model writes the one it learned."""
    sep, fence = lark.lit("<｜tool▁sep｜>"), "\n```json\n"
    v3 = [f'"function" {sep} {_q(t["name"] + fence)} {_json(t.get("parameters"))} "\\n```"' for t in tools]
    v31 = [f"{_q(t['name'])} {sep} {_json(t.get('parameters'))}" for t in tools]
    return (
        f"start: {lark.lit('<｜tool▁calls▁begin｜>')} {_repeat('call', parallel)} {lark.lit('<｜tool▁calls▁end｜>')}\n"
        f"call: {lark.lit('<｜tool▁call▁begin｜>')} ({' | '.join(v3 + v31)}) {lark.lit('<｜tool▁call▁end｜>')}\n"
    )


def _harmony(lark: _Lark, tools, parallel) -> str:
    head = f'{lark.lit("<|channel|>")} "commentary to=functions."'
    bodies = [
        f'{_q(t["name"] + " ")} {lark.lit("<|constrain|>")} "json" {lark.lit("<|message|>")} {_json(t.get("parameters"))}'
        for t in tools
    ]
    return f"start: {head} ({' | '.join(bodies)}) {lark.lit('<|call|>')}\n"


def _parameters(tool: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """A tool's parameters in its schema's order: (name, schema, required)."""
    schema = tool.get("parameters") or {}
    required = set(schema.get("required") or ())
    return [
        (name, sub if isinstance(sub, dict) else {}, name in required)
        for name, sub in (schema.get("properties") or {}).items()
    ]


def _ordered(items: list[tuple[str, bool]], sep: str) -> str:
    """A Lark expression: the items (expression, required) in order, optional ones may be left
    out, `sep` between those present."""

    @functools.cache
    def rest(i: int) -> str:  # after an item
        if i == len(items):
            return ""
        item, required = items[i]
        head = f"{sep} {item}" if sep else item
        return f"{head if required else f'({head})?'} {rest(i + 1)}".strip()

    @functools.cache
    def first(i: int) -> str:
        if i == len(items):
            return ""
        item, required = items[i]
        present = f"{item} {rest(i + 1)}".strip()
        if required:
            return present
        absent = first(i + 1)
        return f"({present} | {absent})" if absent else f"({present})?"

    return first(0)


def _is_string(schema: dict[str, Any]) -> bool:
    kinds = schema.get("type")
    return kinds == "string" or (isinstance(kinds, list) and "string" in kinds)


def _qwen3_coder(lark: _Lark, tools, parallel) -> str:
    def parameter(name: str, schema: dict[str, Any]) -> str:
        head = _q(f"<parameter={name}>\n")
        if _is_string(schema):
            return f"{head} /(?:[^<]|<[^\\/])*\\n<\\/parameter>\\n/"
        return f'{head} {_json(schema)} "\\n</parameter>\\n"'

    functions = [
        f"{_q('<function=' + t['name'] + '>' + NL)} "
        f"{_ordered([(parameter(n, s), r) for n, s, r in _parameters(t)], '')} "
        '"</function>\\n"'
        for t in tools
    ]
    call = f'{lark.lit("<tool_call>")} "\\n" ({" | ".join(functions)}) {lark.lit("</tool_call>")} "\\n"?'
    return f"start: {_repeat('call', parallel)}\ncall: {call}\n"


def _pythonic(lark: _Lark, tools, parallel) -> str:
    def call(tool: dict[str, Any]) -> str:
        arguments = [(f"{_q(name + '=')} {_json(schema)}", required) for name, schema, required in _parameters(tool)]
        return f'{_q(tool["name"] + "(")} {_ordered(arguments, COMMA)} ")"'

    calls = " | ".join(call(t) for t in tools)
    return f'start: "[" {_repeat("call", parallel, COMMA)} "]"\ncall: {calls}\n'


_GRAMMARS = {
    "hermes": _hermes,
    "llama3_json": _llama3_json,
    "mistral": _mistral,
    "qwen3_coder": _qwen3_coder,
    "pythonic": _pythonic,
    "deepseek_v3": _deepseek_v3,
    "harmony": _harmony,
}
