"""`synthetic:<name>` as a model source: resolved by name, built once into the cache, seeded."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from engine.errors import ModelLoadError
from engine.loading import families, synthetic
from engine.loading.loader import load_model
from engine.loading.sources import resolve_source
from engine.memory import estimate_weights_bytes


def test_synthetic_names_resolve_without_building_anything():
    for name in ("qwen3-0.6b-8bit", "qwen3_next", "llama4"):
        resolved = resolve_source(f"synthetic:{name}")
        assert (resolved.kind, resolved.location) == ("synthetic", name)


def test_an_unknown_synthetic_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown synthetic model 'qwen9'.*qwen3_next"):
        resolve_source("synthetic:qwen9")


def test_a_synthetic_model_is_built_once_into_the_cache_and_loaded(tmp_path):
    first = load_model("synthetic:qwen3_next", cache_dir=tmp_path, fast_cpu=False)
    weights = first.model_path / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    second = load_model("synthetic:qwen3_next", cache_dir=tmp_path, fast_cpu=False)
    assert second.model_path == first.model_path and weights.stat().st_mtime_ns == built_at
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [first.model_path.name]  # no leftovers
    assert first.config["model_type"] == "qwen3_next" and first.tokenizer.eos_token_ids == {0}


def test_the_same_name_builds_the_same_weights(tmp_path):
    a = load_model("synthetic:mamba2", cache_dir=tmp_path / "a", fast_cpu=False).model
    b = load_model("synthetic:mamba2", cache_dir=tmp_path / "b", fast_cpu=False).model
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]).item() for k in pa)
    # Mamba2's init, not mlx_lm's constants: every head decays at its own rate.
    a_log = pa["backbone.layers.0.mixer.A_log"]
    assert len(set(a_log.tolist())) == a_log.size


def test_the_weight_estimate_builds_the_model_the_replica_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    estimate = estimate_weights_bytes("synthetic:llama", fast_cpu=True)
    built = list((tmp_path / "synthetic").iterdir())
    loaded = load_model("synthetic:llama", cache_dir=tmp_path, fast_cpu=True)
    assert [loaded.model_path] == built and estimate == loaded.weights_bytes


def test_every_family_names_its_real_config_and_what_it_keeps():
    assert len(families.FAMILIES) == 24
    for name, family in families.FAMILIES.items():
        config = synthetic.config_of(name)
        text = config.get("text_config", config)
        assert family.source and family.keeps, name
        assert text["vocab_size"] == families.VOCAB and config["eos_token_id"] == 0, name
