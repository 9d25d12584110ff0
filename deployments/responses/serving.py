"""POST /v1/responses, GET and DELETE /v1/responses/{id}: the Responses API over the router's events.

A request's conversation (the stored one of `previous_response_id`, then its own input) becomes
the chat request its prompt is built from (`convert.to_chat_request`) and runs like any other
(`RouterCore.start`); the events that come back are rendered here as a response resource, or as
its stream of named SSE events (`builders.ResponseEvents`). Everything that can refuse a request
(the body, an unknown previous response, a function_call_output for no call, the chat path's
checks) is checked before the model is called, so a refused request leaves nothing queued. With
`store` (the default, as OpenAI) the finished response is kept with its conversation
(`store.StoreClient`) before its last event is sent. Errors are in OpenAI's shape (the app's
handlers).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..events import Event
from ..hop import GenerateRequest
from ..http.errors import ApiError
from ..http.sse import event_stream, sse_event
from .builders import ResponseEvents, new_id
from .convert import check_calls, image_refs, renamed, stored_items, to_chat_request
from .protocol import Item, ResponsesRequest, parse
from .store import StoreClient

ENDPOINT = "responses"  # the metrics' endpoint label


def not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(
        404,
        f"no stored response with id {response_id!r} (never stored, deleted, or evicted from the store)",
        type="invalid_request_error",
        param=param,
        code="response_not_found",
    )


async def conversation(store: StoreClient, req: ResponsesRequest) -> list[Item]:
    """The items the prompt is built from: the previous response's conversation and output, then
    this request's input."""
    earlier: list[Item] = []
    if req.previous_response_id is not None:
        record = await store.get(req.previous_response_id)
        if record is None:
            raise not_found(req.previous_response_id, "previous_response_id")
        earlier = stored_items(record["items"] + record["response"]["output"])
    items = earlier + req.items()
    check_calls(items, len(earlier))
    return items


def _dumped(items: list[Item]) -> list[dict[str, Any]]:
    return [i.model_dump(exclude_none=True, by_alias=True) for i in items]


async def stream_body(batches: AsyncIterator[list[Event]], events: ResponseEvents, save) -> AsyncIterator[bytes]:
    """The SSE body; the finished response is saved before its last event goes. Closing it (the
    client went away) closes the batches, which cancels the call."""
    saved = False
    try:
        for e in events.start():
            yield sse_event(e["type"], e)
        async for batch in batches:
            out = events.feed(batch)
            if events.final is not None and not saved:
                saved = True
                await save(events.final)
            for e in out:
                yield sse_event(e["type"], e)
    finally:
        await batches.aclose()


async def create_response(core, request: Request) -> Response:
    """POST /v1/responses; the metrics count it as "responses"."""
    start, model = time.monotonic(), "-"
    try:
        req = parse(await core.read_body(request))
        model = req.model
        items = await conversation(core.store, req)
        chat = to_chat_request(req, items)
        response_id = new_id("resp")
        images = await core.images.load(image_refs(items, len(items) - len(req.items())))
        sent = GenerateRequest(chat.prompt_input(images), chat.sampling(), request_id=response_id)
        try:
            call = await core.start(model, sent, start)
        except ApiError as exc:
            if exc.status_code != 400:
                raise
            raise renamed(exc) from None
        events = ResponseEvents(req, response_id)

        async def save(response: dict[str, Any]) -> None:
            if req.store:
                await core.store.put(response, _dumped(items))

        if req.stream:
            response = event_stream(stream_body(core.stream(call, chat.parsing()), events, save))
        else:
            final = events.whole(await core.collect(call, chat.parsing()))
            await save(final)
            response = JSONResponse(final)
    except ApiError as exc:
        core.observe(model, ENDPOINT, exc.status_code)
        raise
    core.observe(model, ENDPOINT, 200)
    return response


async def retrieve_response(core, response_id: str) -> dict[str, Any]:
    record = await core.store.get(response_id)
    if record is None:
        raise not_found(response_id)
    return record["response"]


async def delete_response(core, response_id: str) -> dict[str, Any]:
    if not await core.store.delete(response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def install_responses_routes(app: FastAPI, core, auth) -> None:
    """Registers the Responses routes (`auth`: the API key dependency)."""

    @app.post("/v1/responses", dependencies=[auth])
    async def responses(request: Request):
        return await create_response(core, request)

    @app.get("/v1/responses/{response_id}", dependencies=[auth])
    async def get_response(response_id: str):
        return await retrieve_response(core, response_id)

    @app.delete("/v1/responses/{response_id}", dependencies=[auth])
    async def remove_response(response_id: str):
        return await delete_response(core, response_id)
