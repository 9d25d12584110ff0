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
Reasoning formats (where the thinking is):
  think        `<think>...</think>` (Qwen3, QwQ, DeepSeek-R1 distills, SmolLM3, Granite)
  mistral      `[THINK]...[/THINK]` (Magistral)
  harmony      GPT-OSS's `analysis` channel
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

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
    if "</think>" in template:
        return "think"
    return None


def prompt_opens_reasoning(prompt_tail: str, reasoning: str | None) -> bool:
    """Whether a prompt (its last few tokens' text) ends inside an open reasoning block."""
    tags = REASONING_TAGS.get(reasoning or "")
    if tags is None:
        return False
    opened, closed = prompt_tail.rfind(tags[0]), prompt_tail.rfind(tags[1])
    return opened >= 0 and opened > closed and not prompt_tail[opened + len(tags[0]) :].strip()
