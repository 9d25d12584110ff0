"""How a model writes its answer: the tool-call format and the reasoning format of its output.

Both are properties of the model's chat template (and vocabulary), so the replica, which has the
template, decides them once per model (`model_format`), the YAML may override either, and each
request adds whether its prompt already opened a reasoning block (`OutputFormat.in_reasoning`:
templates such as DeepSeek-R1's end the prompt with `<think>`). The replica sends the request's
`OutputFormat` with its first chunk; the router parses the output with it (deployments.parsers).
This module is MLX-free: the router imports the names.

Tool formats (the output's call syntax):
  hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (NousResearch, Qwen 2.5/3)
  llama3_json  `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>` (Llama 3.x)
  mistral      `[TOOL_CALLS][{"name", "arguments"}, ...]` (v3) or `[TOOL_CALLS]name[ARGS]{...}` (v11+)
  qwen3_coder  `<tool_call><function=name><parameter=p>value</parameter></function></tool_call>`
  pythonic     `[f(a=1), g(b="x")]` (Llama 4, Gemma-style, LFM2 between `<|tool_call_start|>` tags)
  deepseek_v3  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name ```json {...}``` ...`
  harmony      GPT-OSS channels: `commentary to=functions.name ... <|message|>{...}<|call|>`
Reasoning formats (where the thinking is), read from the template in this order:
  harmony      GPT-OSS's `analysis` channel (the template writes `<|channel|>`)
  mistral      `[THINK]...[/THINK]` (Magistral: the template or its system prompt shows `[THINK]`)
  think        `<think>...</think>` (Qwen3, QwQ, DeepSeek-R1 distills and V3.1, SmolLM3, Granite 3.3)
Whether the output starts inside the block is read from each prompt's end: Qwen3 and SmolLM3 let
the model open it (and close an empty one in the prompt when thinking is off), QwQ, R1 distills and
DeepSeek V3.1 open it in the prompt.

Thinking switches: templates read a variable that turns thinking on or off (`enable_thinking`:
Qwen3, SmolLM3; `thinking`: Granite, DeepSeek V3.1) or sets its effort (`reasoning_effort`:
GPT-OSS). `thinking_variables` maps a request's `reasoning_effort` (OpenAI) or thinking on/off
(Anthropic) onto what the model's template reads, or refuses it by name when it reads nothing that
could honour it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidRequestError

TOOL_FORMATS = ("hermes", "llama3_json", "mistral", "qwen3_coder", "pythonic", "deepseek_v3", "harmony")
REASONING_FORMATS = ("think", "mistral", "harmony")

# The tags that open and close a reasoning block, per tag-delimited reasoning format.
REASONING_TAGS = {"think": ("<think>", "</think>"), "mistral": ("[THINK]", "[/THINK]")}


@dataclass(frozen=True)
class OutputFormat:
    """How one request's output is written: `tools` its call syntax (one of TOOL_FORMATS),
    `reasoning` where its thinking goes (one of REASONING_FORMATS, None: it does not think),
    `in_reasoning` whether the output starts inside a reasoning block the prompt opened."""

    tools: str = "hermes"
    reasoning: str | None = None
    in_reasoning: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any] | None) -> OutputFormat:
        return cls(**value) if value else cls()


def template_source(template: Any) -> str:
    """A chat template's text; several named templates (a dict) as one text."""
    if isinstance(template, dict):
        return " ".join(str(v) for v in template.values())
    return template if isinstance(template, str) else ""


# Each format's markers in a chat template's text, in the order they are tried: a template that
# shows several (Qwen3-Coder's <tool_call><function=...>, which Hermes' <tool_call> would also
# match; a pythonic template that mentions JSON) takes the first.
TOOL_MARKERS = (
    ("harmony", ("<|channel|>", "<|message|>")),  # GPT-OSS: both, anywhere
    ("deepseek_v3", ("<｜tool▁calls▁begin｜>",)),
    ("mistral", ("[TOOL_CALLS]",)),
    ("qwen3_coder", ("<function=", "<parameter=")),
    ("pythonic", ("<|tool_call_start|>",)),  # LFM2
    ("pythonic", ("<|python_start|>",)),  # Llama 4's pythonic template
    ("pythonic", ("[func_name1(",)),  # the pythonic templates' instruction (Llama 3.2 / 4)
    ("llama3_json", ("<|python_tag|>",)),  # Llama 3.1 / 3.3
    ("llama3_json", ('"parameters": dictionary of argument name',)),  # Llama 3.2's instruction
)


@functools.lru_cache(maxsize=16)
def takes_tools(template: str) -> bool:
    """Whether a chat template renders a `tools` variable (it describes the tools itself)."""
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:  # an extension the plain environment lacks: read the text
        return "tools" in template


