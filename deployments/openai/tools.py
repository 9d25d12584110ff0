"""OpenAI tools and response_format on the router's side: validating them and the plan they make
for one request (the calls are parsed out of the output by deployments.parsers).

The model sees tools through its chat template or the Hermes prompt (engine/tool_prompt.py) and
calls them in its own format (engine.chat_format, which the replica knows and the router learns
from the first chunk). With tool_choice "required" or a named function the call is forced: the
router sends the forced tools (and whether several calls may be made) as the request's
`guided.tool_calls`, and the replica builds the grammar in the model's format
(engine.tool_grammar), so the arguments always validate; with "auto" the model may call or
answer, and calls are parsed out of what it wrote. tool_choice "none" leaves the tools out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from ..http.validation import Strict


class JsonSchemaFormat(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def guided(self) -> dict[str, Any] | None:
        """The engine's GuidedSpec (as a dict) for this format; None for plain text."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format.json_schema: required when type is json_schema")
            return {"json_schema": self.json_schema.schema_}
        return None


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass
class ToolPlan:
    """What one chat request's tools and response_format mean for the engine and the parser."""

    render_tools: bool = False  # the prompt describes the tools
    parse: bool = False  # calls are parsed out of the output
    forced: dict[str, Any] | None = None  # the forced call(s): the engine's GuidedSpec.tool_calls
    response_format: ResponseFormat | None = None

    def guided(self) -> dict[str, Any] | None:
        if self.forced is not None:
            return {"tool_calls": self.forced}
        return self.response_format.guided() if self.response_format is not None else None


def tool_plan(
    tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None, response_format: ResponseFormat | None
) -> ToolPlan:
    """Raises ValueError (a 400 naming the field) for a choice that names no tool, a choice
    without tools, or a forced call together with a JSON response_format."""
    if response_format is not None:
        response_format.guided()  # a json_schema type without its schema is refused here
    if not tools:
        if choice not in (None, "none"):
            raise ValueError("tool_choice: needs tools")
        return ToolPlan(response_format=response_format)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError("tools: function names must be unique")
    choice = choice or "auto"
    if choice == "none":
        return ToolPlan(response_format=response_format)
    forced = None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {choice.function.name!r} in tools")
        forced = [t for t in tools if t.function.name == choice.function.name]
    elif choice == "required":
        forced = tools
    if forced is not None and response_format is not None and response_format.type != "text":
        raise ValueError("response_format: cannot be combined with a forced tool_choice")
    if forced is None:
        return ToolPlan(render_tools=True, parse=True, response_format=response_format)
    spec = {
        "tools": [{"name": t.function.name, "parameters": t.function.parameters} for t in forced],
        "parallel": parallel is not False and choice == "required",
    }
    return ToolPlan(render_tools=True, parse=True, forced=spec, response_format=response_format)
