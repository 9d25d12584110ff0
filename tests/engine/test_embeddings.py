"""The embedding engine on the bundled all-MiniLM-L6-v2: its vectors agree with sentence-transformers'
(tests/fixtures/embedding_reference.json, made once by scripts/make_embedding_reference.py), mean
the right things, and do not depend on the batch they were computed in."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from engine.embed.engine import EmbeddingEngine, estimate_footprint
from engine.errors import InvalidRequestError

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "embedding_reference.json").read_text())
TEXTS = [item["text"] for item in REFERENCE["inputs"]]
LONG = REFERENCE["truncated"]["text"]  # 362 tokens, past the 256 of the context


@pytest.fixture(scope="module")
def engine():
    """One OpenBLAS thread: the tests share 2 cores with another worker, and two 2-thread GEMMs
    on 2 cores wait on each other's barriers (engine.cpu_threads)."""
    with threadpool_limits(1, user_api="blas"):
        yield EmbeddingEngine.from_source("all-minilm-l6-v2")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_bundled_model_is_sentence_transformers_pipeline(engine):
    assert REFERENCE["modules"] == ["Transformer", "Pooling", "Normalize"]
    info = engine.info
    assert (info.dimension, info.context_length, info.pooling, info.normalize) == (384, 256, "mean", True)


def test_vectors_agree_with_sentence_transformers(engine):
    result = engine.embed(TEXTS)
    assert result.vectors.shape == (len(TEXTS), REFERENCE["dimension"]) and result.vectors.dtype == np.float32
    for item, vector in zip(REFERENCE["inputs"], result.vectors, strict=True):
        assert cosine(vector, np.array(item["vector"])) >= 0.999, item["text"]
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.prompt_tokens == sum(item["tokens"] for item in REFERENCE["inputs"])


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(engine):
    eating, bread, _, _, _, _, movie, _ = engine.embed(TEXTS).vectors
    assert cosine(eating, bread) > cosine(eating, movie) + 0.3


def test_a_batch_of_different_lengths_equals_each_input_alone(engine):
    inputs = [LONG[:40], *TEXTS, LONG[:700]]
    together = engine.embed(inputs).vectors
    alone = np.stack([engine.embed([text]).vectors[0] for text in inputs])
    small_batches = EmbeddingEngine(engine.model, engine.tokenizer, engine.info, max_batch_size=3)
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(small_batches.embed(inputs).vectors, alone, atol=1e-5)


def test_token_ids_embed_like_their_text(engine):
    ids = [engine.tokenizer.encode(text).ids for text in TEXTS[:3]]
    by_ids = engine.embed(ids)
    assert np.allclose(by_ids.vectors, engine.embed(TEXTS[:3]).vectors, atol=1e-6)
    assert by_ids.prompt_tokens == sum(len(i) for i in ids)


def test_too_long_input_is_refused_unless_truncation_is_asked(engine):
    ids = engine.tokenizer.encode(LONG).ids
    assert len(ids) > engine.info.context_length
    for inputs in ([TEXTS[0], LONG], [engine.tokenizer.encode(TEXTS[0]).ids, ids]):
        with pytest.raises(InvalidRequestError) as err:
            engine.embed(inputs)
        assert (
            err.value.param == "input" and err.value.code == "context_length_exceeded" and "input[1]" in str(err.value)
        )
    cut = engine.embed([LONG], truncate=True)
    assert (cut.prompt_tokens, cut.truncated) == (REFERENCE["truncated"]["tokens"], 1)
    assert cosine(cut.vectors[0], np.array(REFERENCE["truncated"]["vector"])) >= 0.999  # sentence-transformers' cut
    kept = [*ids[:255], ids[-1]]  # the first tokens, then [SEP]: sentence-transformers' truncation
    assert np.allclose(cut.vectors, engine.embed([kept]).vectors, atol=1e-6)
    assert np.allclose(engine.embed([ids], truncate=True).vectors, engine.embed([ids[:256]]).vectors, atol=1e-6)


def test_dimensions_keep_the_first_components_renormalized(engine):
    full = engine.embed(TEXTS).vectors
    short = engine.embed(TEXTS, dimensions=64).vectors
    assert short.shape == (len(TEXTS), 64)
    assert np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    assert np.allclose(short, full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True), atol=1e-5)
    assert np.allclose(engine.embed(TEXTS, dimensions=384).vectors, full)
    for bad in (0, 385, 1.5, True):
        with pytest.raises(InvalidRequestError) as err:
            engine.embed(TEXTS, dimensions=bad)
        assert err.value.param == "dimensions"


@pytest.mark.parametrize(
    "inputs", [[], "a string", [TEXTS[0], [101, 102]], [[101, -1, 102]], [[101, 30522]], [[]], [[101, True]]]
)
def test_bad_inputs_are_refused_naming_the_input(engine, inputs):
    with pytest.raises(InvalidRequestError) as err:
        engine.embed(inputs)
    assert err.value.param == "input"


def test_calls_from_several_threads_each_get_their_own_vectors(engine):
    expected = engine.embed(TEXTS).vectors
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: engine.embed([TEXTS[i % 8]]).vectors[0], range(16)))
    assert all(np.allclose(vector, expected[i % 8], atol=1e-5) for i, vector in enumerate(results))


def test_the_footprint_is_measured_after_load(engine):
    footprint = engine.footprint
    assert footprint.measured and footprint.kv == 0
    assert 85e6 < footprint.weights < 95e6  # 22.7M float32 parameters, the pooler left out
    assert footprint.working > 0 and engine.stats()["footprint"]["total"] == footprint.total


def test_the_estimate_before_load_is_near_the_measured_footprint(engine):
    estimate, measured = estimate_footprint("all-minilm-l6-v2"), engine.footprint
    assert not estimate.measured
    assert abs(estimate.weights - measured.weights) / measured.weights < 0.05  # the unused pooler: 0.6%
    assert 0.5 < estimate.working / measured.working < 2
