"""A model-level chat template for models whose tokenizer has none (base models).

The bundled gemma-3-270m GGUF is the base model: its tokenizer carries no chat template, so the
engine refuses chat messages. A `chat_template` in the model's args (a Jinja template over
`messages` and `add_generation_prompt`, rendered like Hugging Face's) turns the messages into plain
prompt text before they reach the engine; the tokenizer adds BOS itself, so templates leave it out.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import InvalidRequestError


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def check_template(template: str) -> str | None:
    """A syntax problem of the template, or None."""
    try:
        _compile(template)
    except TemplateSyntaxError as exc:
        return f"invalid Jinja template: {exc.message} (line {exc.lineno})"
    return None


def render(template: str, messages: list[dict[str, Any]]) -> str:
    try:
        text = _compile(template).render(messages=messages, add_generation_prompt=True)
    except TemplateError as exc:
        raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
    if not text:
        raise InvalidRequestError("the chat template rendered an empty prompt", param="messages")
    return text
