"""POST /v1/chat/completions and /v1/completions: an OpenAI request in, the router's events out in
OpenAI's shapes (a JSON body, or SSE chunks ending with `data: [DONE]`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..events import Event
from ..hop import GenerateRequest
from ..http.errors import ApiError
from ..http.sse import SSE_DONE, event_stream, sse_data
from .builders import ResponseBuilder, new_id
from .protocol import ChatCompletionRequest, CompletionRequest, parse_request

Kind = Literal["chat", "text"]


def response_builder(req: ChatCompletionRequest | CompletionRequest, kind: Kind) -> ResponseBuilder:
    chat = kind == "chat"
    return ResponseBuilder(
        kind,
        req.model,
        new_id("chatcmpl" if chat else "cmpl"),
        tools=chat and req.plan.parse,
        forced_tools=chat and req.plan.forced is not None,
        logprobs=req.logprobs not in (None, False),
        include_usage=req.include_usage,
    )


async def sse_body(batches: AsyncIterator[list[Event]], builder: ResponseBuilder) -> AsyncIterator[bytes]:
    """The SSE body; closing it (the client went away) closes the batches, which cancels the call."""
    try:
        async for batch in batches:
            for item in builder.chunks(batch):
                yield sse_data(item)
        yield SSE_DONE
    finally:
        await batches.aclose()


async def complete(core, request: Request, kind: Kind) -> Response:
    """One request of either endpoint; the metrics count it as "chat" or "completions"."""
    start = time.monotonic()
    endpoint = "chat" if kind == "chat" else "completions"
    model = "-"
    try:
        req = parse_request(
            await core.read_body(request), ChatCompletionRequest if kind == "chat" else CompletionRequest
        )
        model = req.model
        builder = response_builder(req, kind)
        prompt = req.prompt_input(await core.images.load(req.image_refs())) if kind == "chat" else req.prompt_input()
        sent = GenerateRequest(prompt, req.sampling(), request_id=builder.id)
        call = await core.start(model, sent, start)
    except ApiError as exc:
        core.observe(model, endpoint, exc.status_code)
        raise
    parsing = req.parsing() if kind == "chat" else None
    if req.stream:
        core.observe(model, endpoint, 200)
        return event_stream(sse_body(core.stream(call, parsing), builder))
    try:
        events = await core.collect(call, parsing)
    except ApiError as exc:
        core.observe(model, endpoint, exc.status_code)
        raise
    core.observe(model, endpoint, 200)
    return JSONResponse(builder.full(events))


def install_openai_routes(app: FastAPI, core, auth) -> None:
    """Registers the two OpenAI generation routes (`auth`: the API key dependency)."""

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request):
        return await complete(core, request, "chat")

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(request: Request):
        return await complete(core, request, "text")
