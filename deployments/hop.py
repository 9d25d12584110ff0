"""What crosses the hop between the router and a model's replica.

The router sends one `GenerateRequest` through a streaming handle (`ModelServer.generate`), and
gets back a stream of items, each a `Chunk` of output or, last, an `ErrorItem`. The request is
built from an API request the router has already validated; the replica fills in the model's
sampling defaults and parses the result once (`engine.sampling.SamplingParams`).

Items stay plain dicts (typed here) because they are merged, relayed and serialized as they are;
`merge_chunks` is the one way consecutive chunks become one (the replica's stream window, the
router's whole response). The router turns items into its typed event stream (deployments.events).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from engine.errors import OrchardError, OverloadedError
from engine.request import PromptInput


@dataclass(frozen=True)
class GenerateRequest:
    """One request for a model's replica."""

    prompt: PromptInput
    sampling: dict[str, Any] = field(default_factory=dict)  # the fields the client set, by SamplingParams' names
    request_id: str | None = None  # the engine's id for the request (the API response's id)
    adapter: str | None = None  # the LoRA adapter of the model to answer with (None: the model itself)
    trace_key: str | None = None  # the router's id of the request in hop traces (deployments.hop_trace)

    def resent(self, attempt: int) -> GenerateRequest:
        """The same request under its own id: a replica that was only unreachable may still hold
        the first attempt's id, and would refuse the same one again."""
        if not self.request_id:
            return self
        return dataclasses.replace(self, request_id=f"{self.request_id}-resend{attempt}")


class Chunk(TypedDict, total=False):
    """Output since the previous chunk: one Ray item per stream window, not per token."""

    text: str
    n_tokens: int
    finish_reason: str | None  # set on the last chunk
    usage: dict[str, Any] | None  # OpenAI's usage object, on the last chunk
    request_id: str
    prompt_tokens: int
    logprobs: list[dict[str, Any]]  # present only when the request asked for logprobs
    format: dict[str, Any]  # on the first chunk: how the output is written (engine.chat_format.OutputFormat)
    stop_sequence: str | None  # on the last chunk, when a stop string ended the request: which one


def merge_chunks(chunks: Sequence[Chunk]) -> Chunk:
    """Consecutive chunks of one request as one: text joined, tokens summed, logprobs concatenated
    (present when any chunk has them), the finish reason and usage of the last."""
    first, last = chunks[0], chunks[-1]
    merged: Chunk = {
        "text": "".join(c["text"] for c in chunks),
        "n_tokens": sum(c["n_tokens"] for c in chunks),
        "finish_reason": last["finish_reason"],
        "usage": last["usage"],
        "request_id": first["request_id"],
        "prompt_tokens": first["prompt_tokens"],
    }
    if "format" in first:
        merged["format"] = first["format"]
    if last.get("stop_sequence") is not None:
        merged["stop_sequence"] = last["stop_sequence"]
    if any("logprobs" in c for c in chunks):
        merged["logprobs"] = [e for c in chunks for e in c.get("logprobs") or ()]
    return merged


class ErrorItem(TypedDict):
    """An error, in OpenAI's shape, with the HTTP status it maps to."""

    error: dict[str, Any]  # message, type, param, code
    status_code: int
    retry_after_s: float | None  # for 503 (overloaded): when to try again


def error_item(exc: OrchardError) -> ErrorItem:
    return {
        "error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code},
        "status_code": exc.status_code,
        "retry_after_s": exc.retry_after_s if isinstance(exc, OverloadedError) else None,
    }


def failure_item(model: str, exc: BaseException) -> ErrorItem:
    """An unexpected failure of one request in the replica, as the router reports one of a call."""
    return {
        "error": {
            "message": f"model {model!r} failed: {type(exc).__name__}",
            "type": "server_error",
            "param": None,
            "code": None,
        },
        "status_code": 500,
        "retry_after_s": None,
    }


# --- embedding models (deployments.embedding_server): one call, one answer ---------------------


@dataclass(frozen=True)
class EmbedRequest:
    """One /v1/embeddings request for an embedding model's replica (`EmbeddingServer.embed`)."""

    inputs: list[str] | list[list[int]]  # texts, or token-id lists of the model's own tokenizer
    truncate: bool = False  # cut an over-long input to the context instead of refusing it
    dimensions: int | None = None  # keep the first components (renormalized)
    request_id: str | None = None


class Embeddings(TypedDict):
    """The answer to an EmbedRequest (or an ErrorItem instead)."""

    vectors: Any  # numpy float32 [inputs, dimensions], in input order
    prompt_tokens: int  # tokens read, special tokens included, after any truncation
