"""The router's HTTP behaviour with scripted model clients (deployments.router and the OpenAI
routes): formats, errors, auth, limits, timeouts, model routes and metrics."""

from __future__ import annotations

import pytest

from deployments.config import ConfigError
from tests.fakes import HOT, OVERLOADED, USAGE, FakeClient, chunk, closing_batches, make_client, run, sse_events

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_chat_json_response():
    async def go():
        client, core = make_client()
        async with client:
            r = await client.post("/v1/chat/completions", json=CHAT)
        return r, core

    r, core = run(go())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 1
    assert isinstance(body["created"], int)
    payload = core.models["m1"].payloads[0]
    assert payload["sampling"] == {"max_tokens": 4} and payload["prompt"]["messages"][0]["content"] == "hi"


def test_chat_stream_with_usage():
    async def go():
        client, _ = make_client()
        async with client:
            return await client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            )

    r = run(go())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "Hello!"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 6
    assert all(e["usage"] is None for e in events[:-1])
    assert len({e["id"] for e in events}) == 1


def test_completions_json_and_stream():
    async def go():
        client, core = make_client()
        async with client:
            a = await client.post("/v1/completions", json={"model": "m1", "prompt": "Once", "max_tokens": 3})
            b = await client.post("/v1/completions", json={"model": "m1", "prompt": [1, 2], "stream": True})
        return a, b, core

    a, b, core = run(go())
    assert a.json()["object"] == "text_completion" and a.json()["choices"][0]["text"] == "Hello!"
    assert core.models["m1"].payloads[1]["prompt"] == {"token_ids": [1, 2]}
    events = sse_events(b.text)
    assert "".join(e["choices"][0]["text"] for e in events) == "Hello!"


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"[]", None),
        ({"model": "m1", "messages": []}, "messages"),
        ({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m1", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}, "bogus"),
        ({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ],
)
def test_invalid_bodies_are_400_naming_the_field(body, param):
    async def go():
        client, _ = make_client()
        async with client:
            if isinstance(body, bytes):
                return await client.post(
                    "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                )
            return await client.post("/v1/chat/completions", json=body)

    r = run(go())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    if param:
        assert param in err["message"]


def test_unknown_model_is_404_naming_hosted_models():
    async def go():
        client, _ = make_client(m1=FakeClient("m1"), m2=FakeClient("m2"))
        async with client:
            return await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})

    r = run(go())
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "m1" in err["message"] and "m2" in err["message"]


def test_engine_errors_map_to_status_codes():

    async def go():
        client, _ = make_client(a=FakeClient("a", [OVERLOADED]), b=FakeClient("b", [HOT]))
        async with client:
            ra = await client.post("/v1/chat/completions", json={**CHAT, "model": "a"})
            rb = await client.post("/v1/chat/completions", json={**CHAT, "model": "b", "stream": True})
        return ra, rb

    ra, rb = run(go())
    assert ra.status_code == 503 and ra.headers["retry-after"] == "2"
    assert rb.status_code == 400 and rb.json()["error"]["param"] == "temperature"


def test_api_key_and_body_limit():
    async def go():
        client, _ = make_client({"api_key": "secret-key-123", "max_request_body_bytes": 2048})
        async with client:
            no_key = await client.get("/v1/models")
            bad_key = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            ok = await client.get("/v1/models", headers={"Authorization": "Bearer secret-key-123"})
            health = await client.get("/health")
            big = await client.post(
                "/v1/chat/completions",
                headers={"Authorization": "Bearer secret-key-123"},
                json={**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]},
            )
            others = [
                await client.get("/metrics"),
                await client.post("/v1/models/m1/load"),
                await client.post("/v1/models/m1/unload"),
                await client.get("/v1/models/m1/cache"),
                await client.get("/v1/models/m1"),
                await client.get("/openapi.json"),
                await client.get("/docs"),
            ]
        return no_key, bad_key, ok, health, big, others

    no_key, bad_key, ok, health, big, others = run(go())
    assert [r.status_code for r in others] == [401, 401, 401, 401, 401, 404, 404]  # every route but /health
    assert no_key.status_code == 401 and bad_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    assert ok.status_code == 200 and [m["id"] for m in ok.json()["data"]] == ["m1"]
    assert health.status_code == 200
    assert big.status_code == 413


