"""The HTTP pieces every API shares: error shapes, validation messages, SSE framing, the API key
check and the body limit."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError

from deployments.http.auth import check_api_key, has_key
from deployments.http.body import read_body
from deployments.http.errors import ApiError, anthropic_error_body
from deployments.http.sse import HEADERS, SSE_DONE, sse_data, sse_event
from deployments.http.validation import Strict, request_error


@pytest.mark.parametrize(
    "status,openai_type,expected",
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (404, "invalid_request_error", "not_found_error"),
        (413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_error"),
        (409, "invalid_request_error", "invalid_request_error"),
        (500, "server_error", "api_error"),
        (502, "server_error", "api_error"),
        (503, "server_error", "overloaded_error"),
        (504, "timeout_error", "timeout_error"),
        (None, "overloaded_error", "overloaded_error"),
        (None, "timeout_error", "timeout_error"),
        (None, "server_error", "api_error"),
    ],
)
def test_error_types(status, openai_type, expected):
    body = {"error": {"message": "m", "type": openai_type, "param": None, "code": None}}
    assert anthropic_error_body(body, status) == {"type": "error", "error": {"type": expected, "message": "m"}}


def test_an_engine_error_item_keeps_its_status_shape_and_retry_after():
    item = {
        "error": {"message": "queue full", "type": "overloaded_error", "param": None, "code": "overloaded"},
        "status_code": 503,
        "retry_after_s": 2.4,
    }
    err = ApiError.from_item(item)
    assert err.status_code == 503 and err.headers == {"Retry-After": "2"}
    assert err.body == {"error": item["error"]}
    assert ApiError.from_item({**item, "status_code": 400}).headers == {}


def test_sse_framing_is_compact_json_and_keeps_non_ascii():
    assert sse_data({"a": "é", "b": [1, 2]}) == 'data: {"a":"é","b":[1,2]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert sse_event("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert HEADERS == {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Body(Strict):
    name: str
    n: int = 0


def first_error(raw: bytes, **options) -> ApiError:
    with pytest.raises(ValidationError) as info:
        Body.model_validate_json(raw)
    return request_error(info.value, **options)


def test_validation_errors_name_the_field_or_the_body():
    assert first_error(b"{nope").body["error"]["message"].startswith("the request body is not valid JSON: ")
    assert first_error(b"[1]").body["error"]["message"] == "the request body must be a JSON object"
    strict = first_error(b'{"name": "x", "n": "3"}')  # no coercion
    assert strict.body["error"]["param"] == "n" and strict.body["error"]["message"].startswith("n: ")
    extra = first_error(b'{"name": "x", "zz": 1}', unknown_field="unknown field")
    assert extra.body["error"] == {
        "message": "zz: unknown field",
        "type": "invalid_request_error",
        "param": "zz",
        "code": None,
    }
    refused = first_error(b'{"name": "x", "zz": 1}', unsupported=lambda param, err: param == "zz")
    assert refused.body["error"]["code"] == "unsupported_parameter" and refused.status_code == 400


def key_app(x_api_key: bool) -> httpx.AsyncClient:
    app = FastAPI()

    @app.get("/")
    async def root(request: Request):
        try:
            check_api_key(request, "secret-key-123", x_api_key=x_api_key)
        except ApiError as exc:
            return {"status": exc.status_code, "message": exc.body["error"]["message"]}
        return {"status": 200, "bearer": has_key(request, "secret-key-123")}

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_the_api_key_as_a_bearer_token_or_x_api_key_where_allowed():
    async with key_app(x_api_key=False) as client:
        assert (await client.get("/", headers={"Authorization": "Bearer secret-key-123"})).json()["status"] == 200
        assert (await client.get("/", headers={"Authorization": "bearer  secret-key-123 "})).json()["status"] == 200
        denied = (await client.get("/", headers={"x-api-key": "secret-key-123"})).json()
        assert denied == {"status": 401, "message": "invalid or missing API key (Authorization: Bearer <key>)"}
    async with key_app(x_api_key=True) as client:
        assert (await client.get("/", headers={"x-api-key": "secret-key-123"})).json()["status"] == 200
        assert (await client.get("/", headers={"Authorization": "Bearer secret-key-123"})).json()["status"] == 200
        denied = (await client.get("/", headers={"x-api-key": "secret-key-12"})).json()
        assert denied["status"] == 401 and "x-api-key: <key>" in denied["message"]


async def test_a_body_over_the_limit_is_a_413_declared_or_streamed():
    app = FastAPI()

    @app.post("/")
    async def root(request: Request):
        try:
            return {"bytes": len(await read_body(request, 1024))}
        except ApiError as exc:
            return {"status": exc.status_code, "code": exc.body["error"]["code"]}

    async def chunks(n: int):
        for _ in range(n):
            yield b"x" * 512

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/", content=b"x" * 1024)).json() == {"bytes": 1024}
        too_big = {"status": 413, "code": "request_too_large"}
        assert (await client.post("/", content=b"x" * 1025)).json() == too_big
        assert (await client.post("/", content=chunks(3))).json() == too_big  # no content-length
        assert json.loads((await client.post("/", content=chunks(2))).text) == {"bytes": 1024}
