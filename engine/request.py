"""What goes into the engine and what comes out of it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class PromptInput:
    """Exactly one of: chat messages (through the chat template), plain text, or token ids."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, rendered with the messages


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class RequestOutput:
    """One streamed delta. `finish_reason` and `usage` are set on the last one only."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    first_token_time: float | None = None  # monotonic time of the request's first token (first delta)
    created: float = field(default_factory=time.time)
    # with logprobs: one entry per token of token_ids, {"id", "token", "logprob", "top": [[id, token, logprob]]}
    logprobs: list[dict[str, Any]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
