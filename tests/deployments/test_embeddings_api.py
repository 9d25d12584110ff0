"""POST /v1/embeddings in the router (deployments.openai.embeddings, RouterCore.embed) over the real
RayEmbeddingClient and a fake EmbeddingServer handle: the request parsed strictly, the answer in
OpenAI's shape (floats or base64), errors as 4xx naming the field, the other kind of model refused,
an unloaded model waited for, a lost replica's request sent again; any JSON body is a 200 or a 4xx."""

from __future__ import annotations

import base64
import json
import re
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from deployments.hop import EmbedRequest, error_item
from deployments.http.errors import ApiError
from deployments.openai.embeddings import EmbeddingRequest
from engine.errors import InvalidRequestError
from tests.fakes import LOOP, FakeClient, FakeEmbedHandle, embedding_client, fake_vectors, make_client, run

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def post(body, **clients):
    """One POST /v1/embeddings (and the core it went through) on a router hosting `clients`
    (default: the chat model m1 and the embedding model e1)."""
    clients = clients or {"m1": FakeClient("m1"), "e1": embedding_client()}

    async def go():
        client, core = make_client(**clients)
        async with client:
            return await client.post("/v1/embeddings", json=body), core

    return run(go())


def error_of(response) -> dict:
    return response.json()["error"]


