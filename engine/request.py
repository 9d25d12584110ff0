"""What goes into the engine, what comes out of it, and the record of a request inside it."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # annotations only: this module is light (the router imports it)
    from .constraints import Constraint
    from .kv.paged_cache import SeqBlocks
    from .sampling import SamplingParams
    from .text_stream import TextStream
    from .thinking import ThinkingCap
    from .vision.prompt import VisionPrompt

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class PromptInput:
    """Exactly one of: chat messages (through the chat template), plain text, or token ids."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, rendered with the messages
    # with messages: the chat template's variables (`enable_thinking`...), and the reasoning asked
    # for, mapped onto what the template reads (engine.chat_format.thinking_variables)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # OpenAI's: none, minimal, low, medium, high
    thinking: bool | None = None  # Anthropic's thinking enabled / disabled
    # with messages: the image files (raw bytes, checked by the router), in the order of the
    # messages' {"type": "image"} content parts
    images: list[bytes] | None = None


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
    stop_sequence: str | None = None  # on the last delta: the stop string that ended the request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """One request inside the engine, from its admission to its last output: the one record the
    scheduler keeps, the batch loop's row points at and the cache manager's blocks are held for.
    `prompt_ids` is the prompt, stored here only."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    text: TextStream
    constraint: Constraint | None = None  # its grammar (structured output); it lives with the request
    cap: ThinkingCap | None = None  # its cap on reasoning tokens (engine.thinking), if it has one
    vision: VisionPrompt | None = None  # its images (engine.vision): where their tokens are, their features
    adapter: str | None = None  # the LoRA adapter it runs under (engine.adapters); None: the base
    lora_slot: int = 0  # its adapter's slot in the table once admitted (0: the base)
    cache_salt: bytes | None = None  # its adapter's digest once admitted: the prefix cache's salt
    arrival: float = field(default_factory=time.monotonic)
    running: bool = False  # in the batch loop; False while waiting for admission (again, once preempted)
    blocks: SeqBlocks | None = None  # its K/V in the paged cache while running (None without one)
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[dict] | None = None  # with params.logprobs: one entry per pending token
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None

    @property
    def tokens(self) -> list[int]:
        """What its cache must hold to go on: the prompt and, after a preemption, its output."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def cache_tokens(self) -> list[int]:
        """`tokens` as the prefix cache keys them: an image's tokens by ids of that image
        (engine.vision.prompt), and under an adapter the first token by a key of that adapter."""
        ids = self.tokens if self.vision is None else self.vision.cache_ids(self.prompt_ids) + self.output_ids
        return ids if self.cache_salt is None else salted(ids, self.cache_salt)

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.output_ids)

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.output_ids), self.cached_tokens)


ADAPTER_KEYS = 1 << 40  # adapter keys start here: above every real token id (vision keys are negative)


def salted(ids: list[int], salt: bytes) -> list[int]:
    """`ids` as an adapter's requests key them in the prefix cache: the first id replaced by a key
    drawn from the adapter's digest and that id. A block's hash chains from the first block's, and
    a hit compares ids, so no block is shared with the base or another adapter (K/V differ from the
    first token on), while requests of one adapter share theirs as base requests do."""
    first = int(ids[0]).to_bytes(8, "little", signed=True)
    key = ADAPTER_KEYS + int.from_bytes(hashlib.blake2b(salt + first, digest_size=7).digest(), "little")
    return [key, *ids[1:]]