def test_timeout_aborts_the_model_stream():
    slow = FakeClient("m1", [chunk("a"), chunk("b"), chunk("c", 1, "stop", USAGE)], delay=0.3)

    async def go():
        client, _ = make_client({"request_timeout_s": 0.5}, m1=slow)
        async with client:
            return await client.post("/v1/chat/completions", json=CHAT)

    r = run(go())
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert slow.cancelled == 1


def test_models_cache_metrics_and_unknown_routes():
    async def go():
        client, _ = make_client()
        async with client:
            await client.post("/v1/chat/completions", json=CHAT)
            return (
                await client.get("/v1/models/m1/cache"),
                await client.get("/v1/models/zz/cache"),
                await client.get("/metrics"),
                await client.get("/v1/nope"),
                await client.get("/v1/models/m1"),
            )

    cache, missing, metrics, nope, card = run(go())
    assert cache.json()["cache"]["hits"] == 1 and cache.json()["engine"]["running"] == 1
    assert missing.status_code == 404
    text = metrics.text
    for needle in (
        'orchard_requests_total{endpoint="chat",model="m1",status="200"} 1.0',
        'orchard_completion_tokens_total{model="m1"} 3.0',
        "orchard_time_to_first_token_seconds_bucket",
        "orchard_inter_token_latency_seconds_count",
        'orchard_running_sequences{model="m1"} 1.0',
        'orchard_waiting_requests{model="m1"} 2.0',
        'orchard_cache_hit_rate{model="m1"} 0.5',
        'orchard_cache_blocks_used{model="m1"} 4.0',
        'orchard_cache_token_hit_rate{model="m1"} 0.25',
        'orchard_engine_stat{model="m1",stat="cache_misses"} 2.0',
    ):
        assert needle in text, needle
    assert nope.status_code == 404 and "error" in nope.json()
    assert card.json()["id"] == "m1"


def test_api_key_from_environment(monkeypatch):
    monkeypatch.delenv("ORCHARD_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="ORCHARD_TEST_KEY is not set"):
        make_client({"api_key_env": "ORCHARD_TEST_KEY"})
    monkeypatch.setenv("ORCHARD_TEST_KEY", "from-the-env-123")

    async def go():
        client, _ = make_client({"api_key_env": "ORCHARD_TEST_KEY"})
        async with client:
            return (
                await client.get("/v1/models"),
                await client.get("/v1/models", headers={"Authorization": "Bearer from-the-env-123"}),
            )

    denied, allowed = run(go())
    assert denied.status_code == 401 and allowed.status_code == 200


async def test_closing_an_openai_sse_body_closes_the_batches():
    """A client that goes away closes the body; the batches' own close is what cancels the model call."""
    from deployments.openai.builders import ResponseBuilder
    from deployments.openai.serving import sse_body

    closed = []
    body = sse_body(closing_batches(closed), ResponseBuilder("chat", "m1", "chatcmpl-1"))
    assert (await body.__anext__()).startswith(b"data: {")
    await body.aclose()
    assert closed == [True]


def test_a_request_ray_cancelled_because_its_client_left_is_no_error_in_the_log():
    """Ray cancels a request whose client disconnected; what surfaces in the router then (a
    TaskCancelledError) is a 499 for nobody, not an 'unexpected error' with its traceback."""
    import logging

    import httpx
    from ray.exceptions import TaskCancelledError

    from deployments.config import RouterConfig
    from deployments.router import RouterCore, create_app

    class Cancelled(FakeClient):
        async def start(self, request, started_at, deadline, load_timeout_s=None):
            raise TaskCancelledError()

    class Errors(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    errors = Errors()
    logging.getLogger("ray.serve").addHandler(errors)

    async def go():
        core = RouterCore(RouterConfig(), {"m1": Cancelled("m1")})
        transport = httpx.ASGITransport(app=create_app(core), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json=CHAT)

    try:
        r = run(go())
    finally:
        logging.getLogger("ray.serve").removeHandler(errors)
    assert r.status_code == 499 and errors.records == []