@pytest.mark.parametrize(
    ("given", "inputs"),
    [
        ("one text", ["one text"]),
        (["a", "b"], ["a", "b"]),
        ([101, 7, 102], [[101, 7, 102]]),
        ([[101, 102], [101, 5, 102]], [[101, 102], [101, 5, 102]]),
    ],
)
def test_every_input_form_becomes_a_list_of_texts_or_of_token_id_lists(given, inputs):
    assert EmbeddingRequest.model_validate({"model": "e1", "input": given}).inputs() == inputs


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "empty string"),
        ([], "not empty"),
        (["a", ""], "input[1] is an empty string"),
        (["a", 1], "all of one kind"),
        ([[1, 2], []], "input[1] must be a non-empty list of token ids"),
        ([1, -2], "all of one kind"),
        ([True, 1], "all of one kind"),
        ({"text": "a"}, "must be a string, a list of strings"),
        (["x"] * 2049, "at most 2048 inputs"),
    ],
)
def test_a_malformed_input_is_refused_with_one_message(given, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        EmbeddingRequest.model_validate({"model": "e1", "input": given})


def test_floats_come_back_in_order_with_usage_in_openais_shape():
    r, core = post({"model": "e1", "input": ["ab", "cde"], "user": "u-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "e1"
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert [d["object"] for d in body["data"]] == ["embedding", "embedding"]
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert [d["embedding"] for d in body["data"]] == fake_vectors(["ab", "cde"]).tolist()
    sent = core.models["e1"]._handle.requests[0]
    assert sent.inputs == ["ab", "cde"] and sent.truncate is False and sent.dimensions is None
    assert sent.request_id.startswith("emb")


def test_base64_is_the_little_endian_float32_bytes_openais_sdk_decodes():
    r, _ = post({"model": "e1", "input": ["a", "b", "c"], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    np.testing.assert_array_equal(np.array(got), fake_vectors("abc"))


def test_truncate_and_dimensions_reach_the_model():
    r, core = post({"model": "e1", "input": [[101, 102]], "truncate": True, "dimensions": 2})
    assert r.status_code == 200, r.text
    sent = core.models["e1"]._handle.requests[0]
    assert (sent.inputs, sent.truncate, sent.dimensions) == ([[101, 102]], True, 2)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "e1", "input": "a", "pooling": "cls"}, "pooling"),
        ({"model": "e1", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "e1", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "e1", "input": "a", "truncate": "yes"}, "truncate"),
        ({"model": "e1", "input": 3}, "input"),
        ({"model": "e1"}, "input"),
        ({"input": "a"}, "model"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(body, param):
    r, core = post(body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param and error_of(r)["type"] == "invalid_request_error"
    assert core.models["e1"]._handle.requests == []


def test_the_models_own_refusal_is_a_400_with_its_code_and_param():
    refusal = error_item(InvalidRequestError("input[0] has 300 tokens", param="input", code="context_length_exceeded"))
    r, _ = post({"model": "e1", "input": "long"}, e1=embedding_client(handle=FakeEmbedHandle([refusal])))
    assert r.status_code == 400
    assert error_of(r)["code"] == "context_length_exceeded" and error_of(r)["param"] == "input"


def test_an_unknown_model_is_a_404_and_a_chat_model_a_400_naming_model():
    r, _ = post({"model": "nope", "input": "a"})
    assert r.status_code == 404 and error_of(r)["param"] == "model" and "e1" in error_of(r)["message"]
    r, core = post({"model": "m1", "input": "a"})
    assert r.status_code == 400 and error_of(r)["param"] == "model"
    assert "is a chat model" in error_of(r)["message"] and core.models["m1"].payloads == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "model": "e1"}),
        ("/v1/completions", {"model": "e1", "prompt": "hi"}),
        ("/v1/responses", {"model": "e1", "input": "hi"}),
        ("/v1/messages", {"model": "e1", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/messages/count_tokens", {"model": "e1", "messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_an_embedding_model_at_a_generation_endpoint_is_a_400_naming_model(path, body):
    async def go():
        client, core = make_client(m1=FakeClient("m1"), e1=embedding_client())
        async with client:
            return await client.post(path, json=body), core

    r, core = run(go())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "is an embedding model" in err["message"] and "/v1/embeddings" in err["message"]
    if path.startswith("/v1/messages"):  # Anthropic's shape has no param
        assert r.json()["type"] == "error" and err["type"] == "invalid_request_error"
    else:
        assert err["param"] == "model"
    assert core.models["e1"]._handle.requests == []


def test_models_lists_each_models_kind():
    async def go():
        client, _ = make_client(m1=FakeClient("m1"), e1=embedding_client())
        async with client:
            return (await client.get("/v1/models")).json(), (await client.get("/v1/models/e1")).json()

    listing, card = run(go())
    assert {m["id"]: m["kind"] for m in listing["data"]} == {"m1": "chat", "e1": "embedding"}
    assert card["kind"] == "embedding"


def test_usage_is_counted_in_the_metrics():
    async def go():
        client, core = make_client(e1=embedding_client())
        async with client:
            await client.post("/v1/embeddings", json={"model": "e1", "input": ["abc", "de"]})
            return (await client.get("/metrics")).text

    text = run(go())
    assert 'orchard_prompt_tokens_total{model="e1"} 5.0' in text
    assert 'endpoint="embeddings"' in text


def embed(client, load_timeout_s=None, loaded=lambda: True, deadline_s=30.0):
    now = time.monotonic()
    return run(client.embed(EmbedRequest(["a"]), now, now + deadline_s, load_timeout_s, loaded))


def test_an_unloaded_model_that_does_not_load_in_time_is_a_503_and_its_request_cancelled():
    handle = FakeEmbedHandle(delay=0.5)
    with pytest.raises(ApiError) as err:
        embed(embedding_client(handle=handle), load_timeout_s=0.05, loaded=lambda: False)
    assert err.value.status_code == 503 and err.value.headers["Retry-After"] == "1"
    assert err.value.body["error"]["code"] == "model_loading" and handle.responses[0].cancelled


def test_a_model_that_loaded_in_time_is_waited_for_until_the_request_deadline():
    answer = embed(embedding_client(handle=FakeEmbedHandle(delay=0.2)), load_timeout_s=0.05, loaded=lambda: True)
    assert answer["prompt_tokens"] == 1
    handle = FakeEmbedHandle(delay=0.5)
    with pytest.raises(ApiError) as err:
        embed(embedding_client(handle=handle), deadline_s=0.1)
    assert err.value.status_code == 504 and handle.responses[0].cancelled


def test_a_request_whose_replica_was_lost_is_sent_again_and_its_own_error_is_not():
    from ray.exceptions import ActorDiedError

    handle = FakeEmbedHandle([ActorDiedError(), ActorDiedError()])
    assert embed(embedding_client(handle=handle))["prompt_tokens"] == 1 and len(handle.requests) == 3
    handle = FakeEmbedHandle([ActorDiedError()] * 3)
    with pytest.raises(ApiError) as gone:
        embed(embedding_client(handle=handle))
    assert gone.value.status_code == 503 and len(handle.requests) == 3
    refusal = error_item(InvalidRequestError("dimensions too large", param="dimensions"))
    handle = FakeEmbedHandle([refusal, None])
    with pytest.raises(ApiError) as bad:
        embed(embedding_client(handle=handle))
    assert bad.value.status_code == 400 and len(handle.requests) == 1


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=10,
)
_bodies = st.one_of(
    _values,
    st.fixed_dictionaries(
        {"model": st.sampled_from(["e1", "m1", "nope"]), "input": _values},
        optional={f: _values for f in ("encoding_format", "dimensions", "user", "truncate", "extra")},
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_bodies)
def test_any_json_body_at_embeddings_is_answered_without_a_5xx(payload):
    client, _ = make_client(m1=FakeClient("m1"), e1=embedding_client())

    async def go():
        async with client:
            raw = json.dumps(payload, allow_nan=True).encode()
            return await client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})

    r = LOOP.run_until_complete(go())
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
