"""Embedding-model sources: the bundled zip is unzipped once into the cache; other sources and
directories that are not embedding models fail naming what is wrong."""

from __future__ import annotations

import json

import pytest

from engine.embed.engine import load_embedding_model
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.loading.embedding_source import embedding_model_dir
from engine.loading.sources import BUNDLED_EMBEDDINGS, package_file


def test_the_bundled_zip_is_unzipped_once_into_the_cache(tmp_path):
    directory = embedding_model_dir("all-minilm-l6-v2", tmp_path)
    assert directory.parent == tmp_path / "zip"
    assert {"config.json", "tokenizer.json", "model.safetensors", "modules.json"} <= {
        p.name for p in directory.iterdir()
    }
    assert (directory / "1_Pooling" / "config.json").exists()
    written = (directory / "model.safetensors").stat().st_mtime_ns
    assert embedding_model_dir(BUNDLED_EMBEDDINGS["all-minilm-l6-v2"], tmp_path) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in (tmp_path / "zip").iterdir()] == [directory.name]  # no partial left behind
    assert package_file(BUNDLED_EMBEDDINGS["all-minilm-l6-v2"]).name == "model.zip"


def test_a_directory_without_a_tokenizer_is_not_an_embedding_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="missing tokenizer.json"):
        embedding_model_dir(str(tmp_path), tmp_path)


def test_an_unreadable_source_names_the_accepted_forms(tmp_path):
    with pytest.raises(ModelLoadError, match="a bundled name"):
        embedding_model_dir("./nowhere", tmp_path)


def test_an_encoder_other_than_bert_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "modernbert"}))
    with pytest.raises(UnsupportedModelError, match="modernbert"):
        load_embedding_model(tmp_path)
