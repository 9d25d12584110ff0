"""The Responses API's request: the schema of `POST /v1/responses`, parsed strictly.

Input items are messages (`input_text` / `output_text` / `refusal` parts), `function_call`,
`function_call_output` and `reasoning` items; tools are function tools. What the API has and this
server does not run is refused by name (a 400 naming the field, `code: unsupported_parameter`):
built-in tools (web search, file search, computer use, code interpreter, MCP...), image / file /
audio parts, item references, encrypted reasoning, background runs, conversations, stored
prompts. Hints that change nothing here are accepted and ignored: `user`, `safety_identifier`,
`prompt_cache_key` (the prefix cache keys on the prompt itself), `truncation: "disabled"`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..http.errors import ApiError
from ..http.validation import Strict, parse_body, request_error, typed_items

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
PART_TYPES = ("input_text", "output_text", "refusal", "input_image")
# What the Responses API has and this server does not implement: refused by name.
UNSUPPORTED_ITEMS = {
    "item_reference",
    "file_search_call",
    "web_search_call",
    "computer_call",
    "computer_call_output",
    "image_generation_call",
    "code_interpreter_call",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "mcp_call",
    "custom_tool_call",
    "custom_tool_call_output",
    "tool_search_call",
    "tool_search_output",
    "compaction",
}
UNSUPPORTED_PARTS = {"input_file", "input_audio"}
UNSUPPORTED_FIELDS = {
    "file_id",  # input_image by uploaded file: this server has no Files API
    "background",
    "conversation",
    "prompt",
    "summary",
    "generate_summary",
    "service_tier",
    "max_tool_calls",
    "top_logprobs",
    "context_management",
    "prompt_cache_retention",
    "prompt_cache_options",
    "stream_options",
    "moderation",
    "image",
    "access_programs",
    "background_options",
    "verbosity",
    "encrypted_content",
    "namespace",
    "caller",
    "async",
}


class TextPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # a response's output_text carries them back (always empty here)
    logprobs: list[Any] | None = None


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


class ImagePart(Strict):
    type: Literal["input_image"]
    image_url: str | None = Field(None, min_length=1)  # a data: URL, or http(s) as router.images allows
    detail: Literal["auto"] | None = None  # the resolution is the model's processor's

    @model_validator(mode="after")
    def _url(self):
        if self.image_url is None:
            raise ValueError("image_url: required (a data: URL or an http(s) URL)")
        return self


Part = Annotated[TextPart | RefusalPart | ImagePart, Field(discriminator="type")]


def part_text(part: TextPart | RefusalPart | ImagePart) -> str:
    if isinstance(part, ImagePart):
        return ""
    return part.text if isinstance(part, TextPart) else part.refusal


class MessageItem(Strict):
    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        return typed_items(v, PART_TYPES, UNSUPPORTED_PARTS, "content part")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part_text(p) for p in self.content)

    def images(self) -> list[ImagePart]:
        return [] if isinstance(self.content, str) else [p for p in self.content if isinstance(p, ImagePart)]

    def chat_content(self) -> str | list[dict[str, Any]]:
        """The content as a chat message's: its text, or with images the parts in order."""
        if not self.images():
            return self.text()
        return [
            {"type": "image_url", "image_url": {"url": p.image_url}}
            if isinstance(p, ImagePart)
            else {"type": "text", "text": part_text(p)}
            for p in self.content
        ]


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as the API sends it
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[TextPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _parts(cls, v):
        return typed_items(v, ("input_text",), UNSUPPORTED_PARTS, "output part")

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class SummaryText(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(Strict):
    """Reasoning from an earlier turn. Kept in the conversation (and a stored response), never
    rendered into the prompt: chat templates drop the thinking of earlier turns."""

    type: Literal["reasoning"]
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    encrypted_content: None = None  # this server never encrypts reasoning, so never reads it back


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: Literal[False] | None = None


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | FunctionChoice


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class PlainFormat(Strict):
    type: Literal["text", "json_object"]


TextFormat = Annotated[JsonSchemaFormat | PlainFormat, Field(discriminator="type")]


class ReasoningConfig(Strict):
    """How much the model thinks: `effort` becomes chat's `reasoning_effort`, which the model maps
    onto its chat template or refuses by name. Reasoning summaries are not made here."""

    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: None = None
    generate_summary: None = None


class TextConfig(Strict):
    format: TextFormat = PlainFormat(type="text")
    verbosity: None = None


def _refuse_builtin_tools(v: Any) -> Any:
    """Every tool the API hosts (web search, file search, computer use, code interpreter, image
    generation, MCP, shell...) is refused, naming each one; only function tools run here."""
    if not isinstance(v, list):
        return v
    hosted = [
        (i, t["type"])
        for i, t in enumerate(v)
        if isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"] != "function"
    ]
    if hosted:
        names = ", ".join(f"{kind} (tools.{i})" for i, kind in hosted)
        raise ApiError(
            400,
            f"tools: built-in tools are not run by this server: {names}; only function tools "
            '({"type": "function", "name", "parameters"}) are supported',
            param=f"tools.{hosted[0][0]}.type",
            code="unsupported_tool",
        )
    return v


def _refuse_hosted_choice(v: Any) -> Any:
    if isinstance(v, dict) and isinstance(v.get("type"), str) and v["type"] != "function":
        raise ApiError(
            400,
            f"tool_choice: {v['type']!r} is not supported by this server; use none, auto, required "
            'or {"type": "function", "name": ...}',
            param="tool_choice",
            code="unsupported_parameter",
        )
    return v


class ResponsesRequest(Strict):
    model: str = Field(min_length=1)
    input: list[Item]  # a string is one user message
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1)
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    store: bool = True
    stream: bool = False
    include: list[str] | None = None
    truncation: Literal["disabled"] | None = None
    user: str | None = None  # accepted and ignored: nothing here is per end user
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache keys on the prompt itself

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, v):
        if isinstance(v, str):
            return [{"type": "message", "role": "user", "content": v}]
        return typed_items(v, ITEM_TYPES, UNSUPPORTED_ITEMS, "item", default="message")

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, v):
        return _refuse_builtin_tools(v)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice(cls, v):
        return _refuse_hosted_choice(v)

    @field_validator("include")
    @classmethod
    def _include(cls, v):
        if v:
            raise ValueError(f"{v[0]!r} is not supported by this server (nothing extra can be included)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 for k in v)):
            raise ValueError("at most 16 keys, each at most 64 characters")
        return v

    @model_validator(mode="after")
    def _input(self):
        if not self.input:
            raise ValueError("input: is empty")
        return self

    def items(self) -> list[Item]:
        return list(self.input)


def _field(loc, i: int) -> bool:
    """Location parts that are fields: not pydantic's union tags (`str`, `list[...]`, the item
    type it put after an item's index, `function-after[...]`)."""
    part = str(loc[i])
    if part in ("str", "list", "none") or "[" in part:
        return False
    prev = loc[i - 1] if i > 0 else None
    return not (isinstance(prev, int) and part in (*ITEM_TYPES, *PART_TYPES))


def _unsupported(param: str | None, err: dict) -> bool:
    leaf = param.rsplit(".", 1)[-1] if param else None
    return leaf in UNSUPPORTED_FIELDS and err["type"] in ("extra_forbidden", "literal_error", "none_required")


def responses_error(exc: ValidationError) -> ApiError:
    """The first problem of a request body as a 400 naming its field (`input.2.call_id`)."""
    return request_error(exc, keep=_field, unsupported=_unsupported)


def parse(body: bytes) -> ResponsesRequest:
    """The request of a body; raises a 400 ApiError (a refused built-in tool raises its own, which
    pydantic lets through)."""
    return parse_body(body, ResponsesRequest, responses_error)
