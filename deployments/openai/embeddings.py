"""POST /v1/embeddings: OpenAI's embeddings API over the embedding models (`kind: embedding`).

    {"model": "all-minilm-l6-v2", "input": ["A man is eating food.", "..."]}
    → {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}, ...],
       "model": "all-minilm-l6-v2", "usage": {"prompt_tokens": 14, "total_tokens": 14}}

`input` is a string, a list of strings, a list of token ids or a list of token-id lists (ids of the
model's own tokenizer, not OpenAI's); at most MAX_INPUTS inputs, none empty. `encoding_format`
`base64` sends each vector as the base64 of its little-endian float32 bytes (what OpenAI's SDK asks
for by default, and decodes). `dimensions` keeps the first components, renormalized. `user` is
accepted and not used. One extension: `truncate: true` cuts an input longer than the model's
context to its first tokens instead of refusing it (400 `context_length_exceeded`, the default).
The request is parsed strictly: an unknown field is a 400 naming it. No MLX here.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from ..hop import Embeddings, EmbedRequest
from ..http.errors import ApiError
from ..http.validation import Strict, parse_body
from .builders import new_id
from .protocol import bad_request

ENDPOINT = "embeddings"
MAX_INPUTS = 2048  # inputs per request, as OpenAI's API allows
SHAPE = "input must be a string, a list of strings, a list of token ids or a list of token-id lists"


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]] = Field(description=SHAPE)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="keep this many first components (renormalized)")
    user: str | None = None
    truncate: bool = Field(False, description="extension: cut an over-long input to the context, not refuse it")

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        """One clear message for a wrong shape (pydantic's would list every branch of the union)."""
        if isinstance(v, str):
            if not v:
                raise ValueError("input must not be an empty string")
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(f"{SHAPE}, not empty" if isinstance(v, list) else SHAPE)
        if len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(v)}")
        if all(isinstance(x, str) for x in v):
            if not all(v):
                raise ValueError(f"input[{[bool(x) for x in v].index(False)}] is an empty string")
        elif all(_token_id(x) for x in v):
            pass
        elif all(isinstance(x, list) for x in v):
            for i, ids in enumerate(v):
                if not ids or not all(_token_id(t) for t in ids):
                    raise ValueError(f"input[{i}] must be a non-empty list of token ids (integers >= 0)")
        else:
            raise ValueError(SHAPE + " (all of one kind)")
        return v

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as the engine takes them: a list of texts or of token-id lists."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [list(self.input)]
        return list(self.input)


def _token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One vector as OpenAI sends it: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()


def embeddings_body(req: EmbeddingRequest, answer: Embeddings) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
        for i, v in enumerate(answer["vectors"])
    ]
    tokens = int(answer["prompt_tokens"])
    return {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def create_embeddings(core, request: Request) -> JSONResponse:
    start = time.monotonic()
    model = "-"
    try:
        req = parse_body(await core.read_body(request), EmbeddingRequest, bad_request)
        model = req.model
        sent = EmbedRequest(req.inputs(), truncate=req.truncate, dimensions=req.dimensions, request_id=new_id("emb"))
        answer = await core.embed(model, sent, start)
    except ApiError as exc:
        core.observe(model, ENDPOINT, exc.status_code)
        raise
    core.observe(model, ENDPOINT, 200)
    return JSONResponse(embeddings_body(req, answer))


def install_embedding_routes(app: FastAPI, core, auth) -> None:
    """Registers POST /v1/embeddings (`auth`: the API key dependency)."""

    @app.post("/v1/embeddings", dependencies=[auth])
    async def embeddings(request: Request):
        return await create_embeddings(core, request)
