"""The router with LoRA adapter names (deployments.router over scripted replicas): every API sends
an adapter's requests to its base naming the adapter and echoes the name; unknown names are 404s
in each API's shape; /v1/models lists each adapter with its base, path and state (never asking an
unloaded base); the load and unload routes take adapter names."""

from __future__ import annotations

from types import SimpleNamespace

import httpx

from deployments.adapters import AdapterRoute
from deployments.config import RouterConfig
from deployments.hop import error_item
from deployments.model_directory import ModelDirectory
from deployments.router import RouterCore, create_app
from engine.errors import InvalidRequestError
from tests.fakes import FakeClient

HELLO = [{"role": "user", "content": "Hi"}]
ROUTES = {
    "sql": AdapterRoute("sql", "base", "/adapters/sql"),
    "bad": AdapterRoute("bad", "base", "/adapters/bad"),
}
STATES = {
    "sql": {"state": "loaded", "rank": 8, "bytes": 4096, "requests": 2, "last_used": 5.0, "error": None},
    "bad": {"state": "failed", "rank": None, "bytes": 0, "requests": 0, "last_used": None, "error": "bad shapes"},
}


class AdapterClient(FakeClient):
    """A base model's scripted replica that also answers the adapter calls, and remembers them."""

    def __init__(self, name, **kw):
        super().__init__(name, **kw)
        self.adapter_calls: list[tuple] = []

    async def adapters(self, method, timeout_s, *args):
        from deployments.http.errors import ApiError

        self.adapter_calls.append((method, *args))
        if method == "adapter_states":
            return STATES
        if args[0] == "bad":
            raise ApiError.from_item(error_item(InvalidRequestError("adapter 'bad': lora_a has the wrong shape")))
        return STATES[args[0]]


def router(base: AdapterClient, directory=None):
    core = RouterCore(RouterConfig.model_validate({}), {"base": base}, directory, adapters=ROUTES)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test"), core


async def test_every_api_sends_an_adapter_name_to_its_base_and_echoes_it():
    base = AdapterClient("base")
    client, _ = router(base)
    async with client:
        chat = await client.post("/v1/chat/completions", json={"model": "sql", "messages": HELLO})
        text = await client.post("/v1/completions", json={"model": "sql", "prompt": "Hi"})
        resp = await client.post("/v1/responses", json={"model": "sql", "input": "Hi"})
        msg = await client.post("/v1/messages", json={"model": "sql", "max_tokens": 4, "messages": HELLO})
        plain = await client.post("/v1/chat/completions", json={"model": "base", "messages": HELLO})
    for r in (chat, text, resp, msg):
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "sql"
    assert [p.get("adapter") for p in base.payloads] == ["sql"] * 4 + [None]
    assert plain.json()["model"] == "base"


async def test_count_tokens_of_an_adapter_is_its_bases_count():
    base = AdapterClient("base")

    async def count_tokens(prompt, timeout_s, load=False):
        return 7

    base.count_tokens = count_tokens
    client, _ = router(base)
    async with client:
        r = await client.post("/v1/messages/count_tokens", json={"model": "sql", "messages": HELLO})
    assert r.status_code == 200 and r.json() == {"input_tokens": 7}


async def test_an_unknown_name_is_a_404_in_each_apis_shape_and_an_adapter_is_no_embedding_model():
    client, _ = router(AdapterClient("base"))
    async with client:
        openai = await client.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO})
        anthropic = await client.post("/v1/messages", json={"model": "nope", "max_tokens": 4, "messages": HELLO})
        card = await client.get("/v1/models/nope")
        embed = await client.post("/v1/embeddings", json={"model": "sql", "input": "Hi"})
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"
    assert "hosted models: base; adapters: bad, sql" in openai.json()["error"]["message"]
    assert anthropic.status_code == 404 and anthropic.json()["type"] == "error"
    assert embed.status_code == 400 and "'sql' is a chat model" in embed.json()["error"]["message"]
    assert anthropic.json()["error"]["type"] == "not_found_error"
    assert card.status_code == 404


async def test_v1_models_lists_each_adapter_with_its_base_path_and_state():
    base = AdapterClient("base")
    client, _ = router(base)
    async with client:
        cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
        one = (await client.get("/v1/models/sql")).json()
    assert list(cards) == ["base", "sql", "bad"]
    sql, bad = cards["sql"], cards["bad"]
    assert (sql["parent"], sql["root"], sql["state"], sql["rank"]) == ("base", "/adapters/sql", "loaded", 8)
    assert (bad["state"], bad["load_error"]) == ("failed", "bad shapes")
    assert "parent" not in cards["base"] and one == {**sql, "created": one["created"]}
    assert base.adapter_calls == [("adapter_states",), ("adapter_states",)]  # once per listing


async def test_an_unloaded_base_is_never_asked_and_its_adapters_show_its_state():
    base = AdapterClient("base")
    facts = {"base": {"deployment": "model-base", "load": "on_demand", "keep_alive_s": 60.0}}
    facts["base"].update(load_timeout_s=1.0, footprint_bytes=1000, adapters={"sql": "/adapters/sql"})
    app = SimpleNamespace(deployments={"model-base": SimpleNamespace(replica_states={})})
    status = SimpleNamespace(applications={"orchard": app})
    directory = ModelDirectory(facts, 5000, lambda n: base.info(1.0), app_name="orchard", read_status=lambda: status)
    client, core = router(base, directory)
    await directory.refresh()
    async with client:
        cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
        unload = (await client.post("/v1/models/sql/unload")).json()
    assert cards["sql"]["state"] == "unloaded" and cards["base"]["state"] == "unloaded"
    assert unload["unload_requested"] is False and unload["state"] == "unloaded"
    assert base.adapter_calls == []


async def test_load_and_unload_take_adapter_names_and_a_bad_adapter_is_a_4xx_naming_it():
    base = AdapterClient("base")
    client, _ = router(base)
    async with client:
        loaded = await client.post("/v1/models/sql/load")
        unloaded = await client.post("/v1/models/sql/unload")
        bad = await client.post("/v1/models/bad/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded" and loaded.json()["parent"] == "base"
    assert unloaded.status_code == 200 and unloaded.json()["unload_requested"] is True
    assert bad.status_code == 400 and "adapter 'bad'" in bad.json()["error"]["message"]
    assert base.adapter_calls == [("load_adapter", "sql"), ("unload_adapter", "sql"), ("load_adapter", "bad")]
