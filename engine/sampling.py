"""Per-request sampling: validated parameters and the sampler / logits processors they build.

Each request in a batch gets its own sampler (temperature, top_k, top_p, min_p, its own seeded
random key) and its own penalties, so one batch can mix greedy and sampled requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .constraints import GuidedSpec
from .errors import InvalidRequestError

Sampler = Callable[[mx.array], mx.array]

PENALTY_WINDOW = 1024  # the last tokens a penalty counts (prompt and output), in both batch loops


class SamplingParams(BaseModel):
    """OpenAI-style sampling parameters, validated once at the door."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Makes sampling reproducible per request.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: list[str] = Field(default_factory=list, description="Stop strings; matched text is not returned.")
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    logprobs: bool = Field(False, description="Return each output token's log-probability.")
    top_logprobs: int = Field(0, ge=0, le=20, description="With logprobs: also the k most likely tokens.")
    guided: GuidedSpec | None = Field(None, description="A JSON schema or grammar the output must match.")
    max_thinking_tokens: int | None = Field(
        None, ge=1, description="Most tokens inside the reasoning block (the model's cap, if lower, wins)."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v):
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        if len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def parse(cls, values: dict) -> SamplingParams:
        """Validate a plain dict, raising InvalidRequestError that names the field."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            msg = err["msg"].removeprefix("Value error, ")
            raise InvalidRequestError(f"{field}: {msg}" if field else msg, param=field) from exc


JOINED = ("stop", "stop_token_ids")


def with_defaults(defaults: dict, request: dict) -> dict:
    """A request's sampling values over a model's defaults. Stop strings and stop token ids are
    joined, not replaced: a model's own (Gemma's <end_of_turn>) stop it whatever a client sends."""
    out = {**defaults, **request}
    for key in JOINED:
        if defaults.get(key) and request.get(key):
            out[key] = list(dict.fromkeys(_as_list(defaults[key]) + _as_list(request[key])))
    return out


def _as_list(value) -> list:
    """A stop field as a list: one string or token id, or several."""
    return [value] if isinstance(value, (str, int)) else list(value)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(params: SamplingParams) -> Sampler:
    """A sampler over log-probabilities [B, vocab] → [B] with this request's own random key.

    Greedy requests share one function, so an all-greedy batch samples in one batched call.
    """
    if params.greedy:
        return greedy
    key = [mx.random.key(params.seed % 2**64)] if params.seed is not None else None
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        if params.top_k > 0:
            logprobs = apply_top_k(logprobs, params.top_k)
        if params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0.0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def make_processors(params: SamplingParams) -> list:
    """Penalties over the last `PENALTY_WINDOW` tokens (mlx_lm's logits processors)."""
    return make_logits_processors(
        repetition_penalty=None if params.repetition_penalty == 1.0 else params.repetition_penalty,
        repetition_context_size=PENALTY_WINDOW,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_WINDOW,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_WINDOW,
    )
