"""OpenAI-compatible request shapes (chat completions, completions) and the model card.

Requests are parsed strictly (types are not coerced; unknown fields are refused) and every problem
becomes a 400 that names the field. Range checks of the sampling values belong to the engine's
SamplingParams, which reports them the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from engine.request import PromptInput

from ..http.errors import ApiError
from ..http.images import ImageRef
from ..http.validation import Strict, parse_body, request_error
from ..parsers import Parsing
from .tools import ResponseFormat, Tool, ToolChoice, ToolPlan, tool_plan

Role = Literal["system", "user", "assistant", "tool", "developer"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]  # engine.chat_format.EFFORTS
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}
# OpenAI request fields this server does not implement: refused by name, never ignored.
UNSUPPORTED = {
    "functions",
    "function_call",
    "logit_bias",
    "echo",
    "best_of",
    "suffix",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "service_tier",
    "store",
    "metadata",
}


def _field(loc, i: int) -> bool:
    """Location parts that are fields, not pydantic's union tags (`str`, `function-after[...]`, the
    part type it puts after a content part's index)."""
    tag = i > 0 and isinstance(loc[i - 1], int) and loc[i] in PART_TYPES and i + 1 < len(loc)
    return str(loc[i]) not in _UNION_TAGS and "[" not in str(loc[i]) and not tag


def _unsupported(param: str | None, err: dict) -> bool:
    return param in UNSUPPORTED and err["type"] in ("extra_forbidden", "literal_error", "none_required")


def bad_request(exc: ValidationError) -> ApiError:
    """The first problem of a request body, naming its field (`messages.0.role`)."""
    return request_error(exc, keep=_field, unsupported=_unsupported)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageUrl(Strict):
    url: str = Field(min_length=1)  # a data: URL, or http(s) where router.images.allow_hosts allows it
    # the resolution is the model's processor's: only "auto" (OpenAI's default) is taken
    detail: Literal["auto"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
PART_TYPES = ("text", "image_url")


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, v):
        if isinstance(v, list):
            for part in v:
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    raise ValueError(
                        'content parts must be {"type": "text", "text": ...} or {"type": "image_url", '
                        '"image_url": {"url": ...}} (audio and file parts are not supported)'
                    )
        return v

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to an assistant message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.role != "user" and self.images():
            raise ValueError("content: images belong in user messages")
        return self

    def images(self) -> list[ImagePart]:
        return [p for p in self.content or [] if isinstance(p, ImagePart)] if isinstance(self.content, list) else []

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it: text parts joined into one string, or with
        images, the parts in order, each image as {"type": "image"} (its bytes travel in
        PromptInput.images, in the same order)."""
        content: Any = self.content
        if isinstance(content, list):
            if self.images():
                content = [
                    {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in content
                ]
            else:
                content = "".join(p.text for p in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _SamplingRequest(Strict):
    """Fields shared by both endpoints. Ranges are checked by the engine's SamplingParams."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict[str, Any]:
        """The sampling fields the client set (the model's defaults fill the rest)."""
        return {f: getattr(self, f) for f in SAMPLING_FIELDS if getattr(self, f) is not None}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # the chat template's variables, and the reasoning asked for: the model maps it onto its
    # template or refuses it by name (engine.chat_format.thinking_variables)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    _plan: ToolPlan = PrivateAttr(default_factory=ToolPlan)

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        self._plan = tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls, self.response_format)
        return self

    @property
    def plan(self) -> ToolPlan:
        return self._plan

    def parsing(self) -> Parsing:
        """What the output is parsed for: reasoning always, calls of the request's tools when it has any."""
        if not self.plan.parse:
            return Parsing()
        return Parsing(
            tools=tuple(t.function.name for t in self.tools),
            forced=self.plan.forced is not None,
            schemas={t.function.name: t.function.parameters or {} for t in self.tools},
        )

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.max_completion_tokens is not None and self.max_tokens is None:
            out["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            out["logprobs"], out["top_logprobs"] = True, self.top_logprobs or 0
        guided = self.plan.guided()
        if guided is not None:
            out["guided"] = guided
        return out

    def image_refs(self) -> list[ImageRef]:
        """The request's images in order of appearance, each with the field that names it."""
        return [
            ImageRef(f"messages.{i}.content.{j}.image_url", part.image_url.url)
            for i, m in enumerate(self.messages)
            if isinstance(m.content, list)
            for j, part in enumerate(m.content)
            if isinstance(part, ImagePart)
        ]

    def prompt_input(self, images: list[bytes] | None = None) -> PromptInput:
        """The prompt; `images`: the bytes of `image_refs()`, loaded by the router (http.images)."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.plan.render_tools else None
        return PromptInput(
            messages=[m.as_dict() for m in self.messages],
            tools=tools,
            chat_template_kwargs=self.chat_template_kwargs,
            reasoning_effort=self.reasoning_effort,
            images=images or None,
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Literal[False] = False
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's legacy shape: the k best per token
    response_format: ResponseFormat | None = None

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.logprobs is not None:
            out["logprobs"], out["top_logprobs"] = True, self.logprobs
        if self.response_format is not None and self.response_format.guided() is not None:
            out["guided"] = self.response_format.guided()
        return out

    @field_validator("prompt")
    @classmethod
    def _single(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    def prompt_input(self) -> PromptInput:
        return (
            PromptInput(text=self.prompt) if isinstance(self.prompt, str) else PromptInput(token_ids=list(self.prompt))
        )


def parse_request(body: bytes, model_cls: type[Strict]) -> Any:
    return parse_body(body, model_cls, bad_request)


def model_card(name: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mlx-orchard", **extra}