def detect_tool_format(template: str) -> str:
    """The call syntax a chat template teaches its model. Hermes when the template shows none, or
    takes no tools: its model is then told about them, and how to call them, in the Hermes system
    prompt (engine.tool_prompt)."""
    if not takes_tools(template):
        return "hermes"
    for fmt, markers in TOOL_MARKERS:
        if all(m in template for m in markers):
            return fmt
    return "hermes"


def detect_reasoning_format(template: str) -> str | None:
    """Where a chat template's model thinks; None for a model that does not."""
    if "<|channel|>" in template:
        return "harmony"
    if "[THINK]" in template:
        return "mistral"
    if "</think>" in template or "<think>" in template:
        return "think"
    return None


EFFORTS = ("none", "minimal", "low", "medium", "high")  # OpenAI's reasoning_effort
SWITCHES = ("enable_thinking", "thinking")  # template variables that turn thinking on and off
EFFORT_VARIABLE = "reasoning_effort"  # GPT-OSS reads it: low, medium or high
# apply_chat_template's own arguments: never template variables from a request
RESERVED_KWARGS = frozenset(
    ("messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "tokenize")
    + ("continue_final_message", "return_dict", "return_tensors", "padding", "truncation", "max_length")
)


@functools.lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """The variables a chat template reads from outside (jinja2's static analysis)."""
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return frozenset(jinja2.meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template)))
    except Exception:  # noqa: BLE001 - a template jinja cannot parse reads nothing we could check
        return frozenset()


def check_template_kwargs(kwargs: dict[str, Any], reads: frozenset[str], param: str) -> None:
    """Template variables must be ones the template reads and not apply_chat_template's own
    arguments: anything else would be silently ignored. Raises InvalidRequestError naming it."""
    for key in kwargs:
        if key in RESERVED_KWARGS:
            raise InvalidRequestError(
                f"{param}.{key}: an argument of the chat template call itself, not a template variable",
                param=f"{param}.{key}",
            )
        if key not in reads:
            known = ", ".join(sorted(reads - RESERVED_KWARGS - {"bos_token", "eos_token", "raise_exception"}))
            raise InvalidRequestError(
                f"{param}.{key}: this model's chat template does not read {key!r} (it reads: {known or 'nothing'})",
                param=f"{param}.{key}",
            )


def thinking_variables(
    reads: frozenset[str], reasoning: str | None, effort: str | None = None, thinking: bool | None = None
) -> dict[str, Any]:
    """The template variables that honour a request's `reasoning_effort` (OpenAI) or `thinking`
    on/off (Anthropic), for a template that `reads` these variables and a model whose output
    `reasoning` format is known (None: it does not think). Levels map to on where the template
    has no levels; a request the template cannot honour is refused, naming the field."""
    if effort is None and thinking is None:
        return {}
    param = "reasoning_effort" if effort is not None else "thinking"
    on = thinking if effort is None else effort not in ("none", "minimal")
    if effort is not None and on and EFFORT_VARIABLE in reads:
        return {EFFORT_VARIABLE: effort}
    switch = next((v for v in SWITCHES if v in reads), None)
    if switch is not None:
        return {switch: on}
    if (reasoning is not None) == on:
        return {}  # the model already does what was asked: it always thinks, or never does
    if reasoning is None:
        why = "this model does not think (its chat template shows no reasoning format)"
    elif EFFORT_VARIABLE in reads:
        why = "this model always thinks: its chat template takes reasoning_effort low, medium or high"
    else:
        why = "this model always thinks: its chat template has no switch for it"
    raise InvalidRequestError(f"{param}: {why}", param=param)


def prompt_opens_reasoning(prompt_tail: str, reasoning: str | None) -> bool:
    """Whether a prompt (its last few tokens' text) ends inside an open reasoning block."""
    tags = REASONING_TAGS.get(reasoning or "")
    if tags is None:
        return False
    opened, closed = prompt_tail.rfind(tags[0]), prompt_tail.rfind(tags[1])
    return opened >= 0 and opened > closed and not prompt_tail[opened + len(tags[0]) :].strip()


def merged_template_kwargs(
    model: dict[str, Any], request: dict[str, Any], mapped: dict[str, Any], mapped_from: str
) -> dict[str, Any]:
    """A request's template variables: the model's defaults, under what its reasoning_effort or
    thinking maps to (`mapped`, from `mapped_from`), under its own chat_template_kwargs. The last
    two must agree where both set a variable."""
    for key, value in mapped.items():
        if key in request and request[key] != value:
            raise InvalidRequestError(
                f"{mapped_from}: asks for {key}={value!r} but chat_template_kwargs.{key} is {request[key]!r}",
                param=mapped_from,
            )
    return {**model, **mapped, **request}
